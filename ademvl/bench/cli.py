"""`ademvl bench`: the command line over `run_bench` and `flops_at_depth`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .baselines import METHODS
from .flops import flops_at_depth
from .report import flops_markdown
from .run import DTYPES, PRECISIONS, BenchSettings, run_bench

D = BenchSettings()  # the defaults


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="efficiency of ADEM-VL against its peers (Table V): time, FLOPs, memory")
    p.add_argument("--out", required=True, help="directory for bench.json, bench.md, bench.png")
    p.add_argument("--llm", default=D.llm, help="LLM name (random:llama-7b for the paper's shape)")
    p.add_argument("--vision", default=D.vision, help="vision tower (random:clip-vit-large-patch14 for the paper's)")
    p.add_argument("--batch", type=int, default=D.batch)
    p.add_argument("--text-len", type=int, default=D.text_len, help="text tokens per sample (without any visual token)")
    p.add_argument("--new-tokens", type=int, default=D.new_tokens, help="greedy new tokens per generation (>= 2)")
    p.add_argument("--rounds", "--repeats", dest="repeats", type=int, default=D.repeats,
                   help="timed rounds: medians are reported, with each figure's min, max and spread; a target whose "
                        "rounds do not decide it is 'not decided (noisy)': more rounds measure longer")
    p.add_argument("--warmup", type=int, default=D.warmup, help="untimed rounds first")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--dtype", choices=tuple(DTYPES), default=D.dtype,
                   help="the weights' dtype (bf16: all weights stored in bf16, as on a GPU)")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=D.precision,
                   help="what the steps compute in, side by side: fp32, and/or bf16 autocast over the fp32 weights "
                        "(as `ademvl train` runs it on a CPU or GPU with bf16)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=D.device)
    p.add_argument("--compile", action="store_true", help="run ADEM-VL's fusion through torch.compile")
    p.add_argument("--scales", type=int, nargs="+", default=None, help="ADEM-VL's visual token scales (default 256 64)")
    p.add_argument("--flops-text-len", type=int, default=D.flops_text_len, help="text length of the FLOPs count (the paper's: 256)")
    p.add_argument("--lora-rank", type=int, default=D.lora_rank, help="LoRA rank of the LLaVA-style peer")
    p.add_argument("--no-fusion", dest="fusion", action="store_false", help="skip the fusion-op micro-benchmark")
    p.add_argument("--fusion-layers", type=int, default=None, help="layers in the fusion micro-benchmark (default: the LLM's)")
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--profile", action="store_true", help="also write profile.txt: top ops of one training step per method")
    p.add_argument("--clock", choices=("wall", "cpu"), default=D.clock,
                   help="wall seconds, or this process's CPU seconds (steadier on a shared machine; use 1 thread)")
    p.add_argument("--flops-only", action="store_true",
                   help="only FLOPs per new token and parameter counts at the LLM's full depth, from 1- and 2-layer "
                        "models of its width (a 7B shape on a CPU); writes flops.json and flops.md")
    p.set_defaults(func=run)


def settings_from(args: argparse.Namespace) -> BenchSettings:
    """The BenchSettings of parsed arguments (every field is the flag of the same name)."""
    import dataclasses

    return BenchSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchSettings)})


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.flops_only:
        return run_flops_only(settings, Path(args.out))
    run_bench(settings, args.out)
    print((Path(args.out) / "bench.md").read_text())
    return 0


def run_flops_only(s: BenchSettings, out: Path) -> int:
    config = s.config()
    rows = flops_at_depth(s.llm, s.vision, config, s.methods, s.flops_text_len, s.lora_rank, s.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flops.json").write_text(json.dumps(rows, indent=2) + "\n")
    command = (f"ademvl bench --out {out} --llm {s.llm} --vision {s.vision} --flops-only "
               f"--scales {' '.join(map(str, config.scales))} --flops-text-len {s.flops_text_len}")
    if s.methods != list(METHODS):
        command += f" --methods {' '.join(s.methods)}"
    (out / "flops.md").write_text(flops_markdown(rows, command))
    print((out / "flops.md").read_text())
    return 0
