"""`ademvl bench` on tiny random models: the files, their keys and the relations between methods.

Timings are never asserted (they depend on the machine); counts, FLOPs and checks are exact.
"""

from __future__ import annotations

import argparse
import json
import shlex

import pytest
import torch

from ademvl import bench, hub
from ademvl.config import AdemVLConfig
from ademvl.peers import METHODS, build_peers

TINY = dict(llm="random:tiny-llama", vision="random:tiny-clip", scales=(16, 4))
RUN = dict(TINY, batch=2, text_len=8, new_tokens=3, repeats=1, warmup=0, flops_text_len=16, progress=False)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ademvl")
    bench.add_parser(p.add_subparsers(dest="command"))
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rows = bench.run_bench(out, **RUN)
    return out, rows


def text_only_flops(cfg, length: int) -> int:
    """A LLaMA forward over `length` tokens with logits for the last one: linears, attention, LM head."""
    d, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = d // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    linear = 2 * (d * d + 2 * d * kv + d * d + 3 * d * ff) * length  # q, k, v, o, gate, up, down
    attention = 2 * (2 * cfg.num_attention_heads * length * length * hd)  # scores and weighted sum
    return layers * (linear + attention) + 2 * d * cfg.vocab_size


def test_files_and_row_keys(run) -> None:
    out, rows = run
    saved = json.loads((out / "bench.json").read_text())
    assert isinstance(saved, list) and [r["method"] for r in saved] == list(METHODS)
    for r in saved:
        assert set(bench.ROW_KEYS) <= set(r)
        assert r["batch"] == 2 and r["text_len"] == 8 and r["new_tokens"] == 3 and r["llm"] == TINY["llm"]
        assert r["train_step_s"] > 0 and r["decode_tokens_per_s"] > 0 and len(r["train_step_all_s"]) == 1
        assert r["generate_s"] == pytest.approx(r["prefill_s"] + r["decode_s"])
        assert r["decode_tokens_per_s"] == pytest.approx(2 * (3 - 1) / r["decode_s"])
        assert r["peak_mem_mb"] is None or r["peak_mem_mb"] >= 0
    assert saved == json.loads(json.dumps(rows))
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_extra_tokens_and_trainable_params_are_the_models(run) -> None:
    _, rows = run
    by = {r["method"]: r for r in rows}
    vision = hub.load_vision(TINY["vision"])
    patches = (vision.config.image_size // vision.config.patch_size) ** 2
    assert {m: r["extra_tokens"] for m, r in by.items()} == {
        "text-only": 0, "adem-vl": 1, "adem-vl-reference": 1, "memvp": 0, "llava": patches}
    peers = build_peers(hub.load_llm(TINY["llm"]), vision, AdemVLConfig(**TINY))
    assert {m: r["trainable_params"] for m, r in by.items()} == {m: p.num_trainable() for m, p in peers.items()}
    assert by["text-only"]["trainable_params"] == 0
    assert by["adem-vl"]["trainable_params"] == peers["adem-vl"].model.num_trainable()


def test_flops_per_token_are_exact(run) -> None:
    _, rows = run
    by = {r["method"]: r for r in rows}
    cfg = hub.shape_config(TINY["llm"])
    d, layers, n = cfg.hidden_size, cfg.num_hidden_layers, sum(TINY["scales"])
    length = RUN["flops_text_len"]
    assert by["text-only"]["flops_per_token"] == text_only_flops(cfg, length)
    # ADEM-VL's fusion: two batched matmuls (A = q K^T, A V) per layer over the text and its [cls] token
    assert bench.fusion_flops(by["adem-vl"], by["text-only"]) == layers * 2 * (2 * (length + 1) * n * d)
    assert bench.fusion_flops(by["memvp"], by["text-only"]) == layers * 2 * (2 * length * 16 * d)
    assert by["adem-vl"]["flops_per_token"] == by["adem-vl-reference"]["flops_per_token"]
    assert by["text-only"]["flops_per_token"] < by["adem-vl"]["flops_per_token"] < by["llava"]["flops_per_token"]
    assert by["llava"]["flops_by_op"]["mm"] > by["adem-vl"]["flops_by_op"]["mm"]  # 16 more tokens through every linear
    assert by["text-only"]["decode_flops_per_token"] < by["llava"]["decode_flops_per_token"]


def test_fusion_micro_benchmark_agrees(run) -> None:
    _, rows = run
    by = {r["method"]: r for r in rows}
    for m in ("adem-vl", "adem-vl-reference"):
        f = by[m]
        assert f["fusion_shape"] == "B=2 T=9 N=20 d=64 layers=2"
        assert f["fusion_same_outputs"] is True and f["fusion_same_drops"] is True
        assert f["fusion_max_rel_diff_out"] < 1e-5 and f["fusion_max_rel_diff_grad"] < 1e-5
        assert f["fusion_speedup"] == pytest.approx(f["fusion_reference_fwd_bwd_s"] / f["fusion_fwd_bwd_s"])
    assert all("fusion_speedup" not in by[m] for m in ("text-only", "memvp", "llava"))


def test_markdown_names_machine_tower_command_and_targets(run) -> None:
    out, rows = run
    md = (out / "bench.md").read_text()
    assert "| Method | Trainable params | Extra input tokens | Training (s/batch) | Inference (s/batch) |" in md
    for label in bench.LABELS.values():
        assert md.count(f"| {label} |") == 2  # the table and the ratios
    assert bench.describe_machine(torch.device("cpu")) in md
    assert "random:tiny-clip: random weights" in md
    for text, *_ in bench.TARGETS:
        assert f"| {text} |" in md
    assert "## Fusion op" in md and "## Where ADEM-VL's cost above text-only goes" in md
    command = md.split("Command: `")[1].split("`")[0]
    args = parser().parse_args(shlex.split(command)[1:])  # the printed command reproduces the run
    assert (args.out, args.batch, args.text_len, args.new_tokens, args.repeats, args.warmup) == (str(out), 2, 8, 3, 1, 0)
    assert (args.llm, args.vision, tuple(args.scales), args.flops_text_len) == (TINY["llm"], TINY["vision"], (16, 4), 16)
    assert args.methods == list(METHODS) and args.fusion


def test_ratios_and_targets_in_the_report() -> None:
    def row(method: str, train: float, tps: float, flops: int) -> dict:
        return {"method": method, "train_step_s": train, "decode_tokens_per_s": tps, "flops_per_token": flops,
                "peak_mem_mb": 10.0, "trainable_params": 1, "extra_tokens": 0, "generate_s": 1.0,
                "flops_by_op": {}, "llm": "x", "vision": "hf/vit", "device": "CPU test", "torch": "t", "dtype": "fp32",
                "batch": 8, "text_len": 128, "new_tokens": 2, "repeats": 1, "warmup": 0, "scales": [256, 64],
                "flops_text_len": 256}
    rows = [row("text-only", 1.0, 100.0, 100), row("adem-vl", 1.1, 95.0, 120), row("llava", 2.0, 50.0, 200)]
    md = bench.markdown(rows, "ademvl bench --out x")
    assert "| ADEM-VL training step <= 1.15 x text-only | 1.10x | yes |" in md
    assert "| ADEM-VL decode tokens/s >= 0.90 x text-only | 0.95x | yes |" in md
    assert "| ADEM-VL training step <= 0.5 x LLaVA-style | 0.55x | no |" in md
    assert "| ADEM-VL FLOPs per new token <= 0.5 x LLaVA-style | 0.60x | yes |" not in md
    assert "| ADEM-VL FLOPs per new token <= 0.5 x LLaVA-style | 0.60x | no |" in md
    assert "| ADEM-VL (ours) | 1.10x | 0.55x | 1.00x | 1.00x | 0.95x | 1.20x | 0.60x | 1.00x |" in md
    assert "vision tower hf/vit: pretrained weights" in md


def test_cli_subset_without_fusion(tmp_path) -> None:
    args = parser().parse_args(["bench", "--out", str(tmp_path), "--llm", TINY["llm"], "--vision", TINY["vision"],
                                "--scales", "16", "4", "--batch", "1", "--text-len", "4", "--new-tokens", "2",
                                "--repeats", "1", "--warmup", "0", "--flops-text-len", "4",
                                "--methods", "text-only", "adem-vl", "--no-fusion"])
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["method"] for r in rows] == ["text-only", "adem-vl"]
    assert all("fusion_speedup" not in r for r in rows)
    md = (tmp_path / "bench.md").read_text()
    assert "--methods text-only adem-vl --no-fusion" in md and "## Fusion op" not in md
    assert "| ADEM-VL training step <= 0.5 x LLaVA-style |" not in md  # no LLaVA-style row to compare with


@pytest.mark.parametrize("change,match", [
    (dict(scales=(256, 64)), "--scales 256 64: the tower random:tiny-clip gives a grid of 16"),
    (dict(new_tokens=1), "--new-tokens 1: need at least 2"),
    (dict(methods=["adem-vl", "lavin"]), "choose among text-only"),
    (dict(dtype="fp8"), "--dtype fp8"),
    (dict(compile=True, warmup=0), "--compile needs --warmup >= 1"),
])
def test_bad_settings_are_named(tmp_path, change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bench.run_bench(tmp_path, **{**RUN, **change})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="--device cuda: no CUDA device"):
        bench.run_bench(tmp_path, **{**RUN, "device": "cuda"})


def test_rounds_rotate_the_order_of_methods() -> None:
    assert list(bench._rounds(["a", "b", "c"], warmup=1, repeats=2)) == [
        (0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"), (2, "c"), (2, "a"), (2, "b")]


@pytest.mark.skipif(not bench._cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_memory_sees_a_freed_tensor() -> None:
    with bench.peak_memory(torch.device("cpu")) as mem:
        x = torch.ones(50 * 2**20 // 4)  # 50 MiB, written, then freed before the block ends
        del x
    assert 45 <= mem["mb"] < 60  # page-granular, and a little may come from pages already resident
    with bench.peak_memory(torch.device("cpu")) as mem:
        pass
    assert mem["mb"] < 5


def test_flops_at_full_depth_from_two_shallow_models(tmp_path) -> None:
    """A 4-layer model counted directly equals the count extrapolated from its 1- and 2-layer versions."""
    shape = hub.shape_config(TINY["llm"])
    path = tmp_path / "tiny4.json"
    path.write_text(json.dumps(shape.to_dict() | {"num_hidden_layers": 4, "model_type": "llama"}))
    llm = f"random:{path}"
    config = AdemVLConfig(llm=llm, vision=TINY["vision"], scales=TINY["scales"])
    rows = bench.flops_at_depth(llm, TINY["vision"], config, text_len=16, progress=False)
    direct = build_peers(hub.load_llm(llm), hub.load_vision(TINY["vision"]), config)
    data1 = bench.make_batch(shape.vocab_size, 1, 16, 224, shape.bos_token_id)
    for r in rows:
        counted = bench.flops_per_token(direct[r["method"]].eval(), data1)
        assert r["flops_per_token"] == counted["flops_per_token"]
        assert r["decode_flops_per_token"] == counted["decode_flops_per_token"]
        assert r["flops_by_op"] == counted["flops_by_op"]
        assert r["trainable_params"] == direct[r["method"]].num_trainable() and r["layers"] == 4
    args = parser().parse_args(["bench", "--out", str(tmp_path / "f"), "--llm", llm, "--vision", TINY["vision"],
                                "--scales", "16", "4", "--flops-text-len", "16", "--flops-only"])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "f" / "flops.json").read_text()) == rows
    assert "| ADEM-VL (ours) |" in (tmp_path / "f" / "flops.md").read_text()
