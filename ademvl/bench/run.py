"""One benchmark run: every method on twins of one LLM and tower, timed interleaved (`run_bench`)."""

from __future__ import annotations

import dataclasses
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import hub
from ..config import AdemVLConfig
from .baselines import METHODS, build_peers
from .flops import flops_per_token
from .fusion_op import decode_bench, fusion_bench
from ..precision import cpu_computes_bf16
from .measure import CLOCKS, describe_machine, generation_times, interleaved, peak_memory, profile_step, timed, train_step
from .peer import make_batch
from .report import write_outputs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRECISIONS = ("fp32", "bf16")  # what the steps compute in: fp32, or bf16 autocast over the fp32 weights
ROW_KEYS = ("method", "precision", "train_step_s", "decode_tokens_per_s", "flops_per_token", "peak_mem_mb",
            "trainable_params", "extra_tokens")
# The timed figures: each keeps its rounds (KEY_rounds), their min and max (KEY_min, KEY_max) and
# their spread (KEY_spread = (max - min) / median); KEY itself is the median.
TIMED = ("train_step_s", "prefill_s", "decode_s", "generate_s", "decode_tokens_per_s")


@dataclass
class BenchSettings:
    """What one `ademvl bench` run measures; every field is the CLI flag of the same name."""

    llm: str = hub.EMBEDDED_LLM  # random:llama-7b for the paper's shape
    vision: str = hub.EMBEDDED_VISION  # random:clip-vit-large-patch14 for the paper's
    batch: int = 8
    text_len: int = 128  # text tokens per sample, without any visual token
    new_tokens: int = 32  # greedy new tokens per generation: one from the prefill, the rest cached steps
    repeats: int = 3  # timed rounds (`--rounds`; medians, min and max are reported)
    warmup: int = 1  # untimed rounds first
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    dtype: str = "fp32"  # the weights' dtype (bf16: everything stored in bf16, as on a GPU)
    precision: list[str] = field(default_factory=lambda: ["fp32"])  # fp32 and/or bf16 autocast, side by side
    device: str = "cpu"
    compile: bool = False  # ADEM-VL's fusion through torch.compile
    scales: tuple[int, ...] | None = None  # ADEM-VL's visual token scales (None: the config's, 256 64)
    flops_text_len: int = 256  # text length of the FLOPs count (the paper's)
    lora_rank: int = 8  # of the LLaVA-style peer
    fusion: bool = True  # run the fusion-op micro-benchmark
    fusion_layers: int | None = None  # layers in it (None: the LLM's)
    seed: int = 0
    profile: bool = False  # also write profile.txt: top ops of one training step per method
    clock: str = "wall"  # or "cpu": process CPU seconds (measure.CLOCKS), for a shared machine

    def __post_init__(self) -> None:
        self.methods = list(dict.fromkeys(self.methods))
        self.precision = list(dict.fromkeys(self.precision))
        self.scales = tuple(self.scales) if self.scales else None

    def check(self) -> None:
        """Name a bad setting by its flag before anything is built."""
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise ValueError(f"--methods {' '.join(self.methods)}: choose among {', '.join(METHODS)}")
        if self.new_tokens < 2:
            raise ValueError(f"--new-tokens {self.new_tokens}: need at least 2 (one from the prefill, one decode step)")
        if self.repeats < 1 or self.warmup < 0 or self.batch < 1 or self.text_len < 2 or self.flops_text_len < 2:
            raise ValueError("need --repeats >= 1, --warmup >= 0, --batch >= 1, --text-len >= 2 and --flops-text-len >= 2")
        if self.clock not in CLOCKS:
            raise ValueError(f"--clock {self.clock}: choose one of {', '.join(CLOCKS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        if not self.precision or any(p not in PRECISIONS for p in self.precision):
            raise ValueError(f"--precision {' '.join(self.precision)}: choose among {', '.join(PRECISIONS)}")
        if self.dtype != "fp32" and self.precision != ["fp32"]:
            raise ValueError(f"--precision {' '.join(self.precision)} with --dtype {self.dtype}: --precision bf16 is "
                             "bf16 autocast over fp32 weights, --dtype bf16 stores them in bf16 already; use one")
        if self.compile and self.warmup < 1:
            raise ValueError("--compile needs --warmup >= 1: the first calls compile, and must not be timed")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device}: choose cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible to torch; use --device cpu")
        shape = hub.shape_config(self.vision)
        if not hasattr(shape, "patch_size"):
            raise ValueError(f"--vision {self.vision}: the bench takes a ViT tower (CLIP or SigLIP), whose patch tokens "
                             "the LLaVA-style and MemVP baselines read; a CNN grid tower is not benchmarked yet")
        grid = (shape.image_size // shape.patch_size) ** 2
        if max(self.config().scales) > grid:
            raise ValueError(f"--scales {' '.join(map(str, self.config().scales))}: the tower {self.vision} gives a grid "
                             f"of {grid} patches; pass scales no larger than that (e.g. --scales {grid} {grid // 4})")

    def config(self) -> AdemVLConfig:
        return AdemVLConfig(llm=self.llm, vision=self.vision, **({"scales": self.scales} if self.scales else {}))

    def command(self, out: str | Path) -> str:
        """The `ademvl bench` command that reproduces this run: every setting that is not the default."""
        parts = ["ademvl bench", f"--out {out}"]
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name == "scales":
                value, default = self.config().scales, None  # always written: the run's real scales
            if value == default:
                continue
            if isinstance(value, bool):
                parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
            elif isinstance(value, (list, tuple)):
                parts.append(f"{flag} {' '.join(map(str, value))}")
            else:
                parts.append(f"{flag} {value}")
        return " ".join(parts)


def _load(llm_name: str, vision_name: str, device: torch.device, dtype: torch.dtype):
    """Base models, built on the device directly (a random 7B never passes through CPU memory)."""
    with torch.device(device):
        llm = hub.load_llm(llm_name, dtype=dtype)
        vision = hub.load_vision(vision_name, dtype=dtype)
    return llm.to(device), vision.to(device)


def run_bench(settings: BenchSettings, out: str | Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Measure every method in one run; returns one row per method (and writes files under `out`)."""
    s = settings
    s.check()
    dev, tdtype, config, methods = torch.device(s.device), DTYPES[s.dtype], s.config(), s.methods
    clock = CLOCKS[s.clock]
    base_llm, base_vision = _load(s.llm, s.vision, dev, tdtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peers = build_peers(base_llm, base_vision, config, tuple(methods), s.lora_rank,
                            dtype=None if tdtype == torch.float32 else tdtype, seed=s.seed)
    if s.compile and "adem-vl" in peers:
        peers["adem-vl"].model.memory.compile()  # static shapes: see VisualMemory.compile
    if "bf16" in s.precision and dev.type == "cpu" and not cpu_computes_bf16():
        warnings.warn("--precision bf16 on a CPU without bf16 instructions (no avx512_bf16 / amx_bf16 flag): torch "
                      "emulates bf16 there, and its rows will be many times slower than fp32's", stacklevel=2)
    optimizers = {m: (torch.optim.AdamW(p.trainable_parameters(), lr=1e-5, weight_decay=0.02)
                      if p.trainable_parameters() else None) for m, p in peers.items()}
    vocab, bos, image_size = base_llm.config.vocab_size, base_llm.config.bos_token_id, base_vision.config.image_size
    data = make_batch(vocab, s.batch, s.text_len, image_size, bos, s.seed, dev, tdtype)
    data1 = make_batch(vocab, 1, s.flops_text_len, image_size, bos, s.seed, dev, tdtype)
    # every (method, precision) pair is one entry of the interleaved rounds, methods side by side
    pairs = [(m, p) for m in methods for p in s.precision]

    def train(pair: tuple[str, str]) -> float:
        m, p = pair
        peers[m].train()
        return timed(lambda: train_step(peers[m], optimizers[m], data, p), dev, clock)

    def generate(pair: tuple[str, str]) -> tuple[float, float]:
        m, p = pair
        peers[m].eval()
        return generation_times(peers[m], data, s.new_tokens, dev, clock, p)

    train_t = interleaved(pairs, s.warmup, s.repeats, train, "train steps", progress)
    gen_t = interleaved(pairs, s.warmup, s.repeats, generate, "generation", progress)

    fusion_row: dict[str, Any] = {}
    if s.fusion and any(m.startswith("adem-vl") for m in methods):
        fusion_row = fusion_bench(s.batch, s.text_len + int(config.use_cls), config.num_visual_tokens,
                                  base_llm.config.hidden_size, s.fusion_layers or base_llm.config.num_hidden_layers,
                                  config, repeats=s.repeats, warmup=s.warmup, device=dev, dtype=tdtype,
                                  compile=s.compile, seed=s.seed, progress=progress, clock=clock)
        fusion_row |= decode_bench(s.batch, s.text_len + int(config.use_cls), config.num_visual_tokens,
                                   base_llm.config.hidden_size, config.hidden_proj,
                                   s.fusion_layers or base_llm.config.num_hidden_layers, config, repeats=s.repeats,
                                   warmup=s.warmup, device=dev, seed=s.seed, progress=progress, clock=clock)

    flops: dict[str, dict[str, Any]] = {}
    for m in tqdm(methods, desc="FLOPs", unit="method", disable=not progress):
        flops[m] = flops_per_token(peers[m].eval(), data1)

    if s.profile and out is not None:  # where a step's time goes, op by op (before mallopt below)
        Path(out).mkdir(parents=True, exist_ok=True)
        tables = [f"## {m}, {p}\n\n{profile_step(peers[m], optimizers[m], data, dev, precision=p)}"
                  for m, p in tqdm(pairs, desc="profile", unit="method", disable=not progress)]
        (Path(out) / "profile.txt").write_text("\n\n".join(tables) + "\n")

    peak: dict[tuple[str, str], float | None] = {}
    for m, p in tqdm(pairs, desc="peak memory", unit="method", disable=not progress):  # last: it sets mallopt
        peers[m].train()
        with peak_memory(dev) as mem:
            train_step(peers[m], optimizers[m], data, p)
        peak[m, p] = mem["mb"]

    shown = {"llm": s.llm, "vision": s.vision, "device": describe_machine(dev), "dtype": s.dtype, "batch": s.batch,
             "text_len": s.text_len, "new_tokens": s.new_tokens, "repeats": s.repeats, "warmup": s.warmup,
             "flops_text_len": s.flops_text_len, "scales": list(config.scales), "compile": s.compile,
             "lora_rank": s.lora_rank, "torch": torch.__version__, "clock": s.clock}
    rows = []
    for m, p in pairs:
        row = summarize(m, train_t[m, p], gen_t[m, p], s.batch, s.new_tokens) | {
            # with --dtype bf16 the steps run in bf16 without autocast: say so, not "fp32"
            "precision": p if s.dtype == "fp32" else f"{s.dtype} weights",
            "flops_per_token": flops[m]["flops_per_token"], "peak_mem_mb": peak[m, p],
            "trainable_params": peers[m].num_trainable(), "extra_tokens": peers[m].extra_tokens,
            "decode_flops_per_token": flops[m]["decode_flops_per_token"], "flops_by_op": flops[m]["flops_by_op"]}
        if m in ("adem-vl", "adem-vl-reference") and fusion_row:
            row.update(fusion_row)
        rows.append(row | shown)
    if out is not None:
        write_outputs(rows, out, s.command(out))
    return rows


def summarize(method: str, train_times: list[float], generation: list[tuple[float, float]], batch: int,
              new_tokens: int) -> dict[str, Any]:
    """A method's timing columns from its timed rounds: each figure's median (KEY), rounds, min, max
    and spread (TIMED); decode tokens/s = B (new - 1) / decode s, round by round."""
    steps = batch * (new_tokens - 1)
    per_round = {"train_step_s": list(train_times), "prefill_s": [p for p, _ in generation],
                 "decode_s": [d for _, d in generation], "generate_s": [p + d for p, d in generation],
                 "decode_tokens_per_s": [steps / d for _, d in generation]}
    row: dict[str, Any] = {"method": method}
    for key in TIMED:
        values = per_round[key]
        median = statistics.median(values)
        row |= {key: median, f"{key}_min": min(values), f"{key}_max": max(values),
                f"{key}_spread": (max(values) - min(values)) / median, f"{key}_rounds": values}
    return row
