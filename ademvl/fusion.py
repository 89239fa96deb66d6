"""The fusion of ADEM-VL (ADEM-VL.md, step 6): parameter-free cross-attention + adaptive drop.

At every decoder layer's feed-forward block, with h_n = ffn_norm(h) the MLP input:

    A   = act(h_n) @ act(K)^T          (B, T, N)   no weights, no softmax, no 1/sqrt(d)
    A   = drop the floor(gamma*N) weakest entries of every row       (adaptive fusion)
    out = h + FFN(h_n) + alpha * A @ V

K and V do not depend on the layer (the position tables are shared), so act(K) and V are made
once per forward by `VisualMemory.set` and read by every layer. `fuse_reference` is the released
code's way (keys re-activated in every layer, threshold by a full sort) kept for tests and
benchmarks; `fuse` must give the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SILU_MIN = 0.27846454276  # -min_x silu(x); shifts silu to be >= 0 for the "silu_positive" ablation


def qk_activation(x: Tensor, kind: str) -> Tensor:
    """The nonlinearity applied to both query and key (the paper's Table: none/ReLU/ELU/SiLU/...)."""
    if kind == "silu":
        return F.silu(x)
    if kind == "none":
        return x
    if kind == "relu":
        return F.relu(x)
    if kind == "elu":
        return F.elu(x)
    if kind == "softmax":  # over the feature dimension, so each row is a distribution
        return torch.softmax(x, dim=-1)
    if kind == "silu_positive":  # silu shifted to be non-negative: every score positive
        return F.silu(x) + SILU_MIN
    raise ValueError(f"unknown qk activation {kind!r}")


def num_dropped(n_visual: int, drop_ratio: float) -> int:
    """How many visual entries each text token drops: floor(gamma * N)."""
    return int(drop_ratio * n_visual)


def adaptive_drop(scores: Tensor, drop_ratio: float) -> Tensor:
    """Zero, in every row, the entries below the row's (k+1)-th smallest value, k = floor(gamma*N).

    With distinct scores exactly k entries per row become zero. The threshold is found with
    kthvalue (a selection, O(N)) instead of a full sort; it is the same value the sort finds,
    so ties are treated exactly as the reference does.
    """
    k = num_dropped(scores.shape[-1], drop_ratio)
    if k == 0:
        return scores
    thresh = scores.float().kthvalue(k + 1, dim=-1, keepdim=True).values.to(scores.dtype)  # (B, T, 1)
    return scores.masked_fill(scores < thresh, 0.0)  # (B, T, N)


def fuse(h_n: Tensor, k_act: Tensor, v: Tensor, alpha: float, drop_ratio: float, qk_act: str) -> Tensor:
    """alpha * drop(act(h_n) @ k_act^T) @ v, with k_act = act(K) precomputed.  -> (B, T, d)"""
    scores = qk_activation(h_n, qk_act) @ k_act.transpose(1, 2)  # (B, T, d) @ (B, d, N) -> (B, T, N)
    scores = adaptive_drop(scores, drop_ratio)  # (B, T, N)
    return alpha * (scores @ v)  # (B, T, N) @ (B, N, d) -> (B, T, d)


def fuse_reference(h_n: Tensor, k: Tensor, v: Tensor, alpha: float, drop_ratio: float, qk_act: str) -> Tensor:
    """The released code's form: activate the raw keys here, threshold by sorting every row."""
    scores = qk_activation(h_n, qk_act) @ qk_activation(k, qk_act).transpose(1, 2)  # (B, T, N)
    n_drop = num_dropped(scores.shape[-1], drop_ratio)
    if n_drop > 0:
        thresh = torch.sort(scores, dim=-1).values[..., n_drop : n_drop + 1]  # (B, T, 1)
        scores = scores * (scores >= thresh).to(scores.dtype)
    return alpha * (scores @ v)


class VisualMemory(nn.Module):
    """Holds act(K) and V of the current batch for all decoder layers; no parameters.

    Hooked onto each decoder layer's MLP: the hook adds the fusion to the MLP's output, so the
    layer computes h + FFN(h_n) + alpha * A @ V without any change to the base model's code.
    """

    def __init__(self, alpha: float, drop_ratio: float, qk_act: str, reference: bool = False) -> None:
        super().__init__()
        self.alpha, self.drop_ratio, self.qk_act = alpha, drop_ratio, qk_act
        self.reference = reference  # use the released code's path (benchmarks and tests)
        self.keys: Tensor | None = None  # (B, N, d): act(K), or raw K when reference
        self.values: Tensor | None = None  # (B, N, d)

    def set(self, k: Tensor, v: Tensor) -> None:
        """Store the keys and values of this batch; the key activation runs here, once."""
        self.keys = k if self.reference else qk_activation(k, self.qk_act)
        self.values = v

    def clear(self) -> None:
        self.keys = self.values = None

    def expand(self, times: int) -> None:
        """Repeat each sample's memory `times` times, as generate() expands beams/return sequences."""
        if self.keys is not None and times > 1:
            self.keys = self.keys.repeat_interleave(times, dim=0)
            self.values = self.values.repeat_interleave(times, dim=0)

    def forward(self, h_n: Tensor) -> Tensor:
        if self.reference:
            return fuse_reference(h_n, self.keys, self.values, self.alpha, self.drop_ratio, self.qk_act)
        return fuse(h_n, self.keys, self.values, self.alpha, self.drop_ratio, self.qk_act)

    def mlp_hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """forward hook for a decoder layer's MLP: args[0] is h_n = ffn_norm(h)."""
        if self.keys is None:
            return output
        h_n = args[0]
        if h_n.shape[0] != self.keys.shape[0]:
            raise RuntimeError(f"visual memory holds {self.keys.shape[0]} samples but the layer sees {h_n.shape[0]}; "
                               "call the model (not model.llm) so the memory matches the batch")
        fused = self(h_n.to(self.keys.dtype)).to(output.dtype)
        return output + fused
