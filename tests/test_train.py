"""The training recipe (ademvl/recipes/train.py): data parallel, exact resume, crash-safe checkpoints, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ademvl import AdemVLModel
from ademvl.cli import main
from ademvl.config import RunConfig, TrainConfig, load_run_config
from ademvl.recipes.train import GROUP_SPAN, StepBatches, Trainer, global_batch, list_checkpoints, train

from .conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "ademvl" / "configs" / "tiny.yaml"
# CPU processes (gloo) even where a GPU is visible: two ranks on a one-GPU machine would both ask for cuda:rank.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "adapter.safetensors"))


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def tiny(out: Path, *overrides: str) -> RunConfig:
    return load_run_config(TINY, ["--train.output_dir", str(out), *overrides])


def test_config_overrides_lr_rule_and_errors(tmp_path: Path) -> None:
    cfg = load_run_config(TINY, ["--train.batch_size", "2", "--model.beta=0.5", "--train.lr_multipliers.proj", "3"])
    assert cfg.train.batch_size == 2 and cfg.model.beta == 0.5 and cfg.train.lr_multipliers == {"proj": 3}
    assert load_run_config(TINY, ["--train.blr", "9e-3"]).train.blr == 0.009  # not the string PyYAML makes
    assert load_run_config("tiny", ["train.seed=3"]).train.seed == 3  # a shipped config by name, a key=value override
    t = Trainer(tiny(tmp_path, "--train.grad_accum", "3", "--train.lr_multipliers.proj", "3"))
    assert t.total_batch == 12 and t.lr == pytest.approx(0.5 * 12 / 256)
    lrs = {g["name"]: g["initial_lr"] for g in t.optimizer.param_groups}
    assert lrs["proj"] == pytest.approx(3 * t.lr) and lrs["pos_k"] == pytest.approx(t.lr)
    no_decay = {p for g in t.optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(p.ndim == 1 for p in no_decay) and len(no_decay) > 0
    with pytest.raises(ValueError, match=r"unknown run config key\(s\) \['batchsize'\] in train; valid keys: output_dir"):
        tiny(tmp_path, "--train.batchsize", "2")
    with pytest.raises(ValueError, match=r"run config train.batch_size: Value 'two'"):
        tiny(tmp_path, "--train.batch_size", "two")
    with pytest.raises(ValueError, match="lr_multipliers: unknown group.*valid: cls_proj"):
        Trainer(tiny(tmp_path, "--train.lr_multipliers.projector", "2"))
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    # YAML reads a bare `no` as false; the setting still means fp32
    assert load_run_config(TINY, ["--train.mixed_precision", "no"]).train.mixed_precision == "no"
    with pytest.raises(ValueError, match=r"choose auto, fp32 \(or no\), bf16 or fp16"):
        TrainConfig.from_dict({"mixed_precision": "fp8"})


def test_schedule_and_data_order(tmp_path: Path) -> None:
    t = Trainer(tiny(tmp_path, "--train.warmup_steps", "2", "--train.max_steps", "10"))
    # transformers' cosine schedule with warm-up: linear from 0 over 2 steps, then half a cosine to 0
    assert [round(t.scheduler.lr_lambdas[0](s), 4) for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    epoch0 = [i for s in range(4) for i in global_batch(s, 17, 4, seed=0)]
    assert sorted(epoch0) == sorted(set(epoch0)) and len(epoch0) == 16  # each sample at most once, drop-last
    assert global_batch(4, 17, 4, 0) != global_batch(0, 17, 4, 0)  # a new permutation per epoch
    assert global_batch(5, 17, 4, 0) == global_batch(5, 17, 4, 0)  # a function of the step alone


def test_group_by_length_batches_like_lengths() -> None:
    n, tb = 2000, 8
    lengths = [(i * 7919) % 60 + 10 for i in range(n)]  # 10 .. 69 tokens
    steps = n // tb
    epoch0 = [global_batch(s, n, tb, 3, lengths) for s in range(steps)]
    flat = [i for b in epoch0 for i in b]
    assert sorted(flat) == list(range(n))  # still every sample once per epoch
    plain = [global_batch(s, n, tb, 3) for s in range(steps)]
    pad = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs)  # tokens computed, padding included
    assert pad(epoch0) < 0.75 * pad(plain)  # random batches pad to ~62 on average; grouped ones hardly pad
    # each run of GROUP_SPAN batches of the epoch's permutation is what got sorted
    span = GROUP_SPAN * tb
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3 * 100_003)).tolist()
    assert {tuple(sorted(b)) for b in epoch0} == {
        tuple(sorted(run[k:k + tb])) for i in range(0, n, span)
        for run in [sorted(perm[i:i + span], key=lambda j: lengths[j])] for k in range(0, len(run), tb)}
    assert global_batch(steps + 2, n, tb, 3, lengths) != epoch0[2]  # a new grouping per epoch
    assert global_batch(7, n, tb, 3, lengths) == epoch0[7]  # a function of the step alone (resume)


def test_resume_auto_ends_with_the_weights_of_an_uninterrupted_run(tmp_path: Path, monkeypatch) -> None:
    full = train(tiny(tmp_path / "full", "--train.max_steps", "6"))
    assert full["steps"] == 6

    real_save = Trainer.save_state

    def save_then_crash(self: Trainer):
        path = real_save(self)
        if self.step == 4:
            raise KeyboardInterrupt  # interrupted right after the step-4 checkpoint
        return path

    monkeypatch.setattr(Trainer, "save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "cut", "--train.max_steps", "6"))
    monkeypatch.setattr(Trainer, "save_state", real_save)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-2", "step-4"]
    resumed = Trainer(tiny(tmp_path / "cut", "--train.max_steps", "6"), resume="auto")
    assert resumed.step == 4 and resumed.scheduler.last_epoch == 4
    resumed.fit()

    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in a:  # dropout is on: the RNG state was restored too
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert losses(tmp_path / "cut")[-2:] == pytest.approx(losses(tmp_path / "full")[-2:], abs=1e-6)


def test_data_parallel_two_processes_match_one_process_with_accumulation(tmp_path: Path) -> None:
    """torchrun, 2 ranks x batch 4  ==  1 process x batch 4 x 2 accumulation steps (same global batch)."""
    common = ["--config", str(TINY), "--max-steps", "4", "--model.adapter_dropout", "0"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ademvl", "train", *common,
                          "--output-dir", str(tmp_path / "ddp")], capture_output=True, text=True, env=ENV, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "ademvl", "train", *common, "--train.grad_accum", "2",
                          "--output-dir", str(tmp_path / "one")], capture_output=True, text=True, env=ENV, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["ranks_identical"] is True
    assert [json.loads(line)["processes"] for line in ddp.stdout.splitlines() if line.startswith("{")] == [2]  # printed once
    ckpts = list_checkpoints(tmp_path / "ddp")
    assert [p.name for p in ckpts] == ["step-2", "step-4"]
    assert sorted(f.name for f in ckpts[-1].iterdir()) == ["adapter.safetensors", "ademvl_config.json",
                                                           "rng_state_0.pt", "rng_state_1.pt", "trainer_state.pt"]
    assert len(losses(tmp_path / "ddp")) == 4  # one log line per step: only rank 0 writes
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_sigkill_during_checkpoint_write_leaves_a_loadable_newest_checkpoint(tmp_path: Path) -> None:
    out, marker = tmp_path / "run", tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time, ademvl.files as f
        real = f.fsync_tree
        def slow(path):
            real(path)
            if path.name.startswith(".step-4.tmp"):  # everything written, not yet renamed into place
                open({str(marker)!r}, "w").close()
                time.sleep(120)
        f.fsync_tree = slow
        from ademvl.cli import main
        main(["train", "--config", {str(TINY)!r}, "--output-dir", {str(out)!r}, "--max-steps", "6"])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.stderr.read().decode()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    newest = list_checkpoints(out)[-1]
    assert newest.name == "step-2"  # the half-committed step-4 is not taken for a checkpoint
    AdemVLModel.from_pretrained(newest)  # loads
    t = Trainer(tiny(out, "--train.max_steps", "6"), resume="auto")
    assert t.step == 2
    t.fit()
    assert [p.name for p in list_checkpoints(out)] == ["step-4", "step-6"]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path: Path, capsys) -> None:
    args = ["train", "--config", str(TINY), "--output-dir", str(tmp_path), "--train.lr", "1e30",
            "--train.save_every", "1", "--train.warmup_steps", "1", "--train.clip_grad", "null"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "loss is nan" in err or "loss is inf" in err
    newest = list_checkpoints(tmp_path)[-1]
    assert f"Last good checkpoint: {newest}" in err and "--resume auto" in err
    step = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["step"]
    assert newest.name == f"step-{step}"
    assert all(torch.isfinite(v).all() for v in load_file(str(newest / "adapter.safetensors")).values())


def test_batches_without_images_train(tmp_path: Path) -> None:
    """Only text: the run trains (DDP needs a gradient for every parameter: the recipe adds a zero term)."""
    summary = train(tiny(tmp_path, "--data.text_only_fraction", "1.0", "--train.max_steps", "2"))
    assert summary["steps"] == 2 and summary["final_loss"] > 0


def test_text_only_batch_gives_the_vision_side_exactly_zero_gradient() -> None:
    """No image: nothing reaches the adapters or projectors; the position tables still learn (K = E_k, V = E_v)."""
    from ademvl import Sample

    model = tiny_model()
    model.train()
    batch = model.processor([Sample("t", None, [("What colour is the sky?", "blue")])])
    model(**batch).loss.backward()
    grads = {k: p.grad for k, p in model.trainable_state_dict().items()}
    vision = [k for k in grads if k.split(".")[0] in ("vision_adapters", "proj", "cls_proj")]
    assert vision and all(grads[k] is None or not grads[k].any() for k in vision)
    assert grads["pos_v"].abs().sum() > 0  # V = E_v: the no-image path has weights of its own


def test_step_batches_are_the_global_batch_slices_of_each_rank() -> None:
    """2 ranks x 2 micro-steps of batch 3: rank r's micro-step m is slice m * world + r of the step's batch."""
    seen = {r: list(StepBatches(50, 3, 2, world=2, rank=r, seed=1, start=1, stop=3)) for r in (0, 1)}
    for step in (1, 2):
        idx = global_batch(step, 50, 12, seed=1)
        i = 2 * (step - 1)
        assert seen[0][i] == idx[0:3] and seen[1][i] == idx[3:6] and seen[0][i + 1] == idx[6:9] and seen[1][i + 1] == idx[9:12]
    assert len(StepBatches(50, 3, 2, 2, 0, 1, start=5, stop=8)) == 6  # resuming at step 5: the rest only
