"""`ademvl bench`: ADEM-VL's cost next to its peers, in one run on one machine (the paper's Table V).

Every method of `baselines` runs on twins of the same frozen LLM and vision tower and reads the
same batch. For each it measures

    train_step_s          forward + backward + optimizer step, s/batch (median)
    prefill_s, decode_s   greedy generation with the KV cache: the prompt (image included), then
                          new_tokens - 1 cached steps; decode_tokens_per_s = B (new_tokens - 1) / decode_s
    flops_per_token       FLOPs to make one new token for one sample at text length 256 without a
                          cache (a full forward, image encoding included; torch's FlopCounterMode,
                          2 per multiply-add) -- the paper's "FLOPs per new token"
    peak_mem_mb           memory a training step needs above what was held before it
    trainable_params, extra_tokens

The package, in the order a run uses it:

    peer.py       the interface of a method under benchmark, the shared batch, `twin`
    baselines.py  the methods: text-only, ADEM-VL, the released code's fusion, MemVP, LLaVA + LoRA
    measure.py    interleaved timing, peak memory, a training step, cached generation, the profile
    flops.py      FLOPs per new token (FlopCounterMode), at any depth from 1- and 2-layer models
    fusion_op.py  the fusion op alone against the released code's, with a check that they agree
    run.py        `BenchSettings` and `run_bench`: one run, one row per method
    report.py     bench.md / flops.md / bench.png: Table V form, ratios, the stated targets
    cli.py        `ademvl bench`

Outputs under --out: bench.json (a list of rows, one per method), bench.md, bench.png; with
--profile also profile.txt. `--flops-only` counts FLOPs and parameters at full depth (flops.json,
flops.md): the paper's 7B shape on a CPU.
"""

from .baselines import METHODS, build_peer, build_peers
from .cli import add_parser
from .flops import flops_at_depth
from .run import BenchSettings, run_bench

__all__ = ["METHODS", "BenchSettings", "add_parser", "build_peer", "build_peers", "flops_at_depth", "run_bench"]
