"""The authors' released checkpoints and protocol (ademvl/released.py, ademvl/released_protocol.py).

No released file or LLaMA weights are here: each test writes a checkpoint in the released layout
itself (util/misc.py save_model: `module.` names, the dead last-block adapter, optimizer and
scaler state, an argparse.Namespace in `args`) at tiny shapes, on the tiny random base models.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ademvl import AdemVLConfig, AdemVLModel
from ademvl.cli import main
from ademvl.data import IGNORE_INDEX, IMAGE_TOKEN_ID, Sample
from ademvl.released import CLIP_MEAN, CLIP_STD, export_released, import_released, read_released
from ademvl.released_protocol import (
    MAX_LENGTH,
    ReleasedProcessor,
    generation_cut,
    mme_prompt,
    processor_for,
    read_caption,
    read_letter,
    scienceqa_prompt,
    segments,
)

from .conftest import perturb, samples, tiny_model
from .test_coco import karpathy  # noqa: F401  (fixture)
from .test_instruct_mme import mme_root  # noqa: F401  (fixture)
from .test_scienceqa import problem, write_released

LLM, VISION = "random:tiny-llama", "random:tiny-clip"
D, C, N, BLOCKS = 64, 32, 16 + 4, 3  # tiny-llama width, tiny-clip width / 4x4 grid + 2x2 / 3 blocks
BLOCK = "backbone.visual.transformer.resblocks.{i}.adapter_mlp.{fc}.weight"


def released_tensors(d: int = D, blocks: int = BLOCKS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Trainable tensors under the released names, random so every one matters."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.5

    t = {"adapter_emb1": r(1, N, d), "adapter_emb2": r(1, N, d)}
    for proj in ("adapter_proj", "adapter_proj_cls"):
        t |= {f"{proj}.fc1.weight": r(128, C), f"{proj}.fc1.bias": r(128),
              f"{proj}.fc2.weight": r(d, 128), f"{proj}.fc2.bias": r(d)}
    for i in range(blocks):
        t |= {BLOCK.format(i=i, fc="fc1"): r(12, C), BLOCK.format(i=i, fc="fc2"): r(C, 12)}
    return t


def released_args(**changes) -> argparse.Namespace:
    """The training command line as the released train.py records it (the fields that matter here)."""
    args = dict(dataset="sqa", llm_model="7B", prompt_format="CQM-A", use_caption=False, adapter_dim=12,
                hidden_proj=128, max_seq_len=512, down_sample_num=[16, 4], alpha=0.1, beta=0.5, drop_ratio=0.1,
                no_cls=False, blr=9e-3, weight_decay=0.02, clip_grad=None, options=["A", "B", "C", "D", "E"])
    return argparse.Namespace(**(args | changes))


def write_released_pth(path: Path, tensors: dict[str, torch.Tensor], args: argparse.Namespace, **extra) -> Path:
    """A file shaped like the authors' checkpoint-19.pth (saved from DDP)."""
    params = [torch.nn.Parameter(v.clone()) for v in tensors.values()]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    sum(p.sum() for p in params).backward()
    opt.step()
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 7}
    torch.save({"model": {f"module.{k}": v for k, v in tensors.items()}, "optimizer": opt.state_dict(),
                "epoch": 19, "scaler": scaler, "args": args, **extra}, path)
    return path


def set_by_hand(model: AdemVLModel, t: dict[str, torch.Tensor]) -> None:
    """The mapping written out once more, parameter by parameter."""
    with torch.no_grad():
        model.pos_k.copy_(t["adapter_emb1"][0])
        model.pos_v.copy_(t["adapter_emb2"][0])
        for ours, theirs in ((model.proj, "adapter_proj"), (model.cls_proj, "adapter_proj_cls")):
            for fc in ("fc1", "fc2"):
                getattr(ours, fc).weight.copy_(t[f"{theirs}.{fc}.weight"])
                getattr(ours, fc).bias.copy_(t[f"{theirs}.{fc}.bias"])
        for i, adapter in enumerate(model.vision_adapters):  # blocks 0, 1 run; block 2 is the dead one
            adapter.down.weight.copy_(t[BLOCK.format(i=i, fc="fc1")])
            adapter.up.weight.copy_(t[BLOCK.format(i=i, fc="fc2")])


def logits(model: AdemVLModel) -> torch.Tensor:
    batch = model.processor(samples())
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


# ---- import -----------------------------------------------------------------------------------
def test_import_gives_the_logits_of_a_model_set_by_hand(tmp_path: Path) -> None:
    t = released_tensors()
    pth = write_released_pth(tmp_path / "checkpoint-19.pth", t, released_args())
    import_released(pth, LLM, VISION, tmp_path / "imported")
    imported = AdemVLModel.from_pretrained(tmp_path / "imported")

    hand = AdemVLModel.build(AdemVLConfig(llm=LLM, vision=VISION, scales=(16, 4), alpha=0.1, beta=0.5, drop_ratio=0.1))
    set_by_hand(hand, t)
    assert torch.equal(logits(imported), logits(hand))


def test_import_drops_the_dead_last_block_adapter_and_says_so(tmp_path: Path, capsys) -> None:
    pth = write_released_pth(tmp_path / "c.pth", released_tensors(), released_args())
    assert main(["import-released", str(pth), "--llm", LLM, "--vision", VISION, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    dead = [BLOCK.format(i=2, fc="fc1"), BLOCK.format(i=2, fc="fc2")]
    assert f"dropped {dead[0]}: the adapter of the last vision block" in out
    assert sorted(json.loads((tmp_path / "out" / "released.json").read_text())["dropped"]) == dead
    assert sorted(k for k in load_file(str(tmp_path / "out" / "adapter.safetensors")) if k.startswith("vision_adapters")) == [
        "vision_adapters.0.down.weight", "vision_adapters.0.up.weight",
        "vision_adapters.1.down.weight", "vision_adapters.1.up.weight"]


def test_config_comes_from_args(tmp_path: Path) -> None:
    args = released_args(down_sample_num=[16], alpha=0.3, beta=0.02, drop_ratio=0.2, no_cls=True,
                         dataset="coco_caption", max_seq_len=128)
    t = {k: v for k, v in released_tensors().items() if not k.startswith("adapter_proj_cls")}
    t["adapter_emb1"], t["adapter_emb2"] = t["adapter_emb1"][:, :16], t["adapter_emb2"][:, :16]
    r = import_released(write_released_pth(tmp_path / "c.pth", t, args), LLM, VISION, tmp_path / "out")
    c = AdemVLConfig.load(tmp_path / "out")
    assert (c.scales, c.alpha, c.beta, c.drop_ratio, c.use_cls, c.adapter_dim, c.hidden_proj, c.max_length) == (
        (16,), 0.3, 0.02, 0.2, False, 12, 128, 128)
    assert (c.image_mean, c.image_std, c.vision_layer) == (CLIP_MEAN, CLIP_STD, -2)  # COCO: CLIP's mean/std
    assert r["trainable"] == 2 * (32 * 12 + 12 * 32) + (32 * 128 + 128 + 128 * 64 + 64) + 2 * 16 * 64


# ---- round trip -------------------------------------------------------------------------------
def test_export_then_import_is_the_identity(tmp_path: Path) -> None:
    model = tiny_model()
    perturb(model)
    ours = model.save_pretrained(tmp_path / "ours")
    pth = export_released(ours, tmp_path / "exported.pth")
    import_released(pth, LLM, VISION, tmp_path / "back")
    assert AdemVLConfig.load(tmp_path / "back").to_dict() == AdemVLConfig.load(ours).to_dict()
    a, b = load_file(str(ours / "adapter.safetensors")), load_file(str(tmp_path / "back" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_writes_the_released_names_and_args(tmp_path: Path) -> None:
    t = released_tensors()
    import_released(write_released_pth(tmp_path / "c.pth", t, released_args()), LLM, VISION, tmp_path / "imp")
    assert main(["export-released", "--checkpoint", str(tmp_path / "imp"), "--out", str(tmp_path / "x.pth")]) == 0
    state, args, _ = read_released(tmp_path / "x.pth")
    assert state.keys() == t.keys()
    dead = {BLOCK.format(i=2, fc=fc) for fc in ("fc1", "fc2")}
    assert all(torch.equal(state[k], t[k]) for k in t if k not in dead)
    assert all(not state[k].any() for k in dead)  # never runs in their code: written as zeros
    assert {k: args[k] for k in ("llm_model", "prompt_format", "down_sample_num", "alpha", "beta", "no_cls")} == {
        "llm_model": "7B", "prompt_format": "CQM-A", "down_sample_num": [16, 4], "alpha": 0.1, "beta": 0.5, "no_cls": False}


# ---- refusals ---------------------------------------------------------------------------------
def test_wrong_shape_is_refused_naming_the_base_models(tmp_path: Path) -> None:
    pth = write_released_pth(tmp_path / "c.pth", released_tensors(d=128), released_args())
    with pytest.raises(ValueError, match=r"c\.pth does not fit the named base models: LLM random:tiny-llama \(d=64\)"
                                         r".*pos_k: file \(20, 128\) vs model \(20, 64\)"):
        import_released(pth, LLM, VISION, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapters_for_another_tower_depth_are_refused(tmp_path: Path) -> None:
    pth = write_released_pth(tmp_path / "c.pth", released_tensors(blocks=24), released_args())
    with pytest.raises(ValueError, match=r"vision adapters for blocks 0\.\.23 \(24 blocks\), but the named vision "
                                         r"tower has 3 blocks"):
        import_released(pth, LLM, VISION, tmp_path / "out")


class _Payload:
    """Unpickling this would create a directory: the side effect shows whether it ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_pickle_with_any_other_object_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    pth = write_released_pth(tmp_path / "c.pth", released_tensors(), released_args(), hook=_Payload(marker))
    with pytest.raises(ValueError, match=r"c\.pth: refused: the file carries a Python object .*posix\.mkdir"):
        read_released(pth)
    assert not marker.exists()


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pth: not a torch checkpoint"):
        read_released(tmp_path / "notes.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: not a released ADEM-VL checkpoint: expected a dict with 'model'"):
        read_released(tmp_path / "other.pth")


# ---- the released protocol's inputs -------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> AdemVLModel:
    return tiny_model()


def test_scienceqa_prompt_with_an_image(model: AdemVLModel) -> None:
    p = problem(image="image.png", caption="A horse stands in a field.", hint="")
    text = scienceqa_prompt(p)
    assert text == ("Question: Which is a mammal?\nContext: A horse stands in a field.\n"
                    "Options: (A) frog (B) horse\nResponse:The answer is")
    assert segments(text, True) == ["Image: ", IMAGE_TOKEN_ID, text]  # no "\n" after [cls]
    proc, tok = processor_for(model, "scienceqa"), model.tokenizer
    ids = proc.encode(Sample("1", "x.png", [(text, "")]), train=False)["input_ids"]
    assert ids == [tok.bos_token_id] + proc._tok("Image: ") + [IMAGE_TOKEN_ID] + proc._tok(text)


def test_scienceqa_prompt_without_an_image(model: AdemVLModel) -> None:
    p = problem(hint="Lions and frogs live in Africa.", caption="")
    text = scienceqa_prompt(p)
    assert text == ("Question: Which is a mammal?\nContext: Lions and frogs live in Africa.\n"
                    "Options: (A) frog (B) horse\nResponse:The answer is")
    assert segments(text, False) == ["Image: N/A", text]
    proc = processor_for(model, "scienceqa")
    ids = proc.encode(Sample("2", None, [(text, "")]), train=False)["input_ids"]
    assert ids == [model.tokenizer.bos_token_id] + proc._tok("Image: N/A") + proc._tok(text)


def test_coco_prompt_and_clip_normalisation(model: AdemVLModel) -> None:
    proc = processor_for(model, "coco")
    ids = proc.encode(Sample("391895", Image.new("RGB", (64, 64), (255, 0, 0)), [("a picture of", "")]), train=False)["input_ids"]
    assert ids == [model.tokenizer.bos_token_id] + proc._tok("Image: ") + [IMAGE_TOKEN_ID] + proc._tok("a picture of")
    px = proc.image_tensor(Image.new("RGB", (64, 64), (255, 0, 0)))
    expected = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], (0 - CLIP_MEAN[1]) / CLIP_STD[1], (0 - CLIP_MEAN[2]) / CLIP_STD[2]]
    assert px[:, 0, 0].tolist() == pytest.approx(expected, abs=1e-6)


def test_mme_prompt(model: AdemVLModel) -> None:
    q = "Is there a dog in this image? Please answer yes or no."
    assert mme_prompt(q) == "Instruction: Is there a dog in this image? Please answer yes or no.\nResponse:"
    proc = processor_for(model, "mme")
    assert proc.max_new_tokens == 10 and proc.mean == (0.485, 0.456, 0.406)


def test_training_layout_joins_prompt_and_answer(model: AdemVLModel) -> None:
    proc = ReleasedProcessor(model.tokenizer, model.config, 224)
    prompt, answer = "Question: Which is a mammal?\nResponse:", "The answer is B."
    e = proc.encode(Sample("3", None, [(prompt, answer)]), train=True)
    head = [model.tokenizer.bos_token_id] + proc._tok("Image: N/A")
    n_prompt = len(head) + len(proc._tok(prompt))
    assert e["input_ids"] == head + proc._tok(prompt + answer) + [proc.eos]
    assert e["labels"] == [IGNORE_INDEX] * n_prompt + e["input_ids"][n_prompt:]


@pytest.mark.parametrize("text, n, expected", [("A", 2, 0), (" B", 2, 1), ("E", 2, -1), ("the", 3, -1), ("", 2, -1)])
def test_read_letter_takes_the_first_capital(text: str, n: int, expected: int) -> None:
    assert read_letter(text, n) == expected


def test_read_caption() -> None:
    assert read_caption(" a man riding a horse") == "a man riding a horse"
    assert read_caption("a picture of a dog on a bed") == "a dog on a bed"


# ---- the eval command -------------------------------------------------------------------------
def test_eval_scienceqa_protocol_released(model: AdemVLModel, tmp_path: Path, capsys) -> None:
    problems = {"1": problem(image="image.png"), "2": problem(hint="Frogs are amphibians.")}
    root = write_released(tmp_path / "sqa", problems, {"test": ["1", "2"]}, captions={"1": "A horse."})
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    assert main(["eval", "scienceqa", "--protocol", "released", "--checkpoint", str(ckpt), "--data-root", str(root),
                 "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert "released protocol (eval_sqa.py: QCM-A with captions" in capsys.readouterr().out
    generations = json.loads((tmp_path / "out" / "generations.json").read_text())
    assert sorted(generations) == ["1", "2"]
    assert all(len(model.tokenizer(g, add_special_tokens=False).input_ids) <= 1 for g in generations.values())


# ---- the released optimiser -------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((ROOT / "ademvl" / "configs").glob("*llama*.yaml"))


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=[p.stem for p in PAPER_CONFIGS])
def test_paper_configs_follow_the_released_optimiser(path: Path) -> None:
    from ademvl.config import load_run_config

    tc = load_run_config(path).train
    assert (tc.betas, tc.weight_decay, tc.clip_grad, tc.blr, tc.batch_size * tc.grad_accum * 8) == (
        (0.9, 0.95), 0.02, None, 9e-3, 32)


def test_trainer_uses_the_betas_and_timms_decay_groups(tmp_path: Path) -> None:
    """timm's param_groups_weight_decay (the released train.py): no decay for biases and 1-d parameters."""
    from ademvl.config import load_run_config
    from ademvl.recipes.train import Trainer

    t = Trainer(load_run_config("tiny", ["--train.output_dir", str(tmp_path), "--train.betas", "[0.9, 0.95]"]))
    assert {g["betas"] for g in t.optimizer.param_groups} == {(0.9, 0.95)}
    no_decay = {id(p) for g in t.optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    timm = {id(p) for n, p in t.raw.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))}
    assert no_decay == timm and len(timm) == 4  # proj and cls_proj: fc1.bias, fc2.bias


def record_generate(model: AdemVLModel, monkeypatch, answers: list[str]) -> dict:
    """model.generate returns `answers` in order and records what it was given."""
    seen: dict = {"input_ids": [], "n": 0}
    tok = model.tokenizer

    def generate(input_ids, attention_mask=None, pixel_values=None, image_mask=None, **kw):
        seen["input_ids"] += [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
        seen["pixels"], seen["kwargs"] = pixel_values, kw
        ids = [tok(a, add_special_tokens=False).input_ids for a in answers[seen["n"]: seen["n"] + len(input_ids)]]
        seen["n"] += len(ids)
        longest = max(map(len, ids))
        return torch.tensor([x + [tok.eos_token_id] * (longest - len(x)) for x in ids])

    monkeypatch.setattr(model, "generate", generate)
    return seen


def test_coco_released_reads_the_caption_after_the_prompt(karpathy: Path, monkeypatch) -> None:  # noqa: F811
    from ademvl.recipes.evaluate import evaluate
    from ademvl.tasks import coco

    root = karpathy
    model = tiny_model()
    seen = record_generate(model, monkeypatch, ["a picture of a man riding a horse", " two cats sleep on the sofa"])
    opts = coco.EvalOptions(data_root=str(root), split="val", metrics=["Bleu_4", "CIDEr"], protocol="released")
    r = evaluate(model, "coco", opts, batch_size=2)
    assert r.outputs["preds.json"] == [{"image_id": 42, "caption": "a man riding a horse"},
                          {"image_id": 7, "caption": "two cats sleep on the sofa"}]
    proc = processor_for(model, "coco")
    assert seen["input_ids"][0] == [model.tokenizer.bos_token_id] + proc._tok("Image: ") + [IMAGE_TOKEN_ID] + proc._tok("a picture of")
    assert seen["kwargs"]["max_new_tokens"] == 20 and r.scores["Bleu_4"] == pytest.approx(1.0, abs=1e-6)


def test_mme_released_writes_answers_without_newlines(mme_root: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    from ademvl.recipes.evaluate import evaluate
    from ademvl.tasks import mme

    root = mme_root
    model = tiny_model()
    seen = record_generate(model, monkeypatch, ["Yes", "No", "No", "No", "No", "Yes\nIt is"])
    r = evaluate(model, "mme", mme.EvalOptions(data_root=str(root), protocol="released"), tmp_path / "out", batch_size=4)
    assert (tmp_path / "out" / "artwork.txt").read_text().splitlines()[1] == \
        "10.jpg\tIs this by Manet? Please answer yes or no.\tYes\tYesIt is"
    assert seen["kwargs"]["max_new_tokens"] == 10 and r.scores["subtasks"]["artwork"]["acc"] == 100.0


# ---- fidelity to the released scripts: transparency, and [cls] in a cut prompt ------------------
def test_released_images_are_read_with_convert_rgb(model: AdemVLModel, tmp_path: Path) -> None:
    """RGBA, LA and a palette with a transparent index: the colour stored under a transparent pixel
    is what eval_sqa.py's `Image.open(path).convert('RGB')` sees; ours composites on white."""
    import numpy as np

    rgba = Image.new("RGBA", (32, 32), (200, 30, 60, 0))  # fully transparent, red stored underneath
    la = Image.new("LA", (32, 32), (40, 0))
    pal = Image.new("P", (32, 32), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 120, 250] + [0, 0, 0] * 252)
    pal.info["transparency"] = 3
    proc = processor_for(model, "scienceqa")
    mean, std = torch.tensor(proc.mean).view(3, 1, 1), torch.tensor(proc.std).view(3, 1, 1)
    for name, img in (("rgba", rgba), ("la", la), ("p", pal)):
        img.save(tmp_path / f"{name}.png")
        with Image.open(tmp_path / f"{name}.png") as f:  # the released reading, written out
            pixels = np.asarray(f.convert("RGB").resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255.0
        theirs = (torch.from_numpy(pixels).permute(2, 0, 1) - mean) / std
        torch.testing.assert_close(proc.image_tensor(tmp_path / f"{name}.png"), theirs)
        ours = model.processor.image_tensor(tmp_path / f"{name}.png")  # on white
        assert not torch.allclose(ours, theirs)


def released_generate_layout(prompt_tokens: list[int], pos: int, max_gen_len: int) -> tuple[list[int], int | None]:
    """adem/model.py generate() for one prompt (placeholder 0 at `pos`), its index arithmetic as
    written there: the token ids before the new tokens, and where [cls] is written (None: nowhere)."""
    total_len = min(512, max_gen_len + len(prompt_tokens))
    tokens = [0] * total_len
    t = prompt_tokens[: total_len - max_gen_len]
    tokens[total_len - len(t) - max_gen_len: total_len - max_gen_len] = t
    at = pos - len(prompt_tokens) - max_gen_len  # negative: counted from the end
    return tokens[: total_len - max_gen_len], None if at < -511 else total_len + at


@pytest.mark.parametrize("excess", [0, 1, 2, 3, 4, 9])
def test_a_cut_prompt_gets_cls_where_the_released_generate_puts_it(model: AdemVLModel, excess: int) -> None:
    proc = processor_for(model, "scienceqa")
    window = MAX_LENGTH - proc.max_new_tokens
    head = proc.layout("", True)  # [BOS] "Image: " [cls]
    pos = head.index(IMAGE_TOKEN_ID)
    ids = head + [7] * (window - len(head) + excess)  # a prompt `excess` tokens over the window
    theirs, at = released_generate_layout([0 if i == IMAGE_TOKEN_ID else i for i in ids], pos, proc.max_new_tokens)
    ours = generation_cut(ids, window)
    assert len(ours) == len(theirs) == window
    assert [0 if i == IMAGE_TOKEN_ID else i for i in ours] == [0 if i == at else t for i, t in enumerate(theirs)]
    assert [i for i, t in enumerate(ours) if t == IMAGE_TOKEN_ID] == ([] if at is None else [at])
    if excess == 0:
        assert ours == ids  # nothing cut: [cls] in its slot
    elif at is not None:
        assert at == pos - excess and ours[pos] == 0  # early, over a prompt token; the slot keeps token 0


def test_a_cut_prompt_without_cls_still_runs(model: AdemVLModel) -> None:
    """An image sample whose [cls] the released cut dropped: no [cls] embedding, the rest as usual."""
    proc = processor_for(model, "scienceqa")
    long_prompt = " ".join(["word"] * 600)
    batch = proc([Sample("long", Image.new("RGB", (32, 32)), [(long_prompt, "")]),
                  Sample("short", Image.new("RGB", (32, 32)), [("Which?", "")])], train=False)
    assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist() == [0, 1]
    with torch.no_grad():
        out = model.generate(**{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=1, do_sample=False)
    assert out.shape == (2, 1)
