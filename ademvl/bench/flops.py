"""FLOPs per new token (the paper's Table V column), counted by torch's FlopCounterMode, at any depth."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from .. import hub
from ..config import AdemVLConfig
from .baselines import METHODS, build_peers
from .peer import Peer, make_batch


def sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Attention's two matmuls, 2 per multiply-add: (B, H, Tq, D) @ (B, H, D, Tk), then @ (B, H, Tk, Dv).
    With grouped-query attention (K, V with fewer heads) every query head still reads all Tk keys;
    torch's own count (torch.utils.flop_counter.sdpa_flop_count) refuses those shapes before 2.13."""
    b, h, t_q, d_qk = q_shape
    t_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * b * h * t_q * t_k * (d_qk + d_v)


def _flop_mapping() -> dict[Any, Callable[..., int]]:
    """Every fused attention kernel (CPU and CUDA) counted by `sdpa_flops`, GQA shapes included."""
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    ops = (getattr(torch.ops.aten, n, None) for n in names)
    return {op: sdpa_flops for op in ops if op is not None}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of fn() by torch's FlopCounterMode (matmuls and attention; 2 per multiply-add), and by op.

    By op, the fusion shows apart: the LLMs' linear layers are aten.mm/addmm, their attention
    the sdpa kernels, the LM head on the last position one aten.bmm, and otherwise only the
    visual-memory fusions (ADEM-VL's, MemVP's) use aten.bmm/baddbmm.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        fn()
    by_op = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


@torch.no_grad()
def flops_per_token(peer: Peer, batch1: dict[str, Tensor]) -> dict[str, Any]:
    """FLOPs of the forward that makes the first new token of one sample (no cache; image encoding
    included; by op too), and of one cached decode step after it."""
    inputs = {k: v for k, v in batch1.items() if k != "labels"}
    held: list[Any] = []
    encode, encode_by_op = count_flops(lambda: held.append(peer.inputs(**inputs)))
    with held[0].memory:
        prefill, by_op = count_flops(lambda: held.append(peer.prefill(held[0])))
        step, _ = count_flops(lambda: peer.decode_step(*held[1]))
    by_op = {op: by_op.get(op, 0) + encode_by_op.get(op, 0) for op in sorted(set(by_op) | set(encode_by_op))}
    return {"flops_per_token": encode + prefill, "flops_by_op": by_op, "decode_flops_per_token": step}


def fusion_flops(row: dict[str, Any], text_only: dict[str, Any]) -> int:
    """FLOPs of the visual-memory fusion in a row's count: its batched matmuls beyond text-only's
    (the LM head on the last position is text-only's one batched matmul; see count_flops)."""
    def bmm(r: dict[str, Any]) -> int:
        return sum(n for op, n in r.get("flops_by_op", {}).items() if op in ("bmm", "baddbmm"))
    return bmm(row) - bmm(text_only)


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
