"""The fusion (ADEM-VL.md step 6) against a direct, loop-by-loop computation of its equations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ademvl.bench.baselines import fuse_released
from ademvl.fusion import (LowRankValues, VisualMemory, drop_mask, fuse, fuse_low_rank, num_dropped,
                           qk_activation)


def direct(h_n: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """out[b, t] = alpha * sum_n A'[b, t, n] v[b, n], A = silu(h) . silu(k), the floor(gamma N) smallest dropped."""
    b_, t_, d = h_n.shape
    n = k.shape[1]
    drop = math.floor(gamma * n)
    out = torch.zeros(b_, t_, d, dtype=torch.float64)
    for b in range(b_):
        for t in range(t_):
            scores = [float(F.silu(h_n[b, t].double()) @ F.silu(k[b, j].double())) for j in range(n)]
            weakest = set(sorted(range(n), key=lambda j: scores[j])[:drop])
            for j in range(n):
                if j not in weakest:
                    out[b, t] += scores[j] * v[b, j].double()
    return alpha * out


def test_fuse_equals_the_equations() -> None:
    torch.manual_seed(0)
    h, k, v = torch.randn(2, 5, 8), torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    expected = direct(h, k, v, alpha=0.1, gamma=0.1)
    k_act = qk_activation(k, "silu")
    torch.testing.assert_close(fuse(h, k_act, v, 0.1, 0.1, "silu").double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fuse_released(h, k, v, 0.1, 0.1, "silu").double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma,n,expected", [(0.1, 320, 32), (0.1, 20, 2), (0.25, 7, 1), (0.0, 320, 0), (0.5, 3, 1)])
def test_adaptive_drop_zeroes_exactly_floor_gamma_n_per_row(gamma: float, n: int, expected: int) -> None:
    torch.manual_seed(0)
    scores = torch.randn(3, 11, n) + 5.0  # distinct and non-zero, so every zero is a dropped entry
    assert num_dropped(n, gamma) == expected
    out = scores.masked_fill(drop_mask(scores, gamma), 0.0)  # the adaptive drop
    zeros = (out == 0).sum(-1)
    assert zeros.eq(expected).all(), zeros
    # the dropped entries are the smallest of their row; the kept ones are unchanged
    order = scores.argsort(-1)
    dropped = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order[..., :expected], True)
    assert torch.equal(out == 0, dropped)
    assert torch.equal(out[~dropped], scores[~dropped])


def test_fast_and_reference_paths_agree_on_every_activation() -> None:
    torch.manual_seed(0)
    h, k, v = torch.randn(2, 9, 16), torch.randn(2, 40, 16), torch.randn(2, 40, 16)
    for act in ("silu", "none", "relu", "elu", "softmax", "silu_positive"):
        fast = fuse(h, qk_activation(k, act), v, 0.1, 0.1, act)
        ref = fuse_released(h, k, v, 0.1, 0.1, act)
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_qk_activations() -> None:
    x = torch.tensor([-2.0, 0.0, 1.0])
    assert torch.equal(qk_activation(x, "none"), x)
    assert torch.equal(qk_activation(x, "relu"), torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(qk_activation(x, "softmax").sum(), torch.tensor(1.0))
    assert (qk_activation(torch.linspace(-10, 10, 1001), "silu_positive") >= 0).all()
    with pytest.raises(ValueError, match="unknown qk activation"):
        qk_activation(x, "tanh")


def test_memory_hook_adds_fusion_to_mlp_output_while_held() -> None:
    """Inside `holding`, MLP(h_n) becomes MLP(h_n) + alpha * A @ V; before and after it, plain MLP(h_n)."""
    torch.manual_seed(0)
    mlp = torch.nn.Linear(8, 8)
    mem = VisualMemory(alpha=0.1, drop_ratio=0.1, qk_act="silu")
    mlp.register_forward_hook(mem.mlp_hook)
    h, k, v = torch.randn(2, 4, 8), torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    plain = mlp(h)
    with mem.holding(k, v):
        fused = mlp(h)
        torch.testing.assert_close(mem.keys, F.silu(k))  # act(K), the documented read for drop maps
    torch.testing.assert_close(fused.double(), plain.double() + direct(h, k, v, 0.1, 0.1), rtol=1e-5, atol=1e-6)
    assert mem.keys is None and mem.values is None and torch.equal(mlp(h), plain)


def test_memory_repeats_each_sample_for_beams() -> None:
    mem = VisualMemory(alpha=0.1, drop_ratio=0.1, qk_act="silu")
    k, v = torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    with mem.holding(k, v, repeat=3):  # as generate() expands beams: each sample repeated
        assert mem.keys.shape == (6, 20, 8) and torch.equal(mem.values[3], v[1]) and torch.equal(mem.values[2], v[0])
    assert mem.keys is None


def test_memory_is_cleared_when_the_call_fails() -> None:
    mem = VisualMemory(alpha=0.1, drop_ratio=0.1, qk_act="silu")
    with pytest.raises(RuntimeError, match="boom"), mem.holding(torch.randn(1, 4, 2), torch.randn(1, 4, 2)):
        raise RuntimeError("boom")
    assert mem.keys is None and mem.values is None


def test_drop_mask_is_the_rule_fuse_applies() -> None:
    """drop_mask marks what fuse drops: fuse equals the undropped product with those scores zeroed."""
    torch.manual_seed(0)
    h, k, v = torch.randn(2, 5, 8), torch.randn(2, 30, 8), torch.randn(2, 30, 8)
    scores = F.silu(h) @ F.silu(k).transpose(1, 2)  # (B, T, N)
    mask = drop_mask(scores, 0.1)
    assert mask.sum(-1).eq(3).all()
    expected = 0.1 * scores.masked_fill(mask, 0.0) @ v
    torch.testing.assert_close(fuse(h, F.silu(k), v, 0.1, 0.1, "silu"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_residual", [False, True])
def test_hand_written_backward_matches_autograd_of_the_reference(with_residual: bool) -> None:
    """fuse's own backward (indices of the k+1 weakest, no mask) gives the reference's gradients."""
    torch.manual_seed(0)
    h = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 20, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 20, 16, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 7, 16, dtype=torch.float64)

    def grads(fn) -> list[torch.Tensor]:
        out = fn()
        return list(torch.autograd.grad(out, (h, k, v, r) if with_residual else (h, k, v), g))

    res = r if with_residual else None
    fast = grads(lambda: fuse(h, qk_activation(k, "silu"), v, 0.1, 0.1, "silu", residual=res))
    ref = grads(lambda: fuse_released(h, k, v, 0.1, 0.1, "silu") + (r if with_residual else 0))
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("want", ["k and v", "k only", "v only"])
def test_memory_sums_dk_dv_in_place_to_autograds_gradients(want: str) -> None:
    """Through VisualMemory (three layers reading one act(K), V; one checkpointed as the model's
    are), the shared in-place dK / dV buffers give autograd's sum of the layers' gradients."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    k = torch.randn(2, 20, 16, dtype=torch.float64, requires_grad=want != "v only")
    v = torch.randn(2, 20, 16, dtype=torch.float64, requires_grad=want != "k only")
    hs = [torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    gs = [torch.randn(2, 7, 16, dtype=torch.float64) for _ in range(3)]
    leaves = [t for t in (*hs, k, v) if t.requires_grad]
    memory = VisualMemory(0.1, 0.1, "silu")

    with memory.holding(k, v):
        assert memory._tie is not None
        outs = [memory(hs[0]), memory(hs[1], residual=hs[1] * 2),
                checkpoint(memory, hs[2], use_reentrant=False, context_fn=memory.checkpoint_contexts)]
        tied = torch.autograd.grad(outs, leaves, gs)
    with memory.holding(k, v):
        two = [memory(hs[0]), memory(hs[1], residual=hs[1] * 2), memory(hs[2])]
        once = torch.autograd.grad(two, leaves, gs, retain_graph=True)
        again = torch.autograd.grad(two, leaves, gs)  # a second backward of the same graph: not summed twice
    k_act = qk_activation(k, "silu")
    plain = [fuse(hs[0], k_act, v, 0.1, 0.1, "silu"), fuse(hs[1], k_act, v, 0.1, 0.1, "silu", residual=hs[1] * 2),
             fuse(hs[2], k_act, v, 0.1, 0.1, "silu")]
    for a, b, c, e in zip(tied, torch.autograd.grad(plain, leaves, gs), once, again):
        for x in (a, c, e):
            torch.testing.assert_close(x, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad(), memory.holding(k, v):
        assert memory._tie is None  # inference keeps no buffers


@pytest.mark.parametrize("act", ["silu", "none", "relu", "elu", "softmax", "silu_positive"])
def test_low_rank_decode_equals_dense_at_the_embedded_shape(act: str) -> None:
    """B 8, one new token, N 320, d 576, hidden_proj 128, one sample without an image: V factored
    as (V - E_v) @ basis gives the dense outputs to fp32 rounding, from the same drop decisions."""
    g = torch.Generator().manual_seed(0)
    b, n, d, hidden, beta = 8, 320, 576, 128, 0.01
    w2, b2 = torch.randn(d, hidden, generator=g) / hidden**0.5, torch.randn(d, generator=g)  # fc2
    hid = F.silu(torch.randn(b, n, hidden, generator=g))  # H = silu(fc1(x))  (B, N, 128)
    gate = torch.ones(b, 1, 1)
    gate[3] = 0.0  # no image: V = E_v
    e_v = torch.randn(n, d, generator=g) * 0.02
    v = gate * beta * (hid @ w2.T + b2) + e_v  # (B, N, d), as model.encode_images makes it
    h, k = torch.randn(b, 1, d, generator=g), torch.randn(b, n, d, generator=g)
    k_act = qk_activation(k, act)
    low = LowRankValues.of(v, e_v, torch.cat([w2, b2[:, None]], dim=1))
    assert low.coef_t.shape == (b, hidden + 1, n) and low.basis.shape == (d, hidden + 1)
    scores = qk_activation(h, act) @ k_act.transpose(1, 2)  # (B, 1, N)
    expected = 0.1 * scores.masked_fill(drop_mask(scores, 0.1), 0.0).double() @ v.double()  # the dense rule
    got = fuse_low_rank(h, k_act, low, 0.1, 0.1, act)
    scale = expected.abs().max()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=float(scale) * 1e-5)
    torch.testing.assert_close(got, fuse(h, k_act, v, 0.1, 0.1, act), rtol=0, atol=float(scale) * 1e-5)


def test_memory_decodes_low_rank_only_for_one_new_token() -> None:
    """With value_span, a (B, 1, d) call reads V factored, a longer one dense: the same numbers."""
    torch.manual_seed(0)
    mem = VisualMemory(alpha=0.1, drop_ratio=0.1, qk_act="silu")
    w2b2, e_v = torch.randn(16, 5), torch.randn(20, 16)
    v = torch.randn(2, 20, 5) @ w2b2.T + e_v  # (B, N, d) in the span
    k, h1, h4 = torch.randn(2, 20, 16), torch.randn(2, 1, 16), torch.randn(2, 4, 16)
    with torch.no_grad(), mem.holding(k, v, value_span=(e_v, w2b2)):
        one, four = mem(h1), mem(h4)
        assert mem._low_rank is not None and mem._low_rank.coef_t.shape == (2, 5, 20)
    torch.testing.assert_close(one, fuse(h1, F.silu(k), v, 0.1, 0.1, "silu"), rtol=1e-5, atol=1e-6)
    assert torch.equal(four, fuse(h4, F.silu(k), v, 0.1, 0.1, "silu"))  # dense: the very same op
    assert mem._low_rank is None and mem._span is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")
def test_fusion_on_cuda_equals_cpu() -> None:
    torch.manual_seed(0)
    h, k, v, r = torch.randn(2, 9, 16), torch.randn(2, 40, 16), torch.randn(2, 40, 16), torch.randn(2, 9, 16)
    k_act = qk_activation(k, "silu")
    cpu = fuse(h, k_act, v, 0.1, 0.1, "silu", r)
    gpu = fuse(h.cuda(), k_act.cuda(), v.cuda(), 0.1, 0.1, "silu", r.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    low = LowRankValues.of(v, torch.zeros(40, 16), torch.eye(16)[:, :8])
    low_gpu = LowRankValues(low.coef_t.cuda(), low.basis.cuda(), low.table.cuda())
    torch.testing.assert_close(fuse_low_rank(h[:, :1].cuda(), k_act.cuda(), low_gpu, 0.1, 0.1, "silu").cpu(),
                               fuse_low_rank(h[:, :1], k_act, low, 0.1, 0.1, "silu"), rtol=1e-4, atol=1e-5)
