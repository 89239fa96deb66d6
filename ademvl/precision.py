"""Which precision a run computes in: `train.mixed_precision` resolved for the machine at hand.

bf16 autocast pays only where the processor multiplies in bf16. On a CPU with AVX512-BF16 or
AMX (x86) or BF16 (Arm), a bf16 matmul at the LLM's MLP shape ran 2.3x as fast as fp32 and a
training step of the embedded demo 1.3-1.5x; on an AVX2-only CPU torch emulates bf16 and the
same matmul ran 75x *slower* (docs/training.md, "Precision"). So `auto` asks the processor:

    auto   CUDA: bf16 where the GPU supports it, else fp16; a CPU that computes in bf16: bf16;
           any other CPU: fp32 ("no")
    no / fp32, bf16, fp16   as named, whatever the machine

Autocast leaves every parameter in its own dtype: the trainable weights, their gradients and the
optimizer state stay fp32; only the products run in bf16 (Accelerate's mixed precision).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

PRECISIONS = ("auto", "no", "fp32", "bf16", "fp16")
# /proc/cpuinfo flags of bf16 dot-product instructions: x86 AVX512-BF16 and AMX-BF16 ("flags"), Arm
# FEAT_BF16 ("Features"). AVX2 machines lack them and run bf16 matmuls through a slow reference path.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor in a /proc/cpuinfo text (x86 `flags`, Arm `Features`)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_computes_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU has bf16 dot-product instructions (a /proc/cpuinfo text, default this machine's).

    Without /proc/cpuinfo (not Linux) torch's own check of AVX512-BF16 / AMX is asked instead.
    """
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(BF16_FLAGS & cpu_flags(cpuinfo))


def normalize(setting: str) -> str:
    """The canonical name of a setting: fp32 is Accelerate's "no"; YAML 1.1 reads a bare `no` as false."""
    setting = "no" if setting in ("False", "false", "fp32") else setting
    if setting not in PRECISIONS:
        raise ValueError(f"mixed_precision={setting!r}: choose auto, fp32 (or no), bf16 or fp16")
    return setting


def resolve(setting: str, cpu_bf16: bool | None = None) -> str:
    """What `setting` means on this machine: "bf16", "fp16" or "no" (fp32), Accelerate's names.

    cpu_bf16: whether the CPU computes in bf16 (default: `cpu_computes_bf16()`); used by `auto`
    on a machine without a GPU.
    """
    setting = normalize(setting)
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if torch.accelerator.is_available():  # another accelerator (MPS, XPU): fp32 until measured there
        return "no"
    return "bf16" if (cpu_computes_bf16() if cpu_bf16 is None else cpu_bf16) else "no"


def describe(setting: str, resolved: str) -> str:
    """One line for logs and reports: what ran, and why when `auto` chose it."""
    name = "fp32" if resolved == "no" else resolved
    if normalize(setting) != "auto":
        return f"{name} (set)"
    if torch.cuda.is_available():
        return f"{name} (auto: GPU)"
    why = "this CPU computes in bf16" if resolved == "bf16" else "this CPU has no bf16 instructions"
    return f"{name} (auto: {why})"


def autocast(resolved: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """torch.autocast for a resolved precision ("bf16", "fp16"); a no-op for "no"/"fp32"."""
    if resolved in ("no", "fp32"):
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16 if resolved == "bf16" else torch.float16)
