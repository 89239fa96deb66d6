"""How the benchmark measures: interleaved timing, peak memory, one training step, cached generation.

Timings: warm-up rounds first, then `repeats` rounds; each round runs every method once, in an
order rotated round by round, so that the drift of a shared machine spreads over all methods
alike. Medians are reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import platform
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ..precision import autocast, cpu_computes_bf16
from .peer import Peer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# wall: seconds as a user waits for them; cpu: this process's CPU seconds, which a machine shared
# with other jobs inflates far less (with one torch thread they are the work done, not the queueing)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], Any], device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    sync(device)
    t0 = clock()
    fn()
    sync(device)
    return clock() - t0


def rounds(methods: list[str], warmup: int, repeats: int) -> Iterator[tuple[int, str]]:
    """(round, method) pairs: warm-up rounds first; each round starts one method later than the last."""
    for r in range(warmup + repeats):
        for i in range(len(methods)):
            yield r, methods[(r + i) % len(methods)]


def interleaved(methods: list[str], warmup: int, repeats: int, measure: Callable[[str], Any], desc: str,
                 progress: bool = True) -> dict[str, list[Any]]:
    """measure(method) for every method in every round (see _rounds); warm-up results are dropped."""
    results: dict[str, list[Any]] = {m: [] for m in methods}
    with tqdm(total=(warmup + repeats) * len(methods), desc=desc, unit="run", disable=not progress) as bar:
        for r, m in rounds(methods, warmup, repeats):
            value = measure(m)
            if r >= warmup:
                results[m].append(value)
            bar.update()
    return results


def _status_mib(key: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def cpu_peak_supported() -> bool:
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
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        sync(device)
        result["mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    supported = cpu_peak_supported()
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


def train_step(peer: Peer, optimizer: torch.optim.Optimizer | None, batch: dict[str, Tensor],
               precision: str = "fp32") -> float:
    """One step: forward with labels (in bf16 autocast for precision "bf16", as `ademvl train` runs
    it: weights and optimizer state stay fp32), backward, optimizer step. Returns the loss."""
    with autocast(precision, next(peer.parameters()).device):
        loss = peer(**batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def generation_times(peer: Peer, batch: dict[str, Tensor], new_tokens: int, device: torch.device,
                     clock: Callable[[], float] = time.perf_counter, precision: str = "fp32") -> tuple[float, float]:
    """(prefill seconds, seconds of the new_tokens - 1 cached decode steps) of greedy generation,
    all of it in bf16 autocast for precision "bf16".

    The prefill includes the image encoding and the start of the visual memory (act(K)).
    """
    with autocast(precision, device):
        return _generation_times(peer, batch, new_tokens, device, clock)


def _generation_times(peer: Peer, batch: dict[str, Tensor], new_tokens: int, device: torch.device,
                      clock: Callable[[], float]) -> tuple[float, float]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    sync(device)
    t0 = clock()
    with torch.no_grad():
        x = peer.inputs(**inputs)
    with x.memory:
        token, mask, past = peer.prefill(x)
        sync(device)
        t1 = clock()
        for _ in range(new_tokens - 1):
            token, mask, past = peer.decode_step(token, mask, past)
        sync(device)
        t2 = clock()
    return t1 - t0, t2 - t1


def profile_step(peer: Peer, optimizer: torch.optim.Optimizer | None, batch: dict[str, Tensor],
                 device: torch.device, rows: int = 15, precision: str = "fp32") -> str:
    """torch.profiler's table of one training step, the ops with the most self time first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    peer.train()
    with profile(activities=activities) as prof:
        train_step(peer, optimizer, batch, precision)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def describe_machine(device: torch.device) -> str:
    """CPU model and threads, and the GPU when one is used."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            cpu = m.group(1).strip()
    bf16 = "computes in bf16" if cpu_computes_bf16() else "no bf16 instructions"
    text = f"CPU {cpu} ({bf16}), {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        text = f"GPU {torch.cuda.get_device_name(device)}; {text}"
    return text
