"""Sharding the model over processes (ademvl/sharding.py): FSDP2 and DeepSpeed ZeRO-2 on 2 CPU processes,
launched as users launch them (torchrun + the CLI), against one process on the same global batches."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ademvl import AdemVLModel
from ademvl.recipes.train import Trainer, train
from ademvl.sharding import check_launch

from .conftest import samples
from .test_train import ENV, TINY, losses, tiny, weights

# 2 ranks x batch 2 x 2 micro-steps == 1 process x batch 2 x 4 micro-steps (the recipe's data order).
# Half the samples without an image: ranks then differ in which parameters get a gradient. fp32 on
# any CPU (`auto` is bf16 on CPUs that compute in it): the checks are to 1e-6.
COMMON = ["--train.max_steps", "4", "--model.adapter_dropout", "0", "--train.batch_size", "2",
          "--data.text_only_fraction", "0.5", "--train.mixed_precision", "fp32"]
ENGINES = ["fsdp", pytest.param("deepspeed-zero2", marks=pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="the deepspeed extra is not installed"))]


def log(run: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run / "log.jsonl").read_text().splitlines()]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ademvl",
                          "train", "--config", str(TINY), *COMMON, "--train.grad_accum", "2", *args],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    train(tiny(out, *COMMON, "--train.grad_accum", "4"))
    return out


def logits(model: AdemVLModel) -> torch.Tensor:
    with torch.no_grad():
        return model(**model.processor(samples())).logits


@pytest.mark.parametrize("engine", ENGINES)
def test_two_sharded_processes_train_as_one_save_a_whole_adapter_and_resume_exactly(engine: str, one_process: Path,
                                                                                   tmp_path: Path) -> None:
    full = tmp_path / "full"
    printed = torchrun("--train.sharding", engine, "--output-dir", str(full)).stdout
    summary = json.loads((full / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["sharding"] == engine and summary["ranks_identical"] is True
    assert [line for line in printed.splitlines() if line.startswith("{")] == [json.dumps(summary)]  # printed once

    # Gradients: the clipped-to norm of each step's whole gradient, then the losses and weights it led to.
    assert log(full, "grad_norm") == pytest.approx(log(one_process, "grad_norm"), rel=1e-6, abs=0)
    assert losses(full) == pytest.approx(losses(one_process), rel=1e-6, abs=0)
    a, b = weights(full), weights(one_process)
    assert a.keys() == b.keys()
    # Whole tensors in the model's shapes, not one rank's shard. 1e-5 is under 1/500 of one step's lr
    # (7.8e-3); measured: 4 of one tensor's 8,192 entries differ by up to 3.4e-6 after 4 steps while the
    # gradient norms agree to 1e-6 (AdamW's division by sqrt(v) + eps amplifies the rounding of another
    # reduction order where a gradient is tiny).
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)

    # The frozen LLM's parameter bytes held per rank: FSDP2 halves them; ZeRO-2 shards only the
    # trainable weights' gradients and optimizer state, the LLM stays whole.
    whole = json.loads((one_process / "summary.json").read_text())["llm_param_bytes_per_rank"][0]
    assert summary["llm_param_bytes_per_rank"] == ([whole // 2] * 2 if engine == "fsdp" else [whole] * 2)

    # One process loads the sharded run's adapter and gives the one-process run's logits.
    torch.testing.assert_close(logits(AdemVLModel.from_pretrained(full / "checkpoint")),
                               logits(AdemVLModel.from_pretrained(one_process / "checkpoint")), rtol=0, atol=1e-5)

    # Resume from step 2 (weights, the engine's optimizer state, schedule): steps 3-4 as uninterrupted.
    resumed = tmp_path / "resumed"
    torchrun("--train.sharding", engine, "--resume", str(full / "checkpoints" / "step-2"), "--output-dir", str(resumed))
    assert losses(resumed) == losses(full)[2:]
    for k, v in weights(resumed).items():
        torch.testing.assert_close(v, a[k], rtol=0, atol=1e-6)
    # Each engine keeps its own optimizer state: resuming under another is refused, with the fix.
    with pytest.raises(ValueError, match=f"saved with train.sharding {engine}, this run has none.*--train.sharding {engine}"):
        Trainer(tiny(tmp_path / "other", *COMMON, "--train.grad_accum", "4"), resume=str(full / "checkpoints" / "step-2"))


def test_a_launch_that_would_not_shard_is_refused(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="needs 2 or more processes"):
        Trainer(tiny(tmp_path, "--train.sharding", "fsdp"))
    # accelerate launch with an FSDP / DeepSpeed config on CPUs: Accelerate would quietly run DDP.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="Accelerate does not apply on this machine.*--train.sharding fsdp"):
        Trainer(tiny(tmp_path))
    with pytest.raises(ValueError, match="--train.sharding deepspeed-zero2"):
        check_launch("none", 2, None, "deepspeed")
    with pytest.raises(ValueError, match="DeepSpeed did not start"):  # e.g. a config with use_cpu: true
        check_launch("deepspeed-zero2", 2, None, None)
    with pytest.raises(ValueError, match="the Accelerate config runs deepspeed"):
        check_launch("fsdp", 2, "deepspeed", "deepspeed")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_launch("none", 8, "fsdp", "fsdp", fsdp_version=1)
    with pytest.raises(ValueError, match="deepspeed-zero3 is not supported yet"):
        check_launch("deepspeed-zero3", 2, "deepspeed", None)
    check_launch("fsdp", 2, None, "fsdp")  # ademvl shards where Accelerate will not
    check_launch("none", 8, "fsdp", "fsdp", fsdp_version=2)  # Accelerate's FSDP2 on GPUs
    with pytest.raises(ValueError, match="train.sharding='zero2': choose one of none, fsdp"):
        tiny(tmp_path, "--train.sharding", "zero2")


def test_a_sharded_model_refuses_to_generate_and_says_how() -> None:
    """FSDP gathers parameters around forward() only; generate() on a shard would fail deep inside."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from ademvl.sharding import is_sharded

    from .conftest import tiny_model

    model = tiny_model()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fully_shard(model)
        assert is_sharded(model)
        with pytest.raises(RuntimeError, match=r"sharded over processes.*from_pretrained\(OUT/checkpoint\)"):
            model.answer([None], ["Hi?"], max_new_tokens=2)
    finally:
        dist.destroy_process_group()
