"""The authors' released checkpoints (Hao840/ADEM-VL): import them into ademvl, and export back.

The released file, as util/misc.py `save_model` writes it:

    torch.save({"model": {name: tensor for every trainable parameter whose name contains "adapter"},
                "optimizer": AdamW state, "epoch": int, "scaler": GradScaler state,
                "args": argparse.Namespace (the training command line)}, "checkpoint-E.pth")

Names carry a `module.` prefix when saved from DDP (the released checkpoints are). Their model
is adem/model.py + adem/adapter.py: LLaMA in Meta's layout, OpenAI CLIP ViT-L/14 whose
`visual.transformer.resblocks.i` is Hugging Face's `encoder.layers.i`. The table below is the
whole mapping; every tensor of the file is either mapped or named in the import report.

    theirs (module. stripped)                                     ours                               shape (7B)
    adapter_emb1                                                  pos_k (E_k), [0] of their (1, N, d)  (320, 4096)
    adapter_emb2                                                  pos_v (E_v), likewise              (320, 4096)
    adapter_proj.fc1.{weight,bias}                                proj.fc1.{weight,bias}             (128, 1024), (128,)
    adapter_proj.fc2.{weight,bias}                                proj.fc2.{weight,bias}             (4096, 128), (4096,)
    adapter_proj_cls.fc{1,2}.{weight,bias}  (absent with --no_cls) cls_proj.fc{1,2}.{weight,bias}     as proj
    backbone.visual.transformer.resblocks.{i}.adapter_mlp.fc1.weight  vision_adapters.{i}.down.weight  (12, 1024)
    backbone.visual.transformer.resblocks.{i}.adapter_mlp.fc2.weight  vision_adapters.{i}.up.weight    (1024, 12)
        for i = 0 .. 22; i = 23, the last block, is dropped: the released VisionTransformer runs
        resblocks[:-1], so that adapter never runs and never trains (we build no dead parameters).

Their `args` give the AdemVLConfig (`config_from_args`); the rest of the released method is
fixed in their code and matches our defaults: the second to last vision block (vision_layer
-2), adapter scale 0.1 and dropout 0.1, average pooling, SiLU on query and key, "Image: " /
"Image: N/A". Images: ImageNet mean/std, except COCO captions (args.dataset == "coco_caption"),
which the released code normalises with CLIP's.

Reading is safe: torch.load(weights_only=True) with argparse.Namespace as the only class allowed
beyond tensors and plain containers; a file that carries any other object is refused before
anything in it runs.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import hub
from .config import AdemVLConfig
from .files import read_json, read_safetensors
from .model import WEIGHTS_NAME, AdemVLModel, build_meta
from .vision import truncate_tower

SAFE_GLOBALS = [argparse.Namespace]  # the only class a released checkpoint pickles
SOURCE_NAME = "released.json"  # beside an imported checkpoint: where it came from, their args, what was dropped
VISION_BLOCK = re.compile(r"^backbone\.visual\.transformer\.resblocks\.(\d+)\.adapter_mlp\.(fc1|fc2)\.weight$")
FC_TO_OURS = {"fc1": "down", "fc2": "up"}
PROJECTORS = {"adapter_proj": "proj", "adapter_proj_cls": "cls_proj"}
TABLES = {"adapter_emb1": "pos_k", "adapter_emb2": "pos_v"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# What the released code fixes in its source (not in args); an export must match these.
RELEASED_FIXED = dict(vision_layer=-2, adapter_scale=0.1, adapter_dropout=0.1, pooling="avg", qk_act="silu",
                      image_prefix="Image: ", no_image_prefix="Image: N/A", fusion_form="cross_attention",
                      query_from="mlp_input", add_to="mlp_output", input_tokens=0)
REQUIRED_ARGS = ("down_sample_num", "alpha", "beta", "drop_ratio")
DEAD_NOTE = ("the adapter of the last vision block: the released code builds it, but reads the second to last "
             "block (resblocks[:-1]), so it never runs and never trained")


# ---- reading --------------------------------------------------------------------------------
def read_released(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], Any]:
    """(their model tensors, their args as a dict, epoch) of a released checkpoint file.

    Refuses, with a message naming the file, anything that is not such a checkpoint: a pickle
    that carries another Python object (weights_only loading stops before building it), a file
    torch cannot read, or one without a {"model": {name: tensor}, "args": Namespace} payload.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: released checkpoint not found (e.g. checkpoint_7B_sqa.pth from the "
                                f"authors' GitHub release 'checkpoint')")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the class or function it stopped at
        if not found:  # not a pickle of objects at all (a text file, a truncated download)
            parts = [x.strip() for x in str(e).split("\n\n") if x.strip()]
            detail = parts[1] if len(parts) > 2 else parts[-1].splitlines()[-1]
            raise ValueError(f"{path}: not a torch checkpoint torch.load can read ({detail})") from None
        what = f"it names {found.group(1)}"
        raise ValueError(
            f"{path}: refused: the file carries a Python object a released ADEM-VL checkpoint does not have "
            f"({what}). A released checkpoint holds only tensors, numbers, strings, lists, dicts and one "
            f"argparse.Namespace; ademvl never unpickles anything else, since unpickling can run code. "
            f"Use the authors' original file.") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a torch checkpoint torch.load can read ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: not a released ADEM-VL checkpoint: expected a dict with 'model' "
                         f"(name -> tensor) and 'args', found {keys}")
    state = obj["model"]
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path}: 'model' must map names to tensors; {bad[:3]} do not")
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        raise ValueError(f"{path}: no training arguments ('args', an argparse.Namespace); the method's settings "
                         f"(scales, alpha, beta, drop ratio) cannot be known without them")
    return state, dict(args), obj.get("epoch")


def strip_ddp(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Names as the bare model has them (DDP saves them under `module.`)."""
    return {k.removeprefix("module."): v for k, v in state.items()}


# ---- names ----------------------------------------------------------------------------------
def to_ademvl(state: dict[str, Tensor], vision_blocks: int, where: str = "checkpoint") -> tuple[dict[str, Tensor], list[str]]:
    """Their tensors (module. stripped) -> ours, by the table in the module docstring.

    vision_blocks: the blocks of the named vision tower (24 for ViT-L/14). The adapters of the
    blocks that run (all but the last) map onto ours; the last block's adapter is returned in
    `dropped`. Any other name, or adapters for another number of blocks, is an error.
    """
    ours: dict[str, Tensor] = {}
    dropped, unknown, blocks = [], [], set()
    for name, t in state.items():
        if name in TABLES:
            if t.ndim != 3 or t.shape[0] != 1:
                raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}; the released position tables are (1, N, d)")
            ours[TABLES[name]] = t[0]
        elif (head := name.split(".", 1)[0]) in PROJECTORS and name.count(".") == 2:
            ours[PROJECTORS[head] + name[len(head):]] = t
        elif m := VISION_BLOCK.match(name):
            i = int(m.group(1))
            blocks.add(i)
            if i == vision_blocks - 1:
                dropped.append(name)
            else:
                ours[f"vision_adapters.{i}.{FC_TO_OURS[m.group(2)]}.weight"] = t
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{where}: names outside the released ADEM-VL layout: {unknown[:4]}"
                         f"{' ...' if len(unknown) > 4 else ''}")
    if blocks and blocks != set(range(vision_blocks)):
        raise ValueError(f"{where}: vision adapters for blocks {min(blocks)}..{max(blocks)} ({len(blocks)} blocks), "
                         f"but the named vision tower has {vision_blocks} blocks; name the tower it was trained on "
                         f"(ViT-L/14: --vision openai/clip-vit-large-patch14)")
    return {k: v.float().contiguous() for k, v in ours.items()}, sorted(dropped)


def from_ademvl(state: dict[str, Tensor], vision_blocks: int) -> dict[str, Tensor]:
    """Ours -> their names (no `module.` prefix; their eval scripts strip it anyway).

    The last block's adapter is written too, as zeros, so the file has the released key set;
    the released code never runs it.
    """
    out: dict[str, Tensor] = {}
    inverse_proj = {v: k for k, v in PROJECTORS.items()}
    inverse_tab = {v: k for k, v in TABLES.items()}
    inverse_fc = {v: k for k, v in FC_TO_OURS.items()}
    for name, t in state.items():
        head, _, rest = name.partition(".")
        if name in inverse_tab:
            out[inverse_tab[name]] = t.unsqueeze(0)  # (1, N, d)
        elif head in inverse_proj:
            out[f"{inverse_proj[head]}.{rest}"] = t
        elif head == "vision_adapters":
            i, fc, _ = rest.split(".")
            out[f"backbone.visual.transformer.resblocks.{i}.adapter_mlp.{inverse_fc[fc]}.weight"] = t
        else:
            raise ValueError(f"{name}: not an ADEM-VL trainable weight this exporter knows")
    last = vision_blocks - 1
    for fc in ("fc1", "fc2"):
        like = out.get(f"backbone.visual.transformer.resblocks.0.adapter_mlp.{fc}.weight")
        if like is not None:
            out[f"backbone.visual.transformer.resblocks.{last}.adapter_mlp.{fc}.weight"] = torch.zeros_like(like)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


# ---- settings -------------------------------------------------------------------------------
def _scales(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in (value if isinstance(value, (list, tuple)) else [value]))


def config_from_args(args: dict[str, Any], state: dict[str, Tensor], llm: str, vision: str,
                     where: str = "checkpoint") -> AdemVLConfig:
    """The AdemVLConfig of a released checkpoint: their args, checked against the tensors' shapes.

    Sizes the tensors fix (adapter size, projector width, [cls] or not, N) must agree with args;
    the mean/std follow the task the model was trained on (COCO captions: CLIP's).
    """
    missing = [k for k in REQUIRED_ARGS if k not in args]
    if missing:
        raise ValueError(f"{where}: its args lack {', '.join(missing)}; not a checkpoint of the released train.py")
    scales = _scales(args["down_sample_num"])
    use_cls = "adapter_proj_cls.fc1.weight" in state
    fc1 = state.get("adapter_proj.fc1.weight")
    emb = state.get("adapter_emb1")
    block0 = state.get("backbone.visual.transformer.resblocks.0.adapter_mlp.fc1.weight")
    if fc1 is None or emb is None:
        raise ValueError(f"{where}: adapter_proj.fc1.weight or adapter_emb1 is missing; not a released ADEM-VL checkpoint")
    checks = [("down_sample_num (sum = N)", sum(scales), emb.shape[1]),
              ("hidden_proj", int(args.get("hidden_proj", fc1.shape[0])), fc1.shape[0]),
              ("no_cls", bool(args.get("no_cls", not use_cls)), not use_cls)]
    adapter_dim = block0.shape[0] if block0 is not None else 0
    if "adapter_dim" in args:
        checks.append(("adapter_dim", int(args["adapter_dim"]), adapter_dim))
    wrong = [f"args.{k}={a} but the tensors say {t}" for k, a, t in checks if a != t]
    if wrong:
        raise ValueError(f"{where}: its args do not describe its tensors: {'; '.join(wrong)}")
    if "image_mean" in args:  # written by our export-released
        mean, std = tuple(args["image_mean"]), tuple(args["image_std"])
    else:
        mean, std = (CLIP_MEAN, CLIP_STD) if args.get("dataset") == "coco_caption" else (IMAGENET_MEAN, IMAGENET_STD)
    return AdemVLConfig(
        llm=llm, vision=vision, **RELEASED_FIXED, adapter_dim=int(adapter_dim), scales=scales,
        hidden_proj=int(fc1.shape[0]), beta=float(args["beta"]), use_cls=use_cls, alpha=float(args["alpha"]),
        drop_ratio=float(args["drop_ratio"]), image_mean=mean, image_std=std,
        max_length=int(args.get("max_seq_len", 512)))


def _shell(config: AdemVLConfig) -> AdemVLModel:
    """The model the weights go into, on meta-device base models: only their config.json is read,
    so a 7B import costs seconds. A random or embedded tower is also built for real, once, for the
    fingerprint a checkpoint made by training records (AdemVLModel.__init__ does the same)."""
    model = build_meta(config.llm, config.vision, config)
    if config.vision == hub.EMBEDDED_VISION or config.vision.startswith("random:"):
        tower = hub.load_vision(config.vision)
        truncate_tower(tower, config.vision_layer)
        model.config.base["vision_fingerprint"] = hub.fingerprint(tower)
    return model


def _check_shapes(model: AdemVLModel, ours: dict[str, Tensor], where: str) -> None:
    own = model.trainable_state_dict()
    problems = [f"{k}: file {tuple(ours[k].shape)} vs model {tuple(v.shape)}"
                for k, v in own.items() if k in ours and ours[k].shape != v.shape]
    problems += [f"missing {k}" for k in own if k not in ours]
    problems += [f"unexpected {k}" for k in ours if k not in own]
    if problems:
        b = model.config.base
        raise ValueError(
            f"{where} does not fit the named base models: LLM {b['llm']} (d={b['hidden_size']}) + vision "
            f"{b['vision']} (width {b['vision_width']}, {b['vision_blocks']} blocks): {'; '.join(problems[:4])}"
            f"{' ...' if len(problems) > 4 else ''}. The released checkpoints are for LLaMA-7B (d=4096: "
            f"--llm huggyllama/llama-7b) and CLIP ViT-L/14 (--vision openai/clip-vit-large-patch14)")


def _set_weights(model: AdemVLModel, ours: dict[str, Tensor]) -> None:
    """Put the tensors in as the trainable parameters (they replace meta placeholders too)."""
    for name, t in ours.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, leaf, nn.Parameter(t.clone(), requires_grad=True))


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def import_released(path: str | Path, llm: str, vision: str, out: str | Path) -> dict[str, Any]:
    """Read a released checkpoint, map it, check it against the named base models, write an
    ademvl checkpoint (adapter.safetensors + ademvl_config.json + released.json). Returns a report."""
    path = Path(path)
    state, args, epoch = read_released(path)
    state = strip_ddp(state)
    where = str(path)
    config = config_from_args(args, state, llm, vision, where)
    model = _shell(config)
    ours, dropped = to_ademvl(state, model.config.base["vision_blocks"], where)
    _check_shapes(model, ours, where)
    _set_weights(model, ours)
    out = model.save_pretrained(out)
    source = {"file": path.name, "epoch": _jsonable(epoch), "dropped": {k: DEAD_NOTE for k in dropped},
              "args": {k: _jsonable(v) for k, v in args.items()}}
    (out / SOURCE_NAME).write_text(json.dumps(source, indent=1) + "\n")
    return {"out": str(out), "mapped": len(ours), "dropped": dropped, "config": config,
            "trainable": model.num_trainable(), "args": args}


# ---- export ---------------------------------------------------------------------------------
def released_args(config: AdemVLConfig, source_args: dict[str, Any] | None = None) -> argparse.Namespace:
    """Their args for our config: the imported file's own args updated with our method settings,
    or, for a checkpoint trained here, the fields their eval and train scripts read."""
    d = config.base.get("hidden_size")
    args = dict(source_args or {"llm_model": {4096: "7B", 5120: "13B"}.get(d, config.llm)})
    args.update(adapter_dim=config.adapter_dim, hidden_proj=config.hidden_proj, max_seq_len=config.max_length,
                down_sample_num=list(config.scales), alpha=config.alpha, beta=config.beta,
                drop_ratio=config.drop_ratio, no_cls=not config.use_cls,
                image_mean=list(config.image_mean), image_std=list(config.image_std))
    return argparse.Namespace(**args)


def export_released(checkpoint: str | Path, out: str | Path) -> Path:
    """Write an ademvl checkpoint as a released-layout .pth (model + args; no optimizer state,
    so the authors' eval scripts load it and their --resume starts the optimizer afresh)."""
    checkpoint = Path(checkpoint)
    config = AdemVLConfig.load(checkpoint)
    differs = {k: (getattr(config, k), v) for k, v in RELEASED_FIXED.items() if getattr(config, k) != v}
    if differs:
        raise ValueError(f"{checkpoint}: the released code cannot express this model: "
                         + "; ".join(f"{k}={a!r} (released: {b!r})" for k, (a, b) in differs.items()))
    if config.adapter_dim == 0:
        raise ValueError(f"{checkpoint}: adapter_dim=0 has no vision adapters; the released code always builds them")
    weights = checkpoint / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: no ADEM-VL weights here")
    source = checkpoint / SOURCE_NAME
    source_args = read_json(source, "the import record of ademvl import-released", dict).get("args") if source.exists() else None
    state = from_ademvl(read_safetensors(weights, "the checkpoint's trainable weights"), config.base["vision_blocks"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "args": released_args(config, source_args)}, out)
    return out


# ---- CLI ------------------------------------------------------------------------------------
def describe_import(r: dict[str, Any]) -> str:
    """What `ademvl import-released` prints: what was mapped and dropped, the config, how to evaluate."""
    c, a = r["config"], r["args"]
    lines = [f"mapped {r['mapped']} tensors onto ademvl's parameters ({r['trainable']:,} trainable)"]
    lines += [f"dropped {name}: {DEAD_NOTE}" for name in r["dropped"]]
    lines.append(f"config: scales {list(c.scales)}, alpha {c.alpha}, beta {c.beta}, drop ratio {c.drop_ratio}, "
                 f"[cls] {'on' if c.use_cls else 'off'}, adapter {c.adapter_dim}, projector {c.hidden_proj}, "
                 f"mean/std {'CLIP' if c.image_mean == CLIP_MEAN else 'ImageNet'}")
    if a.get("dataset", "sqa") == "sqa":
        fmt, cap = a.get("prompt_format", "?"), a.get("use_caption", "?")
        lines.append(f"trained with prompt_format={fmt}, use_caption={cap}; the released eval_sqa.py (and "
                     f"--protocol released) evaluates with QCM-A and captions")
    lines.append(f"wrote {r['out']}; evaluate it as the authors did: ademvl eval scienceqa|coco|mme --protocol released "
                 f"--checkpoint {r['out']} --data-root DIR")
    return "\n".join(lines)
