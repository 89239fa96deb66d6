"""The fusion op alone: ours (`ademvl.fusion.fuse`) against the released code's, at the run's shapes."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ..config import AdemVLConfig
from ..fusion import LowRankValues, drop_mask, fuse, fuse_low_rank, num_dropped, qk_activation, tie
from .baselines import fuse_released, released_drop_mask
from .measure import rounds, timed


def fusion_bench(batch: int, text_len: int, n_visual: int, d: int, layers: int, config: AdemVLConfig,
                 repeats: int = 5, warmup: int = 1, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, compile: bool = False, seed: int = 0,
                 progress: bool = True, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Our fused path against the released code's, forward + backward through `layers` layers.

    Each layer gets its own h_n and MLP output (B, T, d); all share the keys and values (B, N, d),
    as in the model. Ours activates the keys once and runs `fuse` (partial selection, hand-written
    backward, MLP output added in the matmul, dK and dV summed in place); the reference
    re-activates the keys and sorts every row in every layer. Gradients flow to h_n, K, V and the MLP outputs, as in training.
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
        tied = tie(k_act, v) if f is fuse else None  # dK, dV summed in place, as VisualMemory does (compiled: not)
        return [f(hn, k_act, v, a, gamma, act, m, tied) for hn, m in zip(h, mlp)]

    def reference() -> list[Tensor]:
        return [m + fuse_released(hn, k, v, a, gamma, act) for hn, m in zip(h, mlp)]

    def fwd_bwd(forward: Callable[[], list[Tensor]]) -> list[Tensor]:
        for t in leaves:
            t.grad = None
        outs = forward()
        torch.autograd.backward(outs, grads)
        return outs

    paths: dict[str, Callable[[], list[Tensor]]] = {"fuse": ours, "reference": reference}
    if compile:
        compiled = torch.compile(fuse, dynamic=False)  # as VisualMemory.compile
        paths["compiled"] = lambda: ours(compiled)
    times: dict[str, list[float]] = {p: [] for p in paths}
    fwd_times: dict[str, list[float]] = {p: [] for p in paths}
    bar = tqdm(total=(warmup + repeats) * len(paths), desc="fusion op", unit="run", disable=not progress, leave=False)
    for r, name in rounds(list(paths), warmup, repeats):
        t = timed(lambda name=name: fwd_bwd(paths[name]), device, clock)
        with torch.no_grad():
            tf = timed(paths[name], device, clock)
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
        same_drops = n_drop == 0 or bool(torch.equal(drop_mask(scores, gamma), released_drop_mask(scores, n_drop)))
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
        # every timed round, as for the rows' figures: forward + backward, and forward only, per path
        "fusion_rounds_s": {**{f"{p}_fwd_bwd": ts for p, ts in times.items()},
                            **{f"{p}_fwd": ts for p, ts in fwd_times.items()}},
    }
    if compile:
        out["fusion_compiled_fwd_bwd_s"] = med["compiled"]
        out["fusion_compiled_fwd_s"] = fwd["compiled"]
    return out


@torch.no_grad()
def decode_bench(batch: int, text_len: int, n_visual: int, d: int, hidden: int, layers: int, config: AdemVLConfig,
                 repeats: int = 5, warmup: int = 1, device: torch.device | str = "cpu", seed: int = 0,
                 progress: bool = True, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """The fusion of one cached decode step (T = 1) and of a prefill (T = text_len) through `layers`
    layers, V read dense (B, N, d) or factored (`fuse_low_rank`, rank hidden + 1), act(K) and V
    stored in fp32 or bf16. Returns the median seconds of each and the bf16 conversion's cost."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device)

    a, gamma, act = config.alpha, config.drop_ratio, config.qk_act
    span = torch.cat([rand(d, hidden) / hidden**0.5, rand(d, 1)], dim=1)  # [W2 | b2]
    e_v = rand(n_visual, d) * 0.02
    v = config.beta * (torch.nn.functional.silu(rand(batch, n_visual, hidden + 1)) @ span.T) + e_v  # (B, N, d)
    k_act = qk_activation(rand(batch, n_visual, d), act)
    low = LowRankValues.of(v, e_v, span)
    steps = {t: ([rand(batch, t, d) for _ in range(layers)], [rand(batch, t, d) for _ in range(layers)])
             for t in (1, text_len)}
    bf = torch.bfloat16
    low_bf = LowRankValues(low.coef_t.to(bf), low.basis.to(bf), low.table.to(bf))

    def run(t: int, values: Any, k: Tensor, dtype: torch.dtype) -> None:
        f = fuse_low_rank if isinstance(values, LowRankValues) else fuse
        for hn, m in zip(*steps[t]):
            f(hn.to(dtype), k, values, a, gamma, act, m.to(dtype))

    paths: dict[str, Callable[[], None]] = {
        "decode_dense": lambda: run(1, v, k_act, torch.float32),
        "decode_low_rank": lambda: run(1, low, k_act, torch.float32),
        "prefill_dense": lambda: run(text_len, v, k_act, torch.float32),
        "prefill_low_rank": lambda: run(text_len, low, k_act, torch.float32),
        "factor_once": lambda: LowRankValues.of(v, e_v, span),
        "to_bf16_once": lambda: (k_act.to(bf), v.to(bf)),
    }
    v_bf, k_bf = v.to(bf), k_act.to(bf)  # stored once per generation (timed as to_bf16_once)
    paths["decode_dense_bf16"] = lambda: run(1, v_bf, k_bf, bf)
    paths["decode_low_rank_bf16"] = lambda: run(1, low_bf, k_bf, bf)
    times: dict[str, list[float]] = {p: [] for p in paths}
    bar = tqdm(total=(warmup + repeats) * len(paths), desc="decode fusion", unit="run", disable=not progress, leave=False)
    for r, name in rounds(list(paths), warmup, repeats):
        t = timed(paths[name], device, clock)
        if r >= warmup:
            times[name].append(t)
        bar.update()
    bar.close()
    out: dict[str, Any] = {f"fusion_{p}_s": statistics.median(ts) for p, ts in times.items()}
    out["decode_fusion_rounds_s"] = times  # every timed round of each path
    size = v.element_size()
    out["decode_bytes_per_layer"] = {"act_k": batch * n_visual * d * size, "v_dense": batch * n_visual * d * size,
                                     "v_factored": (batch * (hidden + 1) * n_visual + n_visual * d + d * (hidden + 1)) * size}
    out["decode_fusion_shape"] = f"B={batch} T=1 (prefill T={text_len}) N={n_visual} d={d} rank={hidden + 1} layers={layers}"
    return out
