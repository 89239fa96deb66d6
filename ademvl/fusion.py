"""The fusion of ADEM-VL (ADEM-VL.md, step 6): parameter-free cross-attention + adaptive drop.

At every decoder layer's feed-forward block, with h_n = ffn_norm(h) the MLP input:

    A   = act(h_n) @ act(K)^T          (B, T, N)   no weights, no softmax, no 1/sqrt(d)
    A   = drop the floor(gamma*N) weakest entries of every row       (adaptive fusion, `weakest`)
    out = h + FFN(h_n) + alpha * A @ V

K and V do not depend on the layer, so act(K) is made once per forward (`VisualMemory.holding`).
The paper's ablations move the fusion to another place of the layer (`VisualMemory.attach`, Table
VII) and swap in MemVP's form act(h_n @ K^T) @ V (`fuse_memvp_form`, Table VI's baseline).
Faster than the released code (ademvl.bench.baselines.fuse_released): the threshold by a partial
selection (topk of k+1, not a sort), only the k+1 candidates of a row touched in forward and in the
hand-written backward, the MLP output added by the matmul, dK and dV of all layers summed in place
(`tie`); a decode step reads V factored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SILU_MIN = 0.27846454276  # -min_x silu(x); shifts silu to be >= 0 for the "silu_positive" ablation
Fusion = Callable[[Tensor, Tensor, Tensor, float, float, str], Tensor]  # a baseline's: (h_n, raw K, V, ...)
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {  # the paper's ablation of the query/key nonlinearity
    "silu": F.silu, "none": lambda x: x, "relu": F.relu, "elu": F.elu,
    "softmax": lambda x: torch.softmax(x, dim=-1),  # over the features: each row a distribution
    "silu_positive": lambda x: F.silu(x) + SILU_MIN,  # silu shifted to be >= 0: every score positive
}


def qk_activation(x: Tensor, kind: str) -> Tensor:
    """The nonlinearity applied to both query and key."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"unknown qk activation {kind!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[kind](x)


def num_dropped(n_visual: int, drop_ratio: float) -> int:
    """How many visual entries each text token drops: floor(gamma * N)."""
    return int(drop_ratio * n_visual)


@torch.no_grad()
def weakest(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The drop rule: idx (B, T, k+1), the k+1 smallest entries of every row, and drop (B, T, k+1),
    True below the (k+1)-th smallest value: the threshold a full sort finds, ties included (with
    distinct scores exactly k entries)."""
    vals, idx = scores.topk(k + 1, dim=-1, largest=False, sorted=False)  # (B, T, k+1)
    return idx, vals < vals.amax(dim=-1, keepdim=True)


def drop_mask(scores: Tensor, drop_ratio: float) -> Tensor:
    """(B, T, N) bool, True at the entries the fusion drops (`weakest`): for drop maps and checks."""
    mask, k = torch.zeros_like(scores, dtype=torch.bool), num_dropped(scores.shape[-1], drop_ratio)
    return mask.scatter_(-1, *weakest(scores, k)) if k else mask


def _zero_dropped_(x: Tensor, idx: Tensor, drop: Tensor) -> Tensor:
    """In place: zero x at the dropped positions; touches only the k+1 candidates of each row."""
    return x.scatter_(-1, idx, x.gather(-1, idx).masked_fill_(drop, 0.0))


def _scores(q: Tensor, k_act: Tensor, n_drop: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """A = drop(q @ k_act^T) (B, T, N), and the (B, T, k+1) candidates and drop flags."""
    scores = torch.bmm(q, k_act.transpose(1, 2))  # (B, T, d) @ (B, d, N) -> (B, T, N)
    idx = drop = None
    if n_drop > 0:
        idx, drop = weakest(scores, n_drop)  # (B, T, k+1) each
        _zero_dropped_(scores, idx, drop)
    return scores, idx, drop


def _attend(q: Tensor, k_act: Tensor, v: Tensor, residual: Tensor | None, alpha: float,
            n_drop: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """residual + alpha * drop(q @ k_act^T) @ v, and what backward needs (scores, idx, drop)."""
    scores, idx, drop = _scores(q, k_act, n_drop)
    if residual is None:
        return torch.bmm(scores, v).mul_(alpha), scores, idx, drop  # (B, T, N) @ (B, N, d) -> (B, T, d)
    return torch.baddbmm(residual, scores, v, alpha=alpha), scores, idx, drop  # residual + alpha A @ V


@dataclass
class SharedGrads:
    """dK and dV of one forward, summed in place by the layers' backwards (`baddbmm_` into one
    (B, N, d) buffer each) instead of a new (B, N, d) tensor per layer that autograd then adds up."""

    want_k: bool
    want_v: bool
    dk: Tensor | None = None
    dv: Tensor | None = None
    sum_dtype: torch.dtype | None = None  # the buffers' dtype where wider than the products' (autocast)

    def add(self, name: str, a: Tensor, b: Tensor, alpha: float = 1.0) -> None:
        """self.<name> += alpha * a @ b (batched); the first product becomes the buffer."""
        acc = getattr(self, name)
        if self.sum_dtype in (None, a.dtype):
            setattr(self, name, torch.bmm(a, b).mul_(alpha) if acc is None else acc.baddbmm_(a, b, alpha=alpha))
            return
        # bf16 products (autocast) summed in fp32: a bf16 running sum over 30 layers would lose ~1%
        prod = torch.bmm(a, b)  # (B, N, d)
        setattr(self, name, prod.to(self.sum_dtype).mul_(alpha) if acc is None else acc.add_(prod, alpha=alpha))


class _Tie(torch.autograd.Function):
    """A scalar that ties every layer's fusion to act(K) and V. Autograd runs its backward once,
    after the backwards of all layers that read it: it hands their summed dK, dV back."""

    @staticmethod
    def forward(ctx, k_act: Tensor, v: Tensor, grads: SharedGrads) -> Tensor:
        ctx.grads, ctx.dtypes = grads, (k_act.dtype, v.dtype)
        return k_act.new_zeros(())

    @staticmethod
    def backward(ctx, _: Tensor):
        g = ctx.grads
        (dk, dv), g.dk, g.dv = (g.dk, g.dv), None, None  # emptied: a second backward (retain_graph) starts at 0
        return (None if dk is None else dk.to(ctx.dtypes[0])), (None if dv is None else dv.to(ctx.dtypes[1])), None


def tie(k_act: Tensor, v: Tensor) -> tuple[Tensor, SharedGrads] | None:
    """(anchor, SharedGrads) for `fuse(..., tie=...)` when K or V wants a gradient, else None."""
    if not (torch.is_grad_enabled() and (k_act.requires_grad or v.requires_grad)):
        return None
    wide = torch.float32 if k_act.dtype in (torch.bfloat16, torch.float16) else None  # autocast: sum in fp32
    grads = SharedGrads(k_act.requires_grad, v.requires_grad, sum_dtype=wide)
    return _Tie.apply(k_act, v, grads), grads


class _Attend(torch.autograd.Function):
    """`_attend`, its backward by hand: dA = alpha g V^T (dropped entries zeroed), dq = dA act(K),
    d act(K) = dA^T q, dV = alpha A^T g. It keeps (B, T, k+1) indices, not a (B, T, N) mask.
    With `grads` (a `tie`), K and V come in detached and dK, dV go into the shared buffers."""

    @staticmethod
    def forward(ctx, q: Tensor, k_act: Tensor, v: Tensor, residual: Tensor | None, alpha: float, n_drop: int,
                anchor: Tensor | None = None, grads: SharedGrads | None = None) -> Tensor:
        out, scores, idx, drop = _attend(q, k_act, v, residual, alpha, n_drop)
        ctx.save_for_backward(q, k_act, v, scores, idx, drop)
        ctx.alpha, ctx.has_residual, ctx.grads = alpha, residual is not None, grads
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        q, k_act, v, scores, idx, drop = ctx.saved_tensors
        need_q, need_res, own = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.grads is None
        acc = SharedGrads(*ctx.needs_input_grad[1:3]) if own else ctx.grads  # without a tie: this layer's own
        dq = None
        if need_q or acc.want_k:
            ds = torch.bmm(g, v.transpose(1, 2)).mul_(ctx.alpha)  # (B, T, N)
            if idx is not None:
                _zero_dropped_(ds, idx, drop)  # no gradient through a dropped entry
            dq = torch.bmm(ds, k_act) if need_q else None  # (B, T, d)
            if acc.want_k:
                acc.add("dk", ds.transpose(1, 2), q)  # += dA^T q (B, N, d)
        if acc.want_v:
            acc.add("dv", scores.transpose(1, 2), g, ctx.alpha)  # += alpha A^T g (B, N, d)
        dk, dv, d_anchor = (acc.dk, acc.dv, None) if own else (None, None, g.new_zeros(()))
        return dq, dk, dv, (g if need_res and ctx.has_residual else None), None, None, d_anchor, None


def fuse(h_n: Tensor, k_act: Tensor, v: Tensor, alpha: float, drop_ratio: float, qk_act: str,
         residual: Tensor | None = None, tie: tuple[Tensor, SharedGrads] | None = None) -> Tensor:
    """[residual +] alpha * drop(act(h_n) @ k_act^T) @ v, with k_act = act(K) made once.  -> (B, T, d)

    tie: `tie(k_act, v)` of this forward, shared by every layer: dK, dV are summed in place."""
    q = qk_activation(h_n, qk_act)  # (B, T, d)
    n_drop = num_dropped(k_act.shape[1], drop_ratio)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_act, v, residual))):
        return _attend(q, k_act, v, residual, alpha, n_drop)[0]  # inference: no autograd bookkeeping
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        if tie is not None:
            return _Attend.apply(q, k_act.detach(), v.detach(), residual, alpha, n_drop, *tie)
        return _Attend.apply(q, k_act, v, residual, alpha, n_drop)
    dt = torch.get_autocast_dtype(device)  # the Function's backward runs outside autocast: one dtype in
    with torch.autocast(device, enabled=False):
        # act(K) and V come cast once per forward from VisualMemory.holding: .to(dt) is then a no-op
        q, k_act, v = q.to(dt), k_act.to(dt), v.to(dt)  # (B, T, d), (B, N, d), (B, N, d)
        residual = None if residual is None else residual.to(dt)
        if tie is not None:
            return _Attend.apply(q, k_act.detach(), v.detach(), residual, alpha, n_drop, *tie)
        return _Attend.apply(q, k_act, v, residual, alpha, n_drop)


def fuse_memvp_form(h_n: Tensor, k: Tensor, v: Tensor, alpha: float, drop_ratio: float, qk_act: str) -> Tensor:
    """Table VI's baseline, MemVP's form: alpha * drop(act(h_n @ K^T)) @ V, the nonlinearity on
    the scores instead of on query and key (a `Fusion`: it reads the raw K).  -> (B, T, d)"""
    scores = qk_activation(torch.bmm(h_n, k.transpose(1, 2)), qk_act)  # (B, T, N)
    if num_dropped(scores.shape[-1], drop_ratio):
        scores = scores.masked_fill(drop_mask(scores, drop_ratio), 0.0)
    return alpha * torch.bmm(scores, v)  # (B, T, N) @ (B, N, d)


@dataclass
class LowRankValues:
    """V = coef @ basis^T + E_v. Xv = V - E_v = gate beta (H W2^T + b2) (step 3) lies in the span of
    [W2 | b2]: basis (d, r) orthonormal over it, r = hidden_proj + 1; coef_t (B, r, N), stored
    transposed so that A @ coef is a row-contiguous matrix-vector product; table E_v (N, d)."""

    coef_t: Tensor
    basis: Tensor
    table: Tensor

    @classmethod
    def of(cls, v: Tensor, table: Tensor, span: Tensor) -> "LowRankValues":
        basis = torch.linalg.qr(span.float()).Q.to(v.dtype)  # (d, r), orthonormal columns
        return cls(((v - table) @ basis).transpose(1, 2).contiguous(), basis, table)  # (B, r, N)


@torch.no_grad()
def fuse_low_rank(h_n: Tensor, k_act: Tensor, v: LowRankValues, alpha: float, drop_ratio: float, qk_act: str,
                  residual: Tensor | None = None) -> Tensor:
    """`fuse` with V factored: A @ V = (A @ coef) @ basis^T + A @ E_v, equal up to rounding. Reads
    coef (B, N, r) instead of V (B, N, d); basis and E_v once for the whole batch (decoding)."""
    q, n_drop = qk_activation(h_n, qk_act), num_dropped(k_act.shape[1], drop_ratio)
    scores = torch.bmm(k_act, q.transpose(1, 2)).transpose(1, 2)  # (B, N, d) @ (B, d, T): row-contiguous, 2x faster
    if n_drop > 0:
        _zero_dropped_(scores, *weakest(scores, n_drop))  # (B, T, N)
    b, t, n = scores.shape
    z = torch.bmm(v.coef_t, scores.transpose(1, 2)).transpose(1, 2).reshape(b * t, -1)  # (B, r, N) @ (B, N, T)
    out = torch.addmm(z @ v.basis.T, scores.reshape(b * t, n), v.table).view(b, t, -1)  # + A @ E_v, (N, d) once
    return out.mul_(alpha) if residual is None else residual.add(out, alpha=alpha)


class VisualMemory(nn.Module):
    """act(K) and V of the batch in hand, read by every decoder layer's MLP hook (no parameters),
    which turns the MLP output into FFN(h_n) + alpha * A @ V without a change to the base model.
    Held only inside `with memory.holding(K, V):` around the LLM call; outside it the hooks do
    nothing. While held, `memory.keys` is act(K) (B, N, d) and `memory.values` V: what drop maps read.

    fusion: None for ADEM-VL's `fuse`; a baseline's (ademvl.bench.baselines) gets the raw K instead.
    A decode step (one new token, no gradient) reads V factored (`fuse_low_rank`) when `holding`
    has a value_span of rank below d."""

    def __init__(self, alpha: float, drop_ratio: float, qk_act: str, fusion: Fusion | None = None) -> None:
        super().__init__()
        self.alpha, self.drop_ratio, self.qk_act, self.fusion = alpha, drop_ratio, qk_act, fusion
        self.keys: Tensor | None = None  # (B, N, d): act(K), or the raw K for a baseline's fusion
        self.values: Tensor | None = None  # (B, N, d)
        self._span: tuple[Tensor, Tensor] | None = None  # (E_v (N, d), [W2 | b2] (d, r))
        self._low_rank: LowRankValues | None = None  # made from them at the first decode step
        self._tie: tuple[Tensor, SharedGrads] | None = None  # dK, dV summed in place (`tie`) in training
        self._fuse: Callable[..., Tensor] = fuse

    @contextlib.contextmanager
    def holding(self, k: Tensor, v: Tensor, repeat: int = 1,
                value_span: tuple[Tensor, Tensor] | None = None) -> Iterator["VisualMemory"]:
        """Hold K, V (B, N, d) for the LLM calls in the block; act(K) is made here, once. repeat: each
        sample that many times (generate()'s beams); value_span: (E_v, [W2 | b2]) of `LowRankValues`."""
        keys = k if self.fusion is not None else qk_activation(k, self.qk_act)
        if repeat > 1:
            keys, v = keys.repeat_interleave(repeat, dim=0), v.repeat_interleave(repeat, dim=0)
        low_rank = value_span is not None and self.fusion is None and value_span[1].shape[1] < v.shape[-1]
        device = keys.device.type
        if self.fusion is None and torch.is_grad_enabled() and torch.is_autocast_enabled(device):
            # training under autocast: cast act(K) and V once here, not in each layer's `fuse` (and tie the casts)
            keys, v = keys.to(torch.get_autocast_dtype(device)), v.to(torch.get_autocast_dtype(device))
        tied = tie(keys, v) if self.fusion is None and self._fuse is fuse else None  # compiled: autograd sums
        with self._held(keys, v, value_span if low_rank else None, tied):
            yield self

    @contextlib.contextmanager
    def _held(self, keys: Tensor | None, values: Tensor | None, span=None, tied=None) -> Iterator["VisualMemory"]:
        before = self.keys, self.values, self._span, self._low_rank, self._tie
        self.keys, self.values, self._span, self._low_rank, self._tie = keys, values, span, None, tied
        try:
            yield self
        finally:
            self.keys, self.values, self._span, self._low_rank, self._tie = before

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """torch.utils.checkpoint's context_fn: a layer recomputed in backward holds what its forward read."""
        return contextlib.nullcontext(), self._held(self.keys, self.values, None, self._tie)

    def compile(self, **compile_kwargs) -> "VisualMemory":
        """`fuse` through torch.compile (without `tie`: autograd sums dK, dV); static shapes: the
        backward does not trace with dynamic=True."""
        self._fuse = torch.compile(fuse, **{"dynamic": False, **compile_kwargs})
        return self

    def forward(self, h_n: Tensor, residual: Tensor | None = None) -> Tensor:
        """The fusion term for h_n (B, T, d); plus `residual` when given."""
        if self._span is not None and h_n.shape[1] == 1 and not torch.is_grad_enabled():  # a decode step
            if self._low_rank is None:
                self._low_rank = LowRankValues.of(self.values, *self._span)
            return fuse_low_rank(h_n, self.keys, self._low_rank, self.alpha, self.drop_ratio, self.qk_act, residual)
        if self.fusion is None:
            return self._fuse(h_n, self.keys, self.values, self.alpha, self.drop_ratio, self.qk_act, residual, self._tie)
        out = self.fusion(h_n, self.keys, self.values, self.alpha, self.drop_ratio, self.qk_act)
        return out if residual is None else residual + out

    def mlp_hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """forward hook for a decoder layer's MLP: args[0] is h_n = ffn_norm(h) (the paper's position)."""
        return output if self.keys is None else self._added(args[0], output)

    def attach(self, layer: nn.Module, query_from: str, add_to: str) -> None:
        """Hook the fusion into one decoder layer at a Table VII position: the query read at the
        input or output of its MHSA (`self_attn`, input = the normed h) or MLP, the fusion term
        added to the same module's input or output (AdemVLConfig.query_from / add_to)."""
        module = layer.mlp if query_from.startswith("mlp") else layer.self_attn
        if (query_from, add_to) == ("mlp_input", "mlp_output"):
            module.register_forward_hook(self.mlp_hook)
        elif add_to.endswith("input"):  # the module then reads input + fusion(input)
            module.register_forward_pre_hook(self._input_hook, with_kwargs=True)
        else:
            module.register_forward_hook(partial(self._output_hook, query_from.endswith("input")), with_kwargs=True)

    def _added(self, query: Tensor, target: Tensor) -> Tensor:
        """target + alpha * drop(act(query) act(K)^T) V, in target's dtype."""
        if query.shape[0] != self.keys.shape[0]:
            raise RuntimeError(f"visual memory holds {self.keys.shape[0]} samples but the layer sees {query.shape[0]}")
        if target.dtype == self.keys.dtype:
            return self(query.to(self.keys.dtype), residual=target)  # target + fusion in one matmul
        return target + self(query.to(self.keys.dtype)).to(target.dtype)

    def _input_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.keys is None:
            return None
        if args:  # mlp(h_n)
            return (self._added(args[0], args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._added(kwargs["hidden_states"], kwargs["hidden_states"])}

    def _output_hook(self, from_input: bool, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.keys is None:
            return output
        out = output[0] if isinstance(output, tuple) else output  # self_attn returns (output, weights)
        query = (args[0] if args else kwargs["hidden_states"]) if from_input else out
        fused = self._added(query, out)
        return (fused, *output[1:]) if isinstance(output, tuple) else fused
