"""`ademvl bench`: ADEM-VL's cost next to its peers, in one run on one machine (the paper's Table V).

Every method of `ademvl.peers` runs on twins of the same frozen LLM and vision tower and reads
the same batch. For each it measures

    train_step_s          forward + backward + optimizer step, s/batch (median)
    prefill_s, decode_s   greedy generation with the KV cache: the prompt (image included), then
                          new_tokens - 1 cached steps; decode_tokens_per_s = B (new_tokens - 1) / decode_s
    flops_per_token       FLOPs to make one new token for one sample at text length 256 without a
                          cache (a full forward, image encoding included; torch's FlopCounterMode,
                          2 per multiply-add) -- the paper's "FLOPs per new token"
    peak_mem_mb           memory a training step needs above what was held before it
    trainable_params, extra_tokens

Timings: warm-up runs first, then `repeats` rounds; each round runs every method once, in an
order rotated round by round, so that drift of a shared machine spreads over all methods alike.
Medians are reported. The fusion micro-benchmark times our `fuse` against `fuse_reference` (the
released code's path) on the run's real shapes and checks that they agree.

Outputs under --out: bench.json (a list of rows, one per method), bench.md (Table V form with
ratios to text-only and to LLaVA-style, the targets of the issue), bench.png; with --profile also
profile.txt. `--flops-only` counts FLOPs and parameters at full depth from 1- and 2-layer models
(flops.json, flops.md): the paper's 7B shape on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from . import hub
from .config import AdemVLConfig
from .fusion import fuse, fuse_reference, num_dropped, qk_activation, weakest
from .peers import METHODS, Peer, build_peers, make_batch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROW_KEYS = ("method", "train_step_s", "decode_tokens_per_s", "flops_per_token", "peak_mem_mb",
            "trainable_params", "extra_tokens")
LABELS = {"text-only": "Text-only LLM", "adem-vl": "ADEM-VL (ours)", "adem-vl-reference": "ADEM-VL, released code's fusion",
          "memvp": "MemVP-style", "llava": "LLaVA-style + LoRA"}
# The targets (embedded default on a CPU, batch 8, text 128, scales (256, 64)).
TARGETS = (
    ("ADEM-VL training step <= 1.15 x text-only", "train_step_s", "text-only", "<=", 1.15),
    ("ADEM-VL decode tokens/s >= 0.90 x text-only", "decode_tokens_per_s", "text-only", ">=", 0.90),
    ("ADEM-VL training step <= 0.5 x LLaVA-style", "train_step_s", "llava", "<=", 0.5),
    ("ADEM-VL FLOPs per new token <= 0.5 x LLaVA-style", "flops_per_token", "llava", "<=", 0.5),
)
FUSION_TARGET = 1.5  # our fusion op at least this much faster than the reference path's


# ---- measuring -------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _rounds(methods: list[str], warmup: int, repeats: int) -> Iterator[tuple[int, str]]:
    """(round, method) pairs: warm-up rounds first; each round starts one method later than the last."""
    for r in range(warmup + repeats):
        for i in range(len(methods)):
            yield r, methods[(r + i) % len(methods)]


def _interleaved(methods: list[str], warmup: int, repeats: int, measure: Callable[[str], Any], desc: str,
                 progress: bool = True) -> dict[str, list[Any]]:
    """measure(method) for every method in every round (see _rounds); warm-up results are dropped."""
    results: dict[str, list[Any]] = {m: [] for m in methods}
    with tqdm(total=(warmup + repeats) * len(methods), desc=desc, unit="run", disable=not progress) as bar:
        for r, m in _rounds(methods, warmup, repeats):
            value = measure(m)
            if r >= warmup:
                results[m].append(value)
            bar.update()
    return results


def _status_mib(key: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def _cpu_peak_supported() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_mib("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Peak memory above the level at entry, in MiB, in `result["mb"]` after the block.

    CUDA: torch.cuda.max_memory_allocated (tensors only). CPU: the process's peak resident size
    (VmHWM, reset by writing 5 to /proc/self/clear_refs) above its resident size at entry. For
    that, glibc's mmap threshold is fixed at 1 MiB (mallopt), so freed large tensors go back to
    the OS instead of staying resident in the heap; this slows allocation a little, so it is
    only set for the memory pass, after all timings, and set to 32 MiB (the largest glibc would
    reach by itself) on the way out. None where neither works (not Linux).
    """
    result: dict[str, float | None] = {"mb": None}
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        _sync(device)
        result["mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    supported = _cpu_peak_supported()
    libc = None
    if supported:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, fixed (no dynamic raise)
        gc.collect()
        if libc is not None:
            libc.malloc_trim(0)
        base = _status_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    try:
        yield result
    finally:
        if libc is not None:
            libc.mallopt(-3, 32 << 20)
    if supported:
        result["mb"] = max(0.0, _status_mib("VmHWM") - base)


def _flop_mapping() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode knows the CUDA attention kernels; count the CPU one (same formula) too."""
    from torch.utils.flop_counter import sdpa_flop_count

    def cpu_sdpa(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: cpu_sdpa} if op is not None else {}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of fn() by torch's FlopCounterMode (matmuls and attention; 2 per multiply-add), and by op.

    By op, the fusion shows apart: the LLMs' linear layers are aten.mm/addmm, their attention
    the sdpa kernels, the LM head on the last position one aten.bmm, and otherwise only the
    visual-memory fusions (ADEM-VL's, MemVP's) use aten.bmm/baddbmm.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        fn()
    by_op = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), by_op


def train_step(peer: Peer, optimizer: torch.optim.Optimizer | None, batch: dict[str, Tensor]) -> float:
    """One step: forward with labels, backward, optimizer step. Returns the loss."""
    loss = peer(**batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def generation_times(peer: Peer, batch: dict[str, Tensor], new_tokens: int, device: torch.device) -> tuple[float, float]:
    """(prefill seconds, seconds of the new_tokens - 1 cached decode steps) of greedy generation."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    try:
        _sync(device)
        t0 = time.perf_counter()
        token, mask, past = peer.prefill(**inputs)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            token, mask, past = peer.decode_step(token, mask, past)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1
    finally:
        peer.release()


def flops_per_token(peer: Peer, batch1: dict[str, Tensor]) -> dict[str, Any]:
    """FLOPs of the forward that makes the first new token of one sample (no cache; by op too),
    and of one cached decode step after it."""
    inputs = {k: v for k, v in batch1.items() if k != "labels"}
    try:
        first: list[Any] = []
        prefill, by_op = count_flops(lambda: first.append(peer.prefill(**inputs)))
        step, _ = count_flops(lambda: peer.decode_step(*first[0]))
        return {"flops_per_token": prefill, "flops_by_op": by_op, "decode_flops_per_token": step}
    finally:
        peer.release()


def profile_step(peer: Peer, optimizer: torch.optim.Optimizer | None, batch: dict[str, Tensor],
                 device: torch.device, rows: int = 15) -> str:
    """torch.profiler's table of one training step, the ops with the most self time first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    peer.train()
    with profile(activities=activities) as prof:
        train_step(peer, optimizer, batch)
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# ---- the fusion op alone -----------------------------------------------------------------------
def fusion_bench(batch: int, text_len: int, n_visual: int, d: int, layers: int, config: AdemVLConfig,
                 repeats: int = 5, warmup: int = 1, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, compile: bool = False, seed: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    """Our fused path against the released code's, forward + backward through `layers` layers.

    Each layer gets its own h_n and MLP output (B, T, d); all share the keys and values (B, N, d),
    as in the model. Ours activates the keys once and runs `fuse` (partial selection,
    hand-written backward, MLP output added in the matmul); the reference re-activates the keys and
    sorts every row in every layer. Gradients flow to h_n, K, V and the MLP outputs, as in training.
    Also checks that both give the same outputs and gradients and drop the same entries.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    h = [rand(batch, text_len, d).requires_grad_() for _ in range(layers)]  # (B, T, d) per layer
    mlp = [rand(batch, text_len, d).requires_grad_() for _ in range(layers)]  # (B, T, d) per layer
    k, v = rand(batch, n_visual, d).requires_grad_(), rand(batch, n_visual, d).requires_grad_()  # (B, N, d)
    grads = [rand(batch, text_len, d) for _ in range(layers)]
    a, gamma, act = config.alpha, config.drop_ratio, config.qk_act
    leaves = [*h, *mlp, k, v]

    def ours(f: Callable[..., Tensor] = fuse) -> list[Tensor]:
        k_act = qk_activation(k, act)  # once per forward, shared by all layers
        return [f(hn, k_act, v, a, gamma, act, m) for hn, m in zip(h, mlp)]

    def reference() -> list[Tensor]:
        return [m + fuse_reference(hn, k, v, a, gamma, act) for hn, m in zip(h, mlp)]

    def fwd_bwd(forward: Callable[[], list[Tensor]]) -> list[Tensor]:
        for t in leaves:
            t.grad = None
        outs = forward()
        torch.autograd.backward(outs, grads)
        return outs

    paths: dict[str, Callable[[], list[Tensor]]] = {"fuse": ours, "reference": reference}
    if compile:
        compiled = torch.compile(fuse, dynamic=False)  # as in run_bench
        paths["compiled"] = lambda: ours(compiled)
    times: dict[str, list[float]] = {p: [] for p in paths}
    fwd_times: dict[str, list[float]] = {p: [] for p in paths}
    bar = tqdm(total=(warmup + repeats) * len(paths), desc="fusion op", unit="run", disable=not progress, leave=False)
    for r, name in _rounds(list(paths), warmup, repeats):
        t = _timed(lambda name=name: fwd_bwd(paths[name]), device)
        with torch.no_grad():
            tf = _timed(paths[name], device)
        if r >= warmup:
            times[name].append(t)
            fwd_times[name].append(tf)
        bar.update()
    bar.close()

    # Same outputs and gradients, and the same drop decisions on the same scores.
    results = {}
    for name in ("fuse", "reference"):
        outs = fwd_bwd(paths[name])
        results[name] = ([o.detach() for o in outs], [t.grad.detach().clone() for t in leaves])
    (o1, g1), (o2, g2) = results["fuse"], results["reference"]
    scale = max(float(torch.stack([x.abs().max() for x in o2]).max()), 1e-12)
    out_diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(o1, o2)) / scale
    gscale = max(float(torch.stack([x.abs().max() for x in g2]).max()), 1e-12)
    grad_diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(g1, g2)) / gscale
    with torch.no_grad():
        scores = qk_activation(h[0], act) @ qk_activation(k, act).transpose(1, 2)  # (B, T, N)
        n_drop = num_dropped(n_visual, gamma)
        if n_drop:
            thresh = torch.sort(scores, dim=-1).values[..., n_drop : n_drop + 1]  # the reference's rule
            ref_drop = scores < thresh
            idx, drop = weakest(scores, n_drop)  # ours
            our_drop = torch.zeros_like(ref_drop).scatter_(-1, idx, drop)
            same_drops = bool(torch.equal(ref_drop, our_drop))
        else:
            same_drops = True
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    med = {p: statistics.median(ts) for p, ts in times.items()}
    fwd = {p: statistics.median(ts) for p, ts in fwd_times.items()}
    out = {
        "fusion_shape": f"B={batch} T={text_len} N={n_visual} d={d} layers={layers}",
        "fusion_fwd_bwd_s": med["fuse"], "fusion_reference_fwd_bwd_s": med["reference"],
        "fusion_fwd_s": fwd["fuse"], "fusion_reference_fwd_s": fwd["reference"],
        "fusion_speedup": med["reference"] / med["fuse"], "fusion_fwd_speedup": fwd["reference"] / fwd["fuse"],
        "fusion_max_rel_diff_out": out_diff, "fusion_max_rel_diff_grad": grad_diff,
        "fusion_same_outputs": out_diff <= tol and grad_diff <= tol, "fusion_same_drops": same_drops,
    }
    if compile:
        out["fusion_compiled_fwd_bwd_s"] = med["compiled"]
        out["fusion_compiled_fwd_s"] = fwd["compiled"]
    return out


# ---- FLOPs at any depth ------------------------------------------------------------------------
def _shallow_llm(shape: Any, layers: int, seed: int) -> torch.nn.Module:
    """A random LLM of `shape` with only `layers` decoder layers."""
    from transformers import AutoModelForCausalLM

    d = shape.to_dict()
    d.pop("layer_types", None)  # per-layer lists (Qwen2) are rebuilt for the new depth
    cfg = type(shape)(**{**d, "num_hidden_layers": layers})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg)


def flops_at_depth(llm: str, vision: str, config: AdemVLConfig, methods: tuple[str, ...] | list[str] = METHODS,
                   text_len: int = 256, lora_rank: int = 8, seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """FLOPs per new token (and trainable parameters) of every method at the LLM's full depth,
    from two shallow models of its width: a 7B shape counted on a CPU without holding 7B weights.

    Every decoder layer costs the same, so each count is affine in the number of layers L:
    F(L) = F(1) + (L - 1) (F(2) - F(1)), exact. Trainable parameters likewise (LoRA is per layer).
    """
    shape = hub.shape_config(llm)
    depth = shape.num_hidden_layers
    tower = hub.load_vision(vision)
    counts: dict[int, dict[str, dict[str, Any]]] = {}
    for n in tqdm((1, 2), desc="FLOPs at depth 1 and 2", unit="model", disable=not progress):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            peers = build_peers(_shallow_llm(shape, n, seed), tower, config, tuple(methods), lora_rank, seed=seed)
        data1 = make_batch(shape.vocab_size, 1, text_len, tower.config.image_size, shape.bos_token_id, seed)
        counts[n] = {}
        for m, peer in peers.items():
            counts[n][m] = flops_per_token(peer.eval(), data1) | {"trainable_params": peer.num_trainable(),
                                                                  "extra_tokens": peer.extra_tokens}
        del peers

    def at_depth(one: int, two: int) -> int:
        return one + (depth - 1) * (two - one)

    rows = []
    for m in methods:
        one, two = counts[1][m], counts[2][m]
        ops = sorted(set(one["flops_by_op"]) | set(two["flops_by_op"]))
        rows.append({
            "method": m,
            "flops_per_token": at_depth(one["flops_per_token"], two["flops_per_token"]),
            "decode_flops_per_token": at_depth(one["decode_flops_per_token"], two["decode_flops_per_token"]),
            "flops_by_op": {op: at_depth(one["flops_by_op"].get(op, 0), two["flops_by_op"].get(op, 0)) for op in ops},
            "trainable_params": at_depth(one["trainable_params"], two["trainable_params"]),
            "extra_tokens": one["extra_tokens"],
            "llm": llm, "vision": vision, "layers": depth, "flops_text_len": text_len, "scales": list(config.scales),
        })
    return rows


def flops_markdown(rows: list[dict[str, Any]], command: str) -> str:
    """flops.md: the FLOPs columns of Table V at full depth, with ratios."""
    by = {r["method"]: r for r in rows}
    s = rows[0]
    lines = ["# FLOPs per new token (Table V column)", "",
             f"- LLM {s['llm']} ({s['layers']} layers, counted exactly from 1- and 2-layer models of its width); "
             f"{_vision_note(s['vision'])}; scales {tuple(s['scales'])}; text {s['flops_text_len']} tokens, one sample.",
             f"- Command: `{command}`", "",
             "| Method | Trainable params | Extra input tokens | FLOPs per new token | FLOPs / text | FLOPs / LLaVA | "
             "One cached decode step |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["method"]
        lines.append(f"| {LABELS[m]} | {r['trainable_params']:,} | {r['extra_tokens']} | {_fmt_flops(r['flops_per_token'])} | "
                     f"{_r(_ratio(by, m, 'flops_per_token', 'text-only'))} | {_r(_ratio(by, m, 'flops_per_token', 'llava'))} | "
                     f"{_fmt_flops(r['decode_flops_per_token'])} |")
    return "\n".join(lines) + "\n"


# ---- the whole benchmark -----------------------------------------------------------------------
def describe_machine(device: torch.device) -> str:
    """CPU model and threads, and the GPU when one is used."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            cpu = m.group(1).strip()
    text = f"CPU {cpu}, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        text = f"GPU {torch.cuda.get_device_name(device)}; {text}"
    return text


def _load(llm_name: str, vision_name: str, device: torch.device, dtype: torch.dtype):
    """Base models, built on the device directly (a random 7B never passes through CPU memory)."""
    with torch.device(device):
        llm = hub.load_llm(llm_name, dtype=dtype)
        vision = hub.load_vision(vision_name, dtype=dtype)
    return llm.to(device), vision.to(device)


def run_bench(out: str | Path | None = None, llm: str = hub.EMBEDDED_LLM, vision: str = hub.EMBEDDED_VISION,
              batch: int = 8, text_len: int = 128, new_tokens: int = 32, repeats: int = 3, warmup: int = 1,
              methods: tuple[str, ...] | list[str] = METHODS, dtype: str = "fp32", device: str = "cpu",
              compile: bool = False, scales: tuple[int, ...] | None = None, flops_text_len: int = 256,
              lora_rank: int = 8, fusion: bool = True, fusion_layers: int | None = None, seed: int = 0,
              profile: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Measure every method in one run; returns one row per method (and writes files under `out`).

    profile: also write profile.txt under `out` (torch.profiler's top ops of one training step per method).
    """
    methods = list(dict.fromkeys(methods))
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"methods {methods}: choose among {', '.join(METHODS)}")
    if new_tokens < 2:
        raise ValueError(f"--new-tokens {new_tokens}: need at least 2 (one from the prefill, one decode step)")
    if repeats < 1 or warmup < 0 or batch < 1 or text_len < 2 or flops_text_len < 2:
        raise ValueError("need --repeats >= 1, --warmup >= 0, --batch >= 1, --text-len >= 2 and --flops-text-len >= 2")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if compile and warmup < 1:
        raise ValueError("--compile needs --warmup >= 1: the first calls compile, and must not be timed")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: choose cpu or cuda")
    tdtype = DTYPES[dtype]

    config = AdemVLConfig(llm=llm, vision=vision, **({"scales": tuple(scales)} if scales else {}))
    vision_shape = hub.shape_config(vision)  # checked before any weight is made
    grid = (vision_shape.image_size // vision_shape.patch_size) ** 2
    if max(config.scales) > grid:
        raise ValueError(f"--scales {' '.join(map(str, config.scales))}: the tower {vision} gives a grid of {grid} "
                         f"patches; pass scales no larger than that (e.g. --scales {grid} {grid // 4})")
    base_llm, base_vision = _load(llm, vision, dev, tdtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peers = build_peers(base_llm, base_vision, config, tuple(methods), lora_rank,
                            dtype=None if tdtype == torch.float32 else tdtype, seed=seed)
    if compile and "adem-vl" in peers:
        # Static shapes: with dynamic=True (VisualMemory's default) the hand-written backward fails to
        # trace on torch 2.13; static shapes compile once per distinct length (train, prefill, decode).
        peers["adem-vl"].model.memory.compile(dynamic=False)
    optimizers = {m: (torch.optim.AdamW(p.trainable_parameters(), lr=1e-5, weight_decay=0.02)
                      if p.trainable_parameters() else None) for m, p in peers.items()}
    vocab = base_llm.config.vocab_size
    bos = base_llm.config.bos_token_id
    image_size = base_vision.config.image_size
    data = make_batch(vocab, batch, text_len, image_size, bos, seed, dev, tdtype)
    data1 = make_batch(vocab, 1, flops_text_len, image_size, bos, seed, dev, tdtype)

    def train(m: str) -> float:
        peers[m].train()
        return _timed(lambda: train_step(peers[m], optimizers[m], data), dev)

    def generate(m: str) -> tuple[float, float]:
        peers[m].eval()
        return generation_times(peers[m], data, new_tokens, dev)

    train_t = _interleaved(methods, warmup, repeats, train, "train steps", progress)
    gen_t = _interleaved(methods, warmup, repeats, generate, "generation", progress)

    fusion_row: dict[str, Any] = {}
    if fusion and any(m.startswith("adem-vl") for m in methods):
        fusion_row = fusion_bench(batch, text_len + int(config.use_cls), config.num_visual_tokens,
                                  base_llm.config.hidden_size, fusion_layers or base_llm.config.num_hidden_layers,
                                  config, repeats=repeats, warmup=warmup, device=dev, dtype=tdtype,
                                  compile=compile, seed=seed, progress=progress)

    flops: dict[str, dict[str, Any]] = {}
    for m in tqdm(methods, desc="FLOPs", unit="method", disable=not progress):
        peers[m].eval()
        flops[m] = flops_per_token(peers[m], data1)

    if profile and out is not None:  # where a step's time goes, op by op (before mallopt below)
        Path(out).mkdir(parents=True, exist_ok=True)
        tables = [f"## {m}\n\n{profile_step(peers[m], optimizers[m], data, dev)}"
                  for m in tqdm(methods, desc="profile", unit="method", disable=not progress)]
        (Path(out) / "profile.txt").write_text("\n\n".join(tables) + "\n")

    peak: dict[str, float | None] = {}
    for m in tqdm(methods, desc="peak memory", unit="method", disable=not progress):  # last: it sets mallopt
        peers[m].train()
        with peak_memory(dev) as mem:
            train_step(peers[m], optimizers[m], data)
        peak[m] = mem["mb"]

    settings = {"llm": llm, "vision": vision, "device": describe_machine(dev), "dtype": dtype, "batch": batch,
                "text_len": text_len, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
                "flops_text_len": flops_text_len, "scales": list(config.scales), "compile": compile,
                "lora_rank": lora_rank, "torch": torch.__version__}
    rows = []
    for m in methods:
        prefill_s = statistics.median(p for p, _ in gen_t[m])
        decode_s = statistics.median(d for _, d in gen_t[m])
        row: dict[str, Any] = {
            "method": m,
            "train_step_s": statistics.median(train_t[m]),
            "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
            "flops_per_token": flops[m]["flops_per_token"],
            "peak_mem_mb": peak[m],
            "trainable_params": peers[m].num_trainable(),
            "extra_tokens": peers[m].extra_tokens,
            "prefill_s": prefill_s, "decode_s": decode_s, "generate_s": prefill_s + decode_s,
            "decode_flops_per_token": flops[m]["decode_flops_per_token"],
            "flops_by_op": flops[m]["flops_by_op"],
            "train_step_all_s": train_t[m],
        }
        if m in ("adem-vl", "adem-vl-reference") and fusion_row:
            row.update(fusion_row)
        rows.append(row | settings)
    if out is not None:
        write_outputs(rows, out, command_line(settings, out, methods, fusion, fusion_layers, seed, profile))
    return rows


def command_line(settings: dict[str, Any], out: str | Path, methods: list[str], fusion: bool,
                 fusion_layers: int | None, seed: int, profile: bool = False) -> str:
    """The `ademvl bench` command that reproduces a run."""
    s = settings
    parts = ["ademvl bench", f"--out {out}", f"--llm {s['llm']}", f"--vision {s['vision']}", f"--batch {s['batch']}",
             f"--text-len {s['text_len']}", f"--new-tokens {s['new_tokens']}", f"--repeats {s['repeats']}",
             f"--warmup {s['warmup']}", f"--dtype {s['dtype']}",
             f"--device {'cuda' if s['device'].startswith('GPU') else 'cpu'}",
             f"--scales {' '.join(map(str, s['scales']))}", f"--flops-text-len {s['flops_text_len']}"]
    if list(methods) != list(METHODS):
        parts.append(f"--methods {' '.join(methods)}")
    if s["compile"]:
        parts.append("--compile")
    if not fusion:
        parts.append("--no-fusion")
    if fusion_layers:
        parts.append(f"--fusion-layers {fusion_layers}")
    if s["lora_rank"] != 8:
        parts.append(f"--lora-rank {s['lora_rank']}")
    if seed:
        parts.append(f"--seed {seed}")
    if profile:
        parts.append("--profile")
    return " ".join(parts)


# ---- reporting ---------------------------------------------------------------------------------
def _fmt_flops(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _ratio(rows: dict[str, dict[str, Any]], method: str, key: str, base: str) -> float | None:
    if method not in rows or base not in rows or not rows[base].get(key) or rows[method].get(key) is None:
        return None
    return rows[method][key] / rows[base][key]


def _r(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def _vision_note(vision: str) -> str:
    if vision == hub.EMBEDDED_VISION or vision.startswith("random:"):
        return (f"vision tower {vision}: random weights (no pretrained vision weights offline); "
                "timings and FLOPs do not depend on weight values")
    return f"vision tower {vision}: pretrained weights"


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    """bench.md: settings, the Table V form, ratios, the fusion op, the issue's targets."""
    by = {r["method"]: r for r in rows}
    s = rows[0]
    mem_note = ("peak CUDA memory allocated during a training step, above what was allocated before it"
                if s["device"].startswith("GPU") else
                "peak resident memory (VmHWM) during a training step, above the resident size before it")
    lines = [
        "# ADEM-VL efficiency benchmark (Table V form)",
        "",
        f"- Machine: {s['device']}; torch {s['torch']}; {s['dtype']}.",
        f"- LLM {s['llm']} (frozen); {_vision_note(s['vision'])}.",
        f"- Batch {s['batch']}, text {s['text_len']} tokens, scales {tuple(s['scales'])}; greedy generation of "
        f"{s['new_tokens']} new tokens with the KV cache; {s['repeats']} timed round(s) after {s['warmup']} warm-up, "
        "methods interleaved, medians.",
        f"- Command: `{command}`",
        "",
        "| Method | Trainable params | Extra input tokens | Training (s/batch) | Inference (s/batch) | "
        f"Decode (tokens/s) | FLOPs per new token (text {s['flops_text_len']}) | Peak memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mem = "–" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"| {LABELS[r['method']]} | {r['trainable_params']:,} | {r['extra_tokens']} | {r['train_step_s']:.3f} | "
                     f"{r['generate_s']:.3f} | {r['decode_tokens_per_s']:.1f} | {_fmt_flops(r['flops_per_token'])} | {mem} |")
    lines += [
        "",
        "Ratios (method / text-only, method / LLaVA-style):",
        "",
        "| Method | Training / text | Training / LLaVA | Inference / text | Inference / LLaVA | Decode tok/s / text | "
        "FLOPs / text | FLOPs / LLaVA | Memory / text |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["method"]
        cells = [_ratio(by, m, "train_step_s", "text-only"), _ratio(by, m, "train_step_s", "llava"),
                 _ratio(by, m, "generate_s", "text-only"), _ratio(by, m, "generate_s", "llava"),
                 _ratio(by, m, "decode_tokens_per_s", "text-only"), _ratio(by, m, "flops_per_token", "text-only"),
                 _ratio(by, m, "flops_per_token", "llava"), _ratio(by, m, "peak_mem_mb", "text-only")]
        lines.append(f"| {LABELS[m]} | " + " | ".join(_r(c) for c in cells) + " |")

    f = next((r for r in rows if "fusion_speedup" in r), None)
    if f is not None:
        lines += [
            "",
            "## Fusion op: ours (`fuse`) against the released code's path (`fuse_reference`)",
            "",
            f"Shapes {f['fusion_shape']}; keys and values shared by all layers; forward + backward to h_n, K, V "
            "and the MLP outputs; medians.",
            "",
            "| Path | Forward + backward (s) | Forward only (s) |",
            "|---|---:|---:|",
            f"| released code's (`fuse_reference`) | {f['fusion_reference_fwd_bwd_s']:.4f} | {f['fusion_reference_fwd_s']:.4f} |",
            f"| ours (`fuse`) | {f['fusion_fwd_bwd_s']:.4f} | {f['fusion_fwd_s']:.4f} |",
        ]
        if "fusion_compiled_fwd_bwd_s" in f:
            lines.append(f"| ours, torch.compile | {f['fusion_compiled_fwd_bwd_s']:.4f} | {f['fusion_compiled_fwd_s']:.4f} |")
        lines += [
            "",
            f"Speed-up: {f['fusion_speedup']:.2f}x forward + backward, {f['fusion_fwd_speedup']:.2f}x forward only. "
            f"Same outputs: {'yes' if f['fusion_same_outputs'] else 'NO'} (largest difference "
            f"{f['fusion_max_rel_diff_out']:.1e} of the outputs' scale, {f['fusion_max_rel_diff_grad']:.1e} of the "
            f"gradients'); same drop decisions: {'yes' if f['fusion_same_drops'] else 'NO'}.",
        ]

    lines += ["", "## The issue's targets", "",
              "Set for the embedded default on a CPU (batch 8, text 128, scales (256, 64)); other settings are shown "
              "for information.", "", "| Target | Measured | Met |", "|---|---:|:---:|"]
    for text, key, base, op, limit in TARGETS:
        ratio = _ratio(by, "adem-vl", key, base)
        if ratio is not None:
            met = ratio <= limit if op == "<=" else ratio >= limit
            lines.append(f"| {text} | {ratio:.2f}x | {'yes' if met else 'no'} |")
    if f is not None:
        met = f["fusion_speedup"] >= FUSION_TARGET and f["fusion_same_outputs"]
        lines.append(f"| fusion op >= {FUSION_TARGET}x faster than the reference path's, same outputs | "
                     f"{f['fusion_speedup']:.2f}x | {'yes' if met else 'no'} |")
    lines += _where_it_goes(by, f)
    lines += [
        "",
        "## How it is measured",
        "",
        "- Every method runs on twins of one frozen LLM and one tower (same weight tensors) and reads the same "
        "random batch: text of exactly the stated length (BOS first), one image per sample; each method adds its "
        "own extra input tokens (ADEM-VL: the [cls] embedding; LLaVA-style: every patch token).",
        "- Training: forward with labels on every text token, backward, AdamW step. Text-only has nothing to "
        "train; its backward still runs down to the input embeddings (the least any method must do).",
        "- Inference: greedy generation with the KV cache: the prompt and image (prefill), then "
        f"{s['new_tokens'] - 1} cached steps; decode tokens/s = batch x steps / their time.",
        f"- FLOPs per new token: torch.utils.flop_counter.FlopCounterMode (2 per multiply-add; matmuls and "
        f"attention, also the CPU attention kernel) over the forward that makes one new token for one sample "
        f"at text length {s['flops_text_len']} without a cache, image encoding included (the paper's Table V "
        "figure is this times its batch).",
        f"- Peak memory: {mem_note}.",
    ]
    return "\n".join(lines) + "\n"


def fusion_flops(row: dict[str, Any], text_only: dict[str, Any]) -> int:
    """FLOPs of the visual-memory fusion in a row's count: its batched matmuls beyond text-only's
    (the LM head on the last position is text-only's one batched matmul; see count_flops)."""
    def bmm(r: dict[str, Any]) -> int:
        return sum(n for op, n in r.get("flops_by_op", {}).items() if op in ("bmm", "baddbmm"))
    return bmm(row) - bmm(text_only)


def _where_it_goes(by: dict[str, dict[str, Any]], f: dict[str, Any] | None) -> list[str]:
    """ADEM-VL's cost above text-only, split into the fusion and the rest (the profile of a target)."""
    if "adem-vl" not in by or "text-only" not in by:
        return []
    a, t = by["adem-vl"], by["text-only"]
    extra = a["flops_per_token"] - t["flops_per_token"]
    fus = fusion_flops(a, t)
    lines = ["", "## Where ADEM-VL's cost above text-only goes", "",
             f"- FLOPs per new token: +{_fmt_flops(extra)} ({extra / t['flops_per_token']:.1%} of text-only), of "
             f"which the fusion's two matmuls in every layer are {_fmt_flops(fus)} and the rest ({_fmt_flops(extra - fus)}) "
             "is the vision tower, the projectors and the one [cls] token."]
    if "llava" in by:
        l_ = by["llava"]
        lines.append(f"- LLaVA-style pays {_fmt_flops(l_['flops_per_token'] - t['flops_per_token'])} above text-only "
                     f"for its {l_['extra_tokens']} extra tokens in every layer. The fusion's share of a layer's FLOPs "
                     "is about 4 N d / (2 x the layer's weights) per token: large for a small LLM, ~1% at LLaMA-7B shape.")
    over = a["train_step_s"] - t["train_step_s"]
    line = f"- Training step: +{over:.3f} s over text-only ({over / t['train_step_s']:.1%})"
    if f is not None:
        line += (f"; the fusion op alone, forward + backward through all layers at these shapes (micro-benchmark "
                 f"above), takes {f['fusion_fwd_bwd_s']:.3f} s of it")
    lines.append(line + ". The rest is the vision tower (forward and backward to its adapters), the projectors "
                 "and the hooks.")
    return lines


def chart(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """bench.png: one bar chart per measure, ADEM-VL highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train_step_s", "Training step (s/batch)", 1.0), ("generate_s", "Inference (s/batch)", 1.0),
              ("flops_per_token", "FLOPs per new token (G)", 1e-9), ("decode_tokens_per_s", "Decode (tokens/s)", 1.0)]
    names = [r["method"] for r in rows]
    colors = ["tab:red" if n == "adem-vl" else "tab:gray" if n == "text-only" else "tab:blue" for n in names]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (key, title, scale) in zip(axes, panels):
        ax.bar(range(len(rows)), [r[key] * scale for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    s = rows[0]
    fig.suptitle(f"{s['llm']} + {s['vision']}, batch {s['batch']}, text {s['text_len']}, {s['dtype']} - {s['device']}",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(rows: list[dict[str, Any]], out: str | Path, command: str) -> Path:
    """bench.json, bench.md and bench.png under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(rows, command))
    chart(rows, out / "bench.png")
    return out


# ---- command line ------------------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="efficiency of ADEM-VL against its peers (Table V): time, FLOPs, memory")
    p.add_argument("--out", required=True, help="directory for bench.json, bench.md, bench.png")
    p.add_argument("--llm", default=hub.EMBEDDED_LLM, help="LLM name (random:llama-7b for the paper's shape)")
    p.add_argument("--vision", default=hub.EMBEDDED_VISION, help="vision tower (random:clip-vit-large-patch14 for the paper's)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-len", type=int, default=128, help="text tokens per sample (without any visual token)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy new tokens per generation (>= 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (medians are reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--compile", action="store_true", help="run ADEM-VL's fusion through torch.compile")
    p.add_argument("--scales", type=int, nargs="+", default=None, help="ADEM-VL's visual token scales (default 256 64)")
    p.add_argument("--flops-text-len", type=int, default=256, help="text length of the FLOPs count (the paper's: 256)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank of the LLaVA-style peer")
    p.add_argument("--no-fusion", dest="fusion", action="store_false", help="skip the fusion-op micro-benchmark")
    p.add_argument("--fusion-layers", type=int, default=None, help="layers in the fusion micro-benchmark (default: the LLM's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also write profile.txt: top ops of one training step per method")
    p.add_argument("--flops-only", action="store_true",
                   help="only FLOPs per new token and parameter counts at the LLM's full depth, from 1- and 2-layer "
                        "models of its width (a 7B shape on a CPU); writes flops.json and flops.md")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.flops_only:
        return run_flops_only(args)
    run_bench(args.out, llm=args.llm, vision=args.vision, batch=args.batch, text_len=args.text_len,
              new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup, methods=args.methods,
              dtype=args.dtype, device=args.device, compile=args.compile,
              scales=tuple(args.scales) if args.scales else None, flops_text_len=args.flops_text_len,
              lora_rank=args.lora_rank, fusion=args.fusion, fusion_layers=args.fusion_layers, seed=args.seed,
              profile=args.profile)
    print((Path(args.out) / "bench.md").read_text())
    return 0


def run_flops_only(args: argparse.Namespace) -> int:
    config = AdemVLConfig(llm=args.llm, vision=args.vision, **({"scales": tuple(args.scales)} if args.scales else {}))
    rows = flops_at_depth(args.llm, args.vision, config, list(dict.fromkeys(args.methods)), args.flops_text_len,
                          args.lora_rank, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flops.json").write_text(json.dumps(rows, indent=2) + "\n")
    command = (f"ademvl bench --out {out} --llm {args.llm} --vision {args.vision} --flops-only "
               f"--scales {' '.join(map(str, config.scales))} --flops-text-len {args.flops_text_len}")
    if [r["method"] for r in rows] != list(METHODS):
        command += f" --methods {' '.join(r['method'] for r in rows)}"
    (out / "flops.md").write_text(flops_markdown(rows, command))
    print((out / "flops.md").read_text())
    return 0
