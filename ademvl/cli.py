"""`ademvl <command>`: every command of the project, each a thin layer over a recipe or component.

    demo       recipes/demo.py        the embedded end-to-end demo
    train      recipes/train.py       a run config (ademvl/configs/*.yaml) on Accelerate
    eval       recipes/evaluate.py    a task's protocol (options: the task's EvalOptions fields)
    score      recipes/evaluate.py    a task's scorer on predictions made elsewhere (ScoreOptions)
    generate   model.answer           one answer about one image
    params     model.build_meta       trainable parameters at any shape, no weights
    ablate     recipes/ablate.py      the paper's ablation tables, row by row, on a task of this machine
    data       tasks/shapes.py        the demo's synthetic ScienceQA
    bench      bench/                 efficiency against the peers (Table V)
    serve      web.py                 the Gradio page: ask about an image, see where the fusion looked
    import-released / export-released   released.py   the authors' checkpoints in and out

Bad input (an InputError, ademvl/files.py, or another ValueError / FileNotFoundError raised by a
`raise` of ademvl's own code, with the file and the fix) is printed in one line without a
traceback and exits with status 2; `--debug` (or ADEMVL_DEBUG=1) adds the traceback. Anything
else, a library's ValueError included, is a bug and shows its traceback. docs/errors.md lists
the cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import linecache
import os
import sys
import traceback
import types
import typing
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import tasks
from .files import InputError, read_json

RELEASED_EXTRA = "the released code also builds an adapter on the last vision block, which never runs"


# ---- task options from their dataclasses ------------------------------------------------------
def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per field of an options dataclass; the field's metadata['help'] is its help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, typ, helptext = "--" + f.name.replace("_", "-"), hints[f.name], f.metadata.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        args = typing.get_args(typ)
        if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:  # X | None
            typ = next(a for a in args if a is not type(None))
            args = typing.get_args(typ)
        if typ is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", help=helptext)
        elif typing.get_origin(typ) is list:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            parser.add_argument(flag, dest=f.name, nargs="+", type=args[0], default=default, help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, type=typ, required=required,
                                default=None if required else f.default, help=helptext)


def options_of(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="directory written by save_pretrained / ademvl train")
    p.add_argument("--llm", default=None, help="override the base LLM recorded in the checkpoint")
    p.add_argument("--vision", default=None, help="override the vision tower recorded in the checkpoint")


def _load_model(args: argparse.Namespace, device: str = "cpu") -> Any:
    import torch

    from .model import AdemVLModel

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return AdemVLModel.from_pretrained(args.checkpoint, llm=args.llm, vision=args.vision).to(device)


# ---- the commands ---------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .config import config_path
    from .files import output_dir

    output_dir(args.out, "--out")
    config = args.config or str(config_path("demo" if args.task == "shapes" else "demo_emoji"))
    if args.task == "emoji":
        from .recipes.demo_emoji import run_emoji_demo

        report = run_emoji_demo(args.out, config, args.seed, args.overrides, args.batch_size, args.eval_images)
        tr = report["results"]["trained"]
        print(f"held-out Twemoji: naming exact {tr['naming_exact']:.1f}%, token F1 {tr['naming_token_f1']:.1f}%; multiple "
              f"choice name {tr['mc_name']:.1f}%, group {tr['mc_group']:.1f}%, subgroup {tr['mc_subgroup']:.1f}%; "
              f"total {report['times']['total_s'] / 60:.1f} min; report: {Path(args.out) / 'report.md'}")
        return 0
    from .recipes.demo import run_demo

    report = run_demo(args.out, config, args.n, args.seed, args.overrides, args.batch_size)
    res = report["results"]
    print(f"image questions: {res['trained']['per_type']['image_questions']:.1f}% "
          f"(blanked {res['images_blanked']['per_type']['image_questions']:.1f}%, "
          f"untrained {res['untrained']['per_type']['image_questions']:.1f}%); "
          f"total {report['times']['total_s'] / 60:.1f} min; report: {Path(args.out) / 'report.md'}")
    print(f"vision tower: {report['models']['vision']} ({report['models']['vision_weights']})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_run_config
    from .recipes.train import train_and_report

    named = [f"train.{k}={v}" for k, v in (("output_dir", args.output_dir), ("max_steps", args.max_steps),
                                           ("seed", args.seed)) if v is not None]
    return train_and_report(load_run_config(args.config, [*args.overrides, *named]), args.resume)


def cmd_eval(args: argparse.Namespace) -> int:
    from .files import output_dir
    from .recipes.evaluate import evaluate

    task = tasks.get(args.task, evaluable=True)
    opts = options_of(task.EvalOptions, args)
    if getattr(opts, "protocol", "ademvl") == "ademvl" and (Path(args.checkpoint) / "released.json").exists():
        warnings.warn(f"{args.checkpoint} was imported from the authors' release; it was trained on their token "
                      "layout: evaluate it with --protocol released (docs/released.md)", stacklevel=2)
    if args.out:
        output_dir(args.out, "--out")  # before the slow part
    samples = task.eval_samples(opts)  # bad data stops here, before the model loads
    r = evaluate(_load_model(args, args.device), args.task, opts, args.out, args.batch_size, samples, args.precision)
    if r.scores is not None:
        title = getattr(opts, "split", "") + (" blank" if getattr(opts, "blank_images", False) else "")
        print(task.format_scores(r.scores, title))
    print(r.summary + (f"; wrote {args.out}/" if args.out else ""))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .files import write_json
    from .recipes.evaluate import score

    task = tasks.get(args.task, evaluable=True)
    scores = score(args.task, options_of(task.ScoreOptions, args))
    print(task.format_scores(scores, getattr(args, "split", None) or ""))
    if args.out:
        write_json(args.out, scores, indent=2)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .images import load_image

    image = load_image(args.image, missing_hint="check the --image path") if args.image else None  # before the slow part
    torch.manual_seed(args.seed)
    model = _load_model(args)
    kwargs: dict[str, Any] = dict(num_beams=args.num_beams, do_sample=args.temperature > 0)
    if args.temperature > 0:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    print(model.answer([image], [args.prompt], max_new_tokens=args.max_new_tokens, **kwargs)[0])
    return 0


def cmd_import_released(args: argparse.Namespace) -> int:
    from .released import describe_import, import_released

    print(describe_import(import_released(args.checkpoint, args.llm, args.vision, args.out)))
    return 0


def cmd_export_released(args: argparse.Namespace) -> int:
    from .released import export_released

    out = export_released(args.checkpoint, args.out)
    print(f"wrote {out} (released layout: 'model' with their names, 'args'; loadable by their eval_*.py)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .web import serve

    return serve(args.checkpoint, args.host, args.port, args.llm, args.vision, args.examples)


def param_report(llm: str, vision: str, scales: list[int] | None = None, vision_layer: int | None = None,
                 adapter_dim: int | None = None) -> list[str]:
    """Lines of `ademvl params`: groups, the released code's count, and `trainable: N` last."""
    from .config import AdemVLConfig
    from .model import build_meta

    given = {"scales": tuple(scales) if scales is not None else None, "vision_layer": vision_layer, "adapter_dim": adapter_dim}
    model = build_meta(llm, vision, AdemVLConfig(**{k: v for k, v in given.items() if v is not None}))
    base, groups = model.config.base, model.parameter_groups()
    total = sum(groups.values())
    lines = [f"LLM {llm}: d={base['hidden_size']}, {base['num_layers']} layers (frozen); "
             f"vision {vision}: width {base['vision_width']}, "
             f"{len(model.tower.blocks())} of {base['vision_blocks']} blocks run (frozen)"
             + (f", a {model.tower.side}x{model.tower.side} grid at {model.preprocess.size} px" if model.tower.kind == "grid" else ""),
             f"visual tokens N = {' + '.join(map(str, model.config.scales))} = {model.config.num_visual_tokens}"]
    lines += [f"  {name:<16} {n:>12,}" for name, n in groups.items()]
    if len(model.vision_adapters) and model.config.vision_layer == -2 and model.tower.kind == "vit":
        per_block = sum(p.numel() for p in model.vision_adapters[0].parameters())
        lines.append(f"released code: {total + per_block} ({RELEASED_EXTRA}: +{per_block}; we build no dead parameters)")
    lines.append(f"trainable: {total}")
    return lines


def cmd_params(args: argparse.Namespace) -> int:
    if args.table:  # the paper's ablation rows, at LLaMA-7B + ViT-L/14 unless other shapes are given
        from .config import AdemVLConfig
        from .recipes.ablate import param_table

        given = {"vision_layer": args.vision_layer, "adapter_dim": args.adapter_dim}
        base = AdemVLConfig(**{k: v for k, v in given.items() if v is not None})
        print("\n".join(param_table(args.table, args.llm_config or "llama-7b", args.vision_config or "clip-vit-large-patch14", base)))
        return 0
    print("\n".join(param_report(args.llm_config or "smollm2-135m-instruct", args.vision_config or "demo-clip",
                                  args.scales, args.vision_layer, args.adapter_dim)))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from .recipes.ablate import TABLES, Plan, run_ablation

    tables = list(TABLES) if "all" in args.table else list(dict.fromkeys(args.table))
    plan = Plan(tables, task=args.task, seeds=args.seeds, out=args.out, config=args.config, overrides=list(args.overrides),
                data=args.data, n=args.n, steps=args.steps, rows=args.rows, split=args.split, limit=args.limit,
                jobs=args.jobs, batch_size=args.batch_size, run=not args.tables_only)
    for path in run_ablation(plan):
        print(f"wrote {path}")
    return 0


def cmd_synth_shapes(args: argparse.Namespace) -> int:
    from .files import output_dir
    from .tasks.shapes import write_dataset

    out = write_dataset(output_dir(args.out, "--out"), args.n, args.seed, args.shuffle_choices)
    splits = read_json(out / "pid_splits.json", "the split lists just written")
    print(f"wrote {sum(map(len, splits.values()))} problems to {out} "
          f"(train {len(splits['train'])}, val {len(splits['val'])}, test {len(splits['test'])})")
    return 0


def cmd_data_emoji(args: argparse.Namespace) -> int:
    from .emoji import build
    from .files import output_dir
    from .tasks.emoji import layout_splits

    corpus = build(output_dir(args.out, "--out"), args.vendors, args.size, args.seed, args.workers)
    sizes = {k: len(v) for k, v in layout_splits(corpus).items()}
    print(f"wrote {len(corpus.items)} images of {len(corpus.concepts)} concepts to {args.out} ("
          + ", ".join(f"{k} {v}" for k, v in sizes.items()) + f"); contact sheet: {Path(args.out) / 'contact_sheet.png'}")
    return 0


# ---- the parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .config import config_path

    parser = argparse.ArgumentParser(prog="ademvl", description="ADEM-VL: teach a frozen LLM to see, cheaply.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="synthetic ScienceQA -> train -> evaluate -> runs/demo/report.md (CPU, ~13 min); "
                                    "--task emoji: the emoji corpus, evaluated on a held-out art style (needs hours of CPU training: docs/emoji.md)",
                       description="Config keys can be overridden as in `ademvl train`: --train.max_steps 50 ...")
    # shapes stays the default until the emoji demo reaches its targets (docs/emoji.md): a user's first
    # command must end in a model that works.
    p.add_argument("--task", choices=("emoji", "shapes"), default="shapes",
                   help="shapes: synthetic ScienceQA of coloured shapes; emoji: real emoji artwork, held-out Twemoji "
                        "(its 15 minutes on a 2-core CPU stay at chance: docs/emoji.md)")
    p.add_argument("--out", default="runs/demo", help="output directory (checkpoint/, report.md, report.json, figures)")
    p.add_argument("--config", default=None, help="training config (default: the shipped demo_emoji.yaml / demo.yaml)")
    p.add_argument("--n", type=int, default=4000, help="shapes: problems to generate (10%% are the test split)")
    p.add_argument("--eval-images", type=int, default=300, help="emoji: held-out images drawn per evaluation set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    p.set_defaults(func=cmd_demo, accepts_overrides=True)

    p = sub.add_parser("train", help="train ADEM-VL from a YAML config (Accelerate; torchrun/accelerate launch for many GPUs)",
                       description="Any config key can be overridden: --train.batch_size 4 --model.beta 0.1 data.root=DIR")
    p.add_argument("--config", required=True, help="YAML file with model:, data:, train: sections, or a shipped "
                                                   "config's name (demo, tiny, scienceqa_llama7b, ...)")
    p.add_argument("--output-dir", help="where checkpoints and logs go (train.output_dir)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (train.max_steps)")
    p.add_argument("--resume", help="a checkpoint directory, or 'auto' for the newest in the output directory")
    p.add_argument("--seed", type=int, help="train.seed")
    p.set_defaults(func=cmd_train, accepts_overrides=True)

    p = sub.add_parser("eval", help="evaluate a checkpoint with a task's protocol (ScienceQA, COCO captions, MME)")
    esub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    for name in tasks.EVAL_TASKS:
        cls = tasks.get(name, evaluable=True).EvalOptions
        q = esub.add_parser(name, help=cls.__doc__.split("\n")[0])
        _model_args(q)
        add_options(q, cls)
        q.add_argument("--out", default=None, help="output directory")
        q.add_argument("--batch-size", type=int, default=16)
        q.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
        q.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                       help="generation in fp32, or in bf16 autocast (auto: bf16 on a GPU or a CPU that computes in bf16)")
        q.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="score predictions made elsewhere (ScienceQA, COCO captions, MME)")
    ssub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    for name in tasks.EVAL_TASKS:
        cls = tasks.get(name, evaluable=True).ScoreOptions
        q = ssub.add_parser(name, help=cls.__doc__.split("\n")[0])
        add_options(q, cls)
        q.add_argument("--out", default=None, help="write the scores as JSON")
        q.set_defaults(func=cmd_score)

    g = sub.add_parser("generate", help="answer a prompt about an image with a trained checkpoint")
    _model_args(g)
    g.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("params", help="count trainable parameters (built on the meta device: 7B/13B cost nothing)")
    p.add_argument("--llm-config", default=None,
                   help="config.json path or preset (llama-7b, llama-13b, llama2-7b, smollm2-135m-instruct, tiny-llama, ...); "
                        "default smollm2-135m-instruct, with --table llama-7b")
    p.add_argument("--vision-config", default=None,
                   help="config.json path or preset (clip-vit-large-patch14, demo-clip, tiny-clip, mobilenet-v2, ...); "
                        "default demo-clip, with --table clip-vit-large-patch14")
    p.add_argument("--table", choices=("VI", "VII", "VIII", "IX", "X"), default=None,
                   help="each row of one of the paper's ablation tables, beside the paper's counts (docs/ablations.md)")
    p.add_argument("--scales", type=int, nargs="+", default=None, help="visual token scales (default 256 64)")
    p.add_argument("--vision-layer", type=int, default=None,
                   help="which hidden state of the tower to read (default -2; the demo's MobileNetV2 stage: -12)")
    p.add_argument("--adapter-dim", type=int, default=None,
                   help="vision adapter width (default 12; 0 = no vision adapters, as the demo's MobileNetV2)")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("ablate", help="the paper's ablation tables (VI-X) on a task of this machine: train and "
                                      "evaluate each row, resumable; tables + plots beside the paper's numbers",
                       description="Each row is a setting of AdemVLConfig (docs/ablations.md). Rows change --config "
                                   "(default: the demo's); more section.key=value overrides may follow.")
    p.add_argument("--table", nargs="+", choices=("VI", "VII", "VIII", "IX", "X", "all"), default=["all"])
    p.add_argument("--task", default="shapes", help="shapes (synthetic) or emoji (the corpus of `ademvl data emoji`); made under OUT/data unless --data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; each row runs once per seed")
    p.add_argument("--out", default="runs/ablate", help="output directory: jobs/, table_*.md, table_*.png (rerun to resume)")
    p.add_argument("--config", default="demo", help="the run config the rows change (shipped name or path)")
    p.add_argument("--data", default=None, help="a ScienceQA-layout directory to use instead (e.g. an emoji corpus built before)")
    p.add_argument("--n", type=int, default=4000, help="shapes problems to make (80/10/10 train/val/test)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per row (a short schedule)")
    p.add_argument("--rows", type=int, nargs="+", default=None, help="only these rows (1-based) of each table")
    p.add_argument("--split", default="test", help="the split each row is evaluated on")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems (quick checks)")
    p.add_argument("--jobs", type=int, default=None, help="jobs side by side (default: 2 on a CPU, one thread each; 1 on a GPU)")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    p.add_argument("--tables-only", action="store_true", help="write the tables from the jobs finished so far; run nothing")
    p.set_defaults(func=cmd_ablate, accepts_overrides=True)

    p = sub.add_parser("data", help="make datasets")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    s = dsub.add_parser("synth-shapes", help="synthetic ScienceQA of coloured shapes, in the released layout")
    s.add_argument("--out", required=True, help="output directory (problems.json, pid_splits.json, images/)")
    s.add_argument("--n", type=int, default=4000, help="number of problems (80/10/10 train/val/test)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shuffle-choices", action="store_true",
                   help="shuffle each problem's option list (harder: the small LLM must read the options)")
    s.set_defaults(func=cmd_synth_shapes)
    from .emoji import SIZE, VENDORS

    s = dsub.add_parser("emoji", help="emoji artwork of 7 vendor sets with CLDR names (npm packages, rendered once)")
    s.add_argument("--out", required=True, help="output directory (images, COCO/ScienceQA/LLaVA layouts, LICENSES.md)")
    s.add_argument("--vendors", nargs="+", default=list(VENDORS), help="vendor sets (default: all)")
    s.add_argument("--size", type=int, default=SIZE, help="rendered image size in pixels")
    s.add_argument("--seed", type=int, default=0, help="seed of the unseen concepts and the options' order")
    s.add_argument("--workers", type=int, default=2, help="rendering processes")
    s.set_defaults(func=cmd_data_emoji)

    p = sub.add_parser("import-released", help="turn the authors' released .pth into an ademvl checkpoint",
                       description="Reads checkpoint_7B_{sqa,caption,instruction}.pth (Hao840/ADEM-VL) safely, maps "
                                   "its tensors onto ours (docs/released.md), checks them against the base models "
                                   "and writes adapter.safetensors + ademvl_config.json.")
    p.add_argument("checkpoint", help="the released .pth file")
    p.add_argument("--llm", required=True, help="the LLaMA it was trained on, HF format (e.g. huggyllama/llama-7b)")
    p.add_argument("--vision", required=True, help="the CLIP tower (e.g. openai/clip-vit-large-patch14)")
    p.add_argument("--out", required=True, help="directory to write")
    p.set_defaults(func=cmd_import_released)

    p = sub.add_parser("export-released", help="write an ademvl checkpoint in the authors' .pth layout")
    p.add_argument("--checkpoint", required=True, help="directory written by save_pretrained / ademvl train / import-released")
    p.add_argument("--out", required=True, help="the .pth file to write")
    p.set_defaults(func=cmd_export_released)

    p = sub.add_parser("serve", help="a web page to ask a checkpoint about an image and see where it looked")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--examples", default=None,
                   help="ScienceQA-layout data whose test images are offered as examples "
                        "(default: the checkpoint's sibling data/, as `ademvl demo` writes it)")
    p.set_defaults(func=cmd_serve)

    from .bench import add_parser as add_bench

    add_bench(sub)
    return parser


# ---- errors and warnings ----------------------------------------------------------------------
PACKAGE_DIR = Path(__file__).resolve().parent
DEBUG_HELP = "on bad input, show the traceback too (also: ADEMVL_DEBUG=1)"


def add_debug_flag(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """--debug on the parser and every subcommand's, so it may come anywhere on the line."""
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS, help=DEBUG_HELP)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                add_debug_flag(sub, top=False)


def is_bad_input(e: BaseException) -> bool:
    """An InputError, or a ValueError / FileNotFoundError that a `raise` line in ademvl wrote.

    A ValueError that a library or a Python builtin raised (json, int(), torch, safetensors) is a
    bug here, or a read that does not go through ademvl/files.py yet: it keeps its traceback.
    """
    if isinstance(e, InputError):
        return True
    if not isinstance(e, (ValueError, FileNotFoundError)) or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:  # the frame that raised it
        tb = tb.tb_next
    filename = Path(tb.tb_frame.f_code.co_filename)
    line = linecache.getline(str(filename), tb.tb_lineno).strip()
    return filename.resolve().is_relative_to(PACKAGE_DIR) and line.startswith("raise ")


def worker_message(message: str) -> str:
    """The message alone of an error re-raised from a DataLoader worker, without the worker's traceback."""
    if "DataLoader worker" in message and "Traceback (most recent call last)" in message:
        last = message.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


@contextmanager
def short_warnings(command: str) -> Iterator[None]:
    """ademvl's own warnings as one line `ademvl CMD: warning: ...` (a library's keep their form)."""
    original = warnings.formatwarning

    def fmt(message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
        if Path(filename).resolve().is_relative_to(PACKAGE_DIR) and issubclass(category, UserWarning):
            return f"ademvl {command}: warning: {message}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = fmt
    try:
        yield
    finally:
        warnings.formatwarning = original


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    add_debug_flag(parser)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):  # train and demo take section.key overrides
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    debug = args.debug or os.environ.get("ADEMVL_DEBUG", "") not in ("", "0")
    with short_warnings(args.command):
        try:
            return int(args.func(args) or 0)
        except (ValueError, FileNotFoundError) as e:
            if not is_bad_input(e):
                raise  # a bug: its traceback is what a fix needs
            if debug:
                traceback.print_exc()
            # bad input: say what and how to fix, no traceback
            print(f"ademvl {args.command}: error: {worker_message(str(e))}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
