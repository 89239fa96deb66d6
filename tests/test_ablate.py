"""The paper's ablations (docs/ablations.md): every row's setting against a direct computation,
the parameter counts of Table VI, and the `ademvl ablate` runner (2 steps, resume included)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ademvl import AdemVLConfig, AdemVLModel
from ademvl.bench.baselines import fuse_released
from ademvl.config import FUSION_POSITIONS
from ademvl.data import IMAGE_TOKEN_ID
from ademvl.fusion import fuse_memvp_form
from ademvl.released import export_released
from ademvl.recipes.ablate import TABLES, breakdown, count_rows, noise_of, on_grid, orderings

from .conftest import perturb, samples, tiny_model


# ---- Table VII: where the fusion reads and writes ------------------------------------------
def hand_hooks(layer: torch.nn.Module, q_from: str, add_to: str, f) -> list:
    """The fusion term f(query) added at a position, written out per case on the untouched LLM."""
    attn, mlp = layer.self_attn, layer.mlp
    case = (q_from, add_to)
    if case == ("mhsa_input", "mhsa_input"):  # attention reads x + f(x), x = input_layernorm(h)
        return [attn.register_forward_pre_hook(
            lambda m, a, kw: (a, {**kw, "hidden_states": kw["hidden_states"] + f(kw["hidden_states"])}), with_kwargs=True)]
    if case == ("mhsa_input", "mhsa_output"):
        return [attn.register_forward_hook(
            lambda m, a, kw, o: (o[0] + f(kw["hidden_states"]), *o[1:]), with_kwargs=True)]
    if case == ("mhsa_output", "mhsa_output"):
        return [attn.register_forward_hook(lambda m, a, o: (o[0] + f(o[0]), *o[1:]))]
    if case == ("mlp_input", "mlp_input"):  # the MLP reads x + f(x), x = ffn_norm(h)
        return [mlp.register_forward_pre_hook(lambda m, a: (a[0] + f(a[0]),))]
    if case == ("mlp_input", "mlp_output"):  # the paper's choice
        return [mlp.register_forward_hook(lambda m, a, o: o + f(a[0]))]
    assert case == ("mlp_output", "mlp_output")
    return [mlp.register_forward_hook(lambda m, a, o: o + f(o))]


@pytest.mark.parametrize("q_from,add_to", FUSION_POSITIONS, ids=[f"{q}-{a}" for q, a in FUSION_POSITIONS])
def test_every_fusion_position_equals_the_fusion_added_by_hand(q_from: str, add_to: str) -> None:
    model = tiny_model(alpha=0.5, query_from=q_from, add_to=add_to)
    perturb(model)
    batch = model.processor(samples())
    with torch.no_grad():
        ours = model(**batch).logits
        embeds, keys, values = model.prepare(batch["input_ids"], batch["pixel_values"], batch["image_mask"])
        f = lambda q: fuse_released(q, keys, values, 0.5, model.config.drop_ratio, "silu")  # noqa: E731 (tested in test_fusion)
        hooks = [h for layer in model.llm.get_decoder().layers for h in hand_hooks(layer, q_from, add_to, f)]
        try:  # outside `holding`, the model's own hooks do nothing: this is the base LLM plus ours by hand
            by_hand = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        finally:
            for h in hooks:
                h.remove()
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_from,add_to", [("mhsa_input", "mhsa_input"), ("mlp_output", "mlp_output")])
def test_a_moved_fusion_trains_with_the_gradients_of_the_hand_written_one(q_from: str, add_to: str) -> None:
    """The hand-written backward and the shared dK, dV buffers (fusion.tie), at another position,
    against autograd through the reference fusion added by hand."""
    model = tiny_model(alpha=0.5, query_from=q_from, add_to=add_to)
    perturb(model)
    batch = model.processor(samples())
    model(**batch).loss.backward()
    ours = {k: p.grad.clone() for k, p in model.trainable_state_dict().items()}
    model.zero_grad()
    embeds, keys, values = model.prepare(batch["input_ids"], batch["pixel_values"], batch["image_mask"])
    f = lambda q: fuse_released(q, keys, values, 0.5, model.config.drop_ratio, "silu")  # noqa: E731
    hooks = [h for layer in model.llm.get_decoder().layers for h in hand_hooks(layer, q_from, add_to, f)]
    model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    for h in hooks:
        h.remove()
    for k, p in model.trainable_state_dict().items():
        torch.testing.assert_close(ours[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_a_moved_fusion_generates_the_same_with_and_without_the_cache() -> None:
    model = tiny_model(query_from="mhsa_input", add_to="mhsa_output")
    perturb(model)
    batch = {k: v for k, v in model.processor(samples(), train=False).items() if k != "labels"}
    cached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = model.generate(**batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# ---- Table VI: the MemVP-style form of the baseline ------------------------------------------
@pytest.mark.parametrize("gamma", [0.0, 0.25])
def test_memvp_form_equals_the_equation(gamma: float) -> None:
    """out[b, t] = alpha * sum_n act(h . k_n) v_n over the kept n: the nonlinearity on each score."""
    torch.manual_seed(0)
    h, k, v = torch.randn(2, 3, 8), torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    out = torch.zeros(2, 3, 8, dtype=torch.float64)
    for b in range(2):
        for t in range(3):
            s = [float(F.silu(h[b, t].double() @ k[b, n].double())) for n in range(12)]
            weakest = set(sorted(range(12), key=s.__getitem__)[: math.floor(gamma * 12)])
            out[b, t] = sum(s[n] * v[b, n].double() for n in range(12) if n not in weakest)
    torch.testing.assert_close(fuse_memvp_form(h, k, v, 0.1, gamma, "silu").double(), 0.1 * out, rtol=1e-5, atol=1e-6)
    if gamma == 0:  # the benchmark's MemVP peer: alpha * silu(h_n @ K^T) @ V, nothing dropped
        torch.testing.assert_close(fuse_memvp_form(h, k, v, 0.1, 0.0, "silu"), 0.1 * (F.silu(h @ k.transpose(1, 2)) @ v))


def test_build_up_rows_make_the_models_they_name() -> None:
    """Each Table VI row on the tiny tower: its fusion, scales, [cls] and drop; the baseline's
    logits are the base LLM's plus the MemVP-form term at every MLP."""
    rows = [tiny_model(**on_grid(r.settings, side=4)) for r in TABLES["VI"].rows]
    assert [m.memory.fusion is fuse_memvp_form for m in rows] == [True, True, False, False, False]
    assert [m.config.scales for m in rows] == [(16,), (16,), (16,), (16, 4), (16, 4)]
    assert [m.cls_proj is not None for m in rows] == [False, True, True, True, True]
    assert [m.config.drop_ratio for m in rows] == [0.0, 0.0, 0.0, 0.0, 0.1]
    model = rows[0]
    perturb(model)
    batch = model.processor(samples())
    assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum() == 0
    with torch.no_grad():
        ours = model(**batch).logits
        _, keys, values = model.prepare(batch["input_ids"], batch["pixel_values"], batch["image_mask"])
        f = lambda q: 0.1 * F.silu(q @ keys.transpose(1, 2)) @ values  # noqa: E731
        hooks = [h for layer in model.llm.get_decoder().layers for h in hand_hooks(layer, "mlp_input", "mlp_output", f)]
        base = model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for h in hooks:
            h.remove()
    torch.testing.assert_close(ours, base, rtol=1e-5, atol=1e-5)


# ---- Table IX and X: scales, pooling, input tokens ----------------------------------------------
def test_rows_map_token_counts_to_the_towers_grid() -> None:
    assert on_grid({"scales": (256, 64, 16)}, side=14)["scales"] == (196, 49, 16)  # the demo's 14 x 14 grid
    assert on_grid({"input_tokens": 64}, side=4) == {"scales": (16, 4), "input_tokens": 4}
    assert on_grid({}, side=16) == {"scales": (256, 64)}


def test_max_pooling_row_pools_the_grid_by_max() -> None:
    model = tiny_model(pooling="max", scales=(16, 4, 1))
    perturb(model)
    batch = model.processor(samples())
    img = batch["pixel_values"][batch["image_mask"]]
    with torch.no_grad():
        keys, _, _ = model.encode_images(batch["pixel_values"], batch["image_mask"])
        grid = model.tower.features(img)[:, 1:].reshape(2, 2, 2, 2, 2, -1)  # (b, y, dy, x, dx, C) of the 4x4 grid
        tokens = torch.cat([grid.reshape(2, 16, -1), grid.amax(dim=(2, 4)).reshape(2, 4, -1),
                            grid.amax(dim=(1, 2, 3, 4))[:, None]], dim=1)  # (2, 21, C)
        expected = model.proj(tokens) * model.config.beta + model.pos_k
    torch.testing.assert_close(keys[[0, 2]], expected)


@pytest.mark.parametrize("use_cls", [True, False])
def test_input_tokens_follow_the_cls_slot(use_cls: bool) -> None:
    """Table X: M pooled patch tokens through their own projector, placed after the [cls] slot."""
    model = tiny_model(input_tokens=4, use_cls=use_cls)
    perturb(model)
    batch = model.processor(samples())
    ids, slots_n = batch["input_ids"], int(use_cls) + 4
    prefix = model.tokenizer("Image: ", add_special_tokens=False).input_ids
    assert ids[0, 1 + len(prefix): 1 + len(prefix) + slots_n].tolist() == [IMAGE_TOKEN_ID] * slots_n
    assert (ids == IMAGE_TOKEN_ID).sum(1).tolist() == [slots_n, 0, slots_n]  # none for the text-only sample
    img = batch["pixel_values"][batch["image_mask"]]
    with torch.no_grad():
        feats = model.tower.features(img)  # (2, 1 + 16, C)
        pooled = feats[:, 1:].reshape(2, 2, 2, 2, 2, -1).mean(dim=(2, 4)).reshape(2, 4, -1)  # 4x4 -> 2x2
        expected = model.input_proj(pooled)
        if use_cls:
            expected = torch.cat([model.cls_proj(feats[:, :1]), expected], dim=1)  # (2, 5, d)
        emb, _, _ = model.prepare(ids, batch["pixel_values"], batch["image_mask"])
    for row, sample in ((0, 0), (2, 1)):
        pos = (ids[row] == IMAGE_TOKEN_ID).nonzero()[:, 0]
        torch.testing.assert_close(emb[row, pos], expected[sample])
    assert model.parameter_groups()["input_proj"] == (32 * 128 + 128) + (128 * 64 + 64)


# ---- every setting is saved in the checkpoint -------------------------------------------------
def test_a_variant_checkpoint_rebuilds_the_same_variant(tmp_path) -> None:
    settings = dict(fusion_form="memvp", query_from="mlp_output", add_to="mlp_output", input_tokens=4, qk_act="elu",
                    pooling="max")
    model = tiny_model(**settings)
    perturb(model)
    model.save_pretrained(tmp_path / "ckpt")
    again = AdemVLModel.from_pretrained(tmp_path / "ckpt")
    assert {k: getattr(again.config, k) for k in settings} == settings
    batch = model.processor(samples())
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="the released code cannot express this model: .*fusion_form='memvp'"):
        export_released(tmp_path / "ckpt", tmp_path / "out.pth")


def test_params_prints_table_vi_beside_the_papers_counts(capsys) -> None:
    """At LLaMA-7B + ViT-L/14 the paper's 3.4M / 4.0M / 4.5M are the released code's counts of the
    rows (its dead last-block adapter, 1024 -> 12 -> 1024, included): 3,346,560 is printed 3.4M."""
    from ademvl.cli import main

    assert main(["params", "--table", "VI"]) == 0
    rows = [line.split()[-3:] for line in capsys.readouterr().out.splitlines()[2:7]]  # ours, released code, paper
    assert rows == [["3,321,984", "3,346,560", "3.4M"], ["3,981,568", "4,006,144", "4.0M"], ["3,981,568", "4,006,144", "4.0M"],
                    ["4,505,856", "4,530,432", "4.5M"], ["4,505,856", "4,530,432", "4.5M"]]


@pytest.mark.parametrize("changes,match", [
    (dict(query_from="mlp_output", add_to="mlp_input"), "choose a pair of"),
    (dict(query_from="mhsa_input", add_to="mlp_output"), "choose a pair of"),
    (dict(fusion_form="lora"), "fusion_form='lora'"),
    (dict(input_tokens=10), "input_tokens=10"),
])
def test_bad_variant_settings_are_refused(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdemVLConfig(**changes)


# ---- the runner --------------------------------------------------------------------------------
def test_ablate_runs_rows_writes_tables_and_resumes(tmp_path) -> None:
    """Two rows of Table VI, 2 steps each on tiny models; then one job as if killed: the rerun
    keeps the finished job and runs the killed one afresh."""
    from ademvl.cli import main

    out = tmp_path / "abl"
    argv = ["ablate", "--table", "VI", "--rows", "1", "5", "--task", "shapes", "--n", "40", "--seeds", "0",
            "--steps", "2", "--config", "tiny", "--out", str(out), "--jobs", "1", "--limit", "4", "--batch-size", "4"]
    assert main(argv) == 0
    table = (out / "table_VI.md").read_text()
    results = sorted((out / "jobs").glob("*/result.json"))
    assert len(results) == 2 and (out / "table_VI.png").stat().st_size > 0
    scores = {json.loads(r.read_text())["trainable"]: json.loads(r.read_text())["score"] for r in results}
    baseline, adem = count_tiny("VI", 1), count_tiny("VI", 5)
    assert set(scores) == {baseline, adem}  # the rows built the models they name
    assert f"| 1 | {TABLES['VI'].rows[0].name} | 92.45 | {scores[baseline]:.2f} |" in table
    assert f"| 5 | {TABLES['VI'].rows[4].name} | 93.85 | {scores[adem]:.2f} |" in table
    assert "best row: paper '+ adaptive fusion (ADEM-VL)'" in table
    types = sorted({json.loads((out / "data" / "problems.json").read_text())[pid]["qtype"]
                    for pid in json.loads((out / "data" / "pid_splits.json").read_text())["test"][:4]})
    assert "| # | row | " + " | ".join(types) + " | most common answer |" in table  # the breakdown, by the test's types

    finished, killed = results
    before = finished.stat().st_mtime_ns
    killed.unlink()  # killed before its result was written: a stale partial file is left behind
    (killed.parent / "train" / "stale").write_text("x")
    assert main(argv) == 0
    assert finished.stat().st_mtime_ns == before  # never rerun
    assert killed.is_file() and not (killed.parent / "train" / "stale").exists()  # rerun from scratch
    assert json.loads(killed.read_text())["steps"] == 2

    killed.unlink()  # --tables-only runs nothing: the row shows as not finished
    assert main(argv + ["--tables-only"]) == 0
    assert not killed.is_file() and "0: not finished" in (out / "table_VI.md").read_text()


def test_breakdown_by_question_type_and_most_common_answer(tmp_path) -> None:
    """Per-type accuracy over the split's first `limit` problems (a problem without a prediction is
    wrong), and the most common answer's share, which exposes a row that answers one letter everywhere."""
    data, job = tmp_path / "data", tmp_path / "job"
    (job / "eval").mkdir(parents=True)
    data.mkdir()
    (data / "problems.json").write_text(json.dumps({f"p{i}": {"qtype": q, "answer": a} for i, (q, a) in
                                                    enumerate([("name", 0), ("name", 1), ("group", 2), ("group", 3)])}))
    (data / "pid_splits.json").write_text(json.dumps({"test": ["p0", "p1", "p2", "p3"]}))
    (job / "eval" / "preds.json").write_text(json.dumps({"p0": 0, "p1": 0, "p2": 2}))
    assert breakdown(job, data, "test", None) == {"by type": {"group": 50.0, "name": 50.0, "most common answer": 50.0},
                                                   "questions": 4}
    assert breakdown(job, data, "test", 2) == {"by type": {"name": 50.0, "most common answer": 100.0}, "questions": 2}
    assert breakdown(tmp_path / "unfinished", data, "test", None) is None


def test_orderings_mark_differences_within_noise() -> None:
    """Two standard errors of a difference, binomial: at 25% on 150 questions x 2 seeds,
    2 * sqrt(2) * 100 * sqrt(0.25 * 0.75 / 300) = 7.07 points; steps and verdicts under it are marked."""
    assert noise_of([20.0, 30.0], 150, 2) == pytest.approx(7.0711, abs=1e-4)
    ours = {0: 24.0, 1: 23.33, 2: 21.34, 3: 19.66, 4: 35.0}  # Table VI's five rows
    lines = orderings(TABLES["VI"], ours, noise=7.07)
    assert lines[0] == ("best row: paper '+ adaptive fusion (ADEM-VL)', ours '+ adaptive fusion (ADEM-VL)': holds")
    assert lines[1].endswith("ours '+ multiscale (256, 64)': does not hold (within noise: 4.34 < 7.07)")
    assert lines[2].endswith("paper +0.16, ours -0.67: sign differs (within noise: 0.67 < 7.07)")
    assert lines[5].endswith("paper +0.38, ours +15.34: same sign")  # 15.34 > 7.07: not marked
    assert orderings(TABLES["VI"], ours) == [x.split(" (within noise")[0] for x in lines]  # no noise given: no marks


def count_tiny(table: str, row: int) -> int:
    """Trainable parameters of a row on the tiny models of ademvl/configs/tiny.yaml."""
    return count_rows(table, "tiny-llama", "tiny-clip", AdemVLConfig(scales=(16, 4)))[row - 1][1]
