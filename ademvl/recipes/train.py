"""`ademvl train --config FILE`: the training recipe, on Hugging Face Accelerate.

One process on a CPU by default; `accelerate launch` or `torchrun` for data parallel. No process
group or gradient sync is written here: Accelerate wraps the model (DDP) and owns mixed precision.
`train.sharding` (fsdp, deepspeed-zero2) splits the model over the processes instead; what that
changes (who shards, whole tensors for checkpoints, the engine's optimizer state) is in
ademvl/sharding.py, and here only where the loop calls it.

A config file (a RunConfig, ademvl/config.py; shipped ones in ademvl/configs/) has three sections:

    model:  AdemVLConfig fields (the method)
    data:   task: NAME plus that task's `load_samples` arguments (ademvl/tasks/NAME.py)
    train:  TrainConfig fields (how to train)

and any key can be overridden on the command line: `--train.batch_size 4 model.beta=0.1`.

Data order: the sample order of epoch e is a permutation seeded by (seed, e), and optimizer step
s takes the global batch order[s * B : (s + 1) * B]. The position in the data is therefore the
step number alone, which makes resuming exact and lets every rank pick its own share of the
same global batch (rank r, micro-step m takes slice m * world + r), so N processes with
batch b see exactly the samples of one process with batch b and N accumulation steps. A torch
DataLoader over that step-addressed sampler (`StepBatches`) decodes and collates in worker
processes beside the training loop.

Checkpoints (OUT/checkpoints/step-N/) hold the trainable weights and config (loadable with
AdemVLModel.from_pretrained) plus trainer_state.pt and one rng_state_RANK.pt per process. They
are written with `atomic_directory` (ademvl/files.py): a kill mid-write leaves the previous
checkpoint as the newest complete one. The final weights go to OUT/checkpoint/.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from .. import precision, sharding, tasks
from ..config import RunConfig
from ..data import Sample
from ..files import InputError, InputNotFound, atomic_directory, output_dir, read_torch
from ..model import AdemVLModel, decoder_layers

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def load_data(data_cfg: dict[str, Any]) -> list[Sample]:
    """`ademvl.tasks.<task>.load_samples(**rest)` for the config's data section."""
    data_cfg = dict(data_cfg)
    task = data_cfg.pop("task", None)
    if not task:
        raise ValueError("data.task is missing (e.g. scienceqa, coco, instruct, synthetic)")
    load = tasks.get(task).load_samples
    valid = [p for p in inspect.signature(load).parameters]
    unknown = sorted(set(data_cfg) - set(valid))
    if unknown:
        raise ValueError(f"data: unknown key(s) {unknown} for task {task}; valid keys: task, {', '.join(valid)}")
    samples = load(**data_cfg)
    if not samples:
        raise ValueError(f"data: task {task} with {data_cfg} gave no samples")
    return samples


# ---- data order ------------------------------------------------------------------------------
def global_batch(step: int, n: int, total_batch: int, seed: int, lengths: list[int] | None = None) -> list[int]:
    """Sample indices of optimizer step `step`: a seeded permutation per epoch, drop-last.

    lengths (train.group_by_length): each run of GROUP_SPAN batches of the permutation is sorted by
    sample length and cut into batches again, and the epoch's batches are shuffled: a batch pads
    to its own longest sample, so batches of like lengths compute on fewer padding tokens (the
    Hugging Face Trainer's group_by_length, as a function of the step alone, so resuming stays exact).
    """
    per_epoch = n // total_batch
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return perm[pos * total_batch : (pos + 1) * total_batch]
    return _grouped_epoch(tuple(perm[: per_epoch * total_batch]), total_batch, tuple(lengths), seed * 100_003 + epoch)[pos]


GROUP_SPAN = 50  # batches sorted together by train.group_by_length (the HF Trainer's megabatch)


@functools.lru_cache(maxsize=2)
def _grouped_epoch(perm: tuple[int, ...], total_batch: int, lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    span = GROUP_SPAN * total_batch
    batches = []
    for i in range(0, len(perm), span):
        run = sorted(perm[i : i + span], key=lambda j: lengths[j])
        batches += [run[k : k + total_batch] for k in range(0, len(run), total_batch)]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return [batches[k] for k in order]


class StepBatches(Sampler[list[int]]):
    """This rank's micro-batches of optimizer steps start..stop-1, in order (a DataLoader batch sampler).

    Step s takes the global batch `global_batch(s, ...)`; rank r's micro-step m is its slice
    m * world + r. The position in the data is the step number alone: resuming at step s starts
    the sampler at s.
    """

    def __init__(self, n: int, batch_size: int, grad_accum: int, world: int, rank: int, seed: int,
                 start: int, stop: int, lengths: list[int] | None = None) -> None:
        self.n, self.b, self.accum, self.world, self.rank, self.seed = n, batch_size, grad_accum, world, rank, seed
        self.start, self.stop, self.lengths = start, stop, lengths

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            idx = global_batch(step, self.n, self.b * self.accum * self.world, self.seed, self.lengths)
            for m in range(self.accum):
                j = (m * self.world + self.rank) * self.b
                yield idx[j : j + self.b]


# ---- checkpoints -----------------------------------------------------------------------------
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first (temporary directories ignored)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.pt").exists():
        raise InputNotFound(path, "not a training checkpoint (no trainer_state.pt)",
                            f"pass a directory under OUTPUT/{CHECKPOINTS}/ or --resume auto")
    return path


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the loop --------------------------------------------------------------------------------
class Trainer:
    """Everything one training run holds. `fit()` runs it; the pieces are methods for reading."""

    def __init__(self, cfg: RunConfig, resume: str | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.tc, self.model_cfg = cfg.train, cfg.model
        self.out = Path(self.tc.output_dir)
        # auto: bf16 on a GPU, and on a CPU that computes in bf16 (ademvl/precision.py); fp32 elsewhere
        self.precision = precision.resolve(self.tc.mixed_precision)
        # cpu=True on a machine without an accelerator lets torchrun start gloo data parallel; it
        # would also switch DeepSpeed off, which runs on CPUs by itself (gloo).
        stage = sharding.zero_stage(self.tc.sharding)
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # Accelerate keeps one mixed precision per process: a second train() from Python (a notebook, a
            # test) that asks for another one would be refused. One process has nothing to keep in sync.
            AcceleratorState._reset_state()
        plugin = sharding.deepspeed_plugin(stage, self.tc) if stage and sharding.launcher_asks() != "deepspeed" else None
        self.acc = Accelerator(mixed_precision=self.precision, cpu=not (torch.accelerator.is_available() or stage),
                               deepspeed_plugin=plugin, kwargs_handlers=sharding.process_group_kwargs(stage),
                               log_with="tensorboard", project_dir=str(self.out))
        engine = {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(self.acc.distributed_type)
        self.sharding = self.tc.sharding  # or what an Accelerate config runs (GPUs) when that is not set:
        if self.sharding == "none" and engine:
            self.sharding = "fsdp" if engine == "fsdp" else f"deepspeed-zero{self.acc.state.deepspeed_plugin.zero_stage}"
        sharding.check_launch(self.sharding, self.acc.num_processes, engine, sharding.launcher_asks(),
                              self.acc.state.fsdp_plugin.fsdp_version if engine == "fsdp" else None)
        # FSDP: Accelerate's plugin where it runs (GPUs), else ademvl's own fully_shard (CPU processes).
        self.own_fsdp = self.sharding == "fsdp" and engine is None
        self.resume_from = resolve_resume(resume, self.out)
        set_seed(self.tc.seed)  # the same initial trainable weights on every rank

        self.samples = load_data(cfg.data)
        self.total_batch = self.tc.batch_size * self.tc.grad_accum * self.acc.num_processes
        if len(self.samples) < self.total_batch:
            raise ValueError(f"{len(self.samples)} samples is fewer than one total batch of {self.total_batch} "
                             "(batch_size x grad_accum x processes)")
        steps_per_epoch = len(self.samples) // self.total_batch
        self.max_steps = self.tc.max_steps or max(1, round(self.tc.epochs * steps_per_epoch))
        self.warmup = self.tc.warmup_steps if self.tc.warmup_steps is not None else round(self.tc.warmup_epochs * steps_per_epoch)
        self.warmup = max(1, min(self.warmup, self.max_steps))
        self.lr = self.tc.lr if self.tc.lr is not None else self.tc.blr * self.total_batch / 256

        with self.acc.main_process_first():  # the embedded LLM is converted once, by rank 0
            if self.own_fsdp and not self.acc.is_main_process:  # shapes only: rank 0 sends each its shard
                model = sharding.build_on_meta(self.model_cfg)
            else:
                model = AdemVLModel.build(self.model_cfg)
        if self.tc.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.raw = model
        self.processor = model.processor
        if self.resume_from is not None:  # before sharding, while the weights are whole tensors
            model.load_adapter(self.resume_from)
        if self.own_fsdp:
            sharding.shard_fsdp(model, decoder_layers(model.llm), self.acc.device,
                                torch.bfloat16 if self.precision == "bf16" else torch.float16 if self.precision == "fp16" else None)
        optimizer = torch.optim.AdamW(self.param_groups(model), lr=self.lr, weight_decay=self.tc.weight_decay,
                                      betas=self.tc.betas)
        if engine == "deepspeed":
            sharding.fit_deepspeed_config(self.acc.state.deepspeed_plugin, self.tc)
        if self.own_fsdp:  # prepare() would wrap the sharded model in DDP
            self.model, self.optimizer = model, self.acc.prepare(optimizer)
        else:
            self.model, self.optimizer = self.acc.prepare(model, optimizer)
        if engine == "fsdp":
            self.model.set_reduce_scatter_unused_params(True)  # as shard_fsdp does (see there)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # Not handed to accelerate.prepare: its wrapper steps the schedule once per process.
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            self.base_optimizer(),
            num_warmup_steps=self.warmup, num_training_steps=self.max_steps,
            min_lr_rate=self.tc.min_lr / self.lr if self.lr > 0 else 0.0)
        self.step = 0
        if self.resume_from is not None:
            self.load_state(self.resume_from)

    def base_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW under Accelerate's wrapper (and DeepSpeed's): the one whose lr the schedule sets."""
        opt = self.optimizer
        while hasattr(opt, "optimizer"):
            opt = opt.optimizer
        return opt

    def param_groups(self, model: AdemVLModel) -> list[dict[str, Any]]:
        """One AdamW group per (parameter group, decay or not), each with its lr multiplier."""
        known = set(model.parameter_groups())
        unknown = sorted(set(self.tc.lr_multipliers) - known)
        if unknown:
            raise ValueError(f"train.lr_multipliers: unknown group(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups.setdefault((name.split(".")[0], p.ndim > 1), []).append(p)
        return [{"params": ps, "name": g, "lr": self.lr * self.tc.lr_multipliers.get(g, 1.0),
                 "weight_decay": self.tc.weight_decay if decay else 0.0}
                for (g, decay), ps in groups.items()]

    def batches(self, start: int) -> DataLoader:
        """This rank's collated micro-batches from optimizer step `start` on (see the module docstring)."""
        lengths = [len(self.processor.encode(s)["input_ids"]) for s in self.samples] if self.tc.group_by_length else None
        sampler = StepBatches(len(self.samples), self.tc.batch_size, self.tc.grad_accum, self.acc.num_processes,
                              self.acc.process_index, self.tc.seed, start, self.max_steps, lengths)
        workers = self.tc.num_workers
        # Its own generator: a DataLoader draws its workers' base seed from it, and drawing from the
        # global one would shift the dropout masks of a resumed run.
        return DataLoader(self.samples, batch_sampler=sampler, collate_fn=partial(self.processor, train=True),
                          num_workers=workers, prefetch_factor=2 if workers else None, persistent_workers=False,
                          generator=torch.Generator().manual_seed(self.tc.seed))

    def train_step(self, step: int, micro: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """Forward, backward, clip and update for one optimizer step on its collated micro-batches.

        Returns (loss, grad norm)."""
        self.model.train()
        total = torch.zeros((), device=self.acc.device)
        for m, batch in enumerate(micro):
            batch = {k: v.to(self.acc.device) for k, v in batch.items()}
            # DDP/FSDP: all-reduce only after the last micro-step. DeepSpeed accumulates itself and
            # steps its optimizer inside backward, where Accelerate says the step's batch ends.
            deepspeed = self.acc.distributed_type == DistributedType.DEEPSPEED
            if deepspeed:
                self.acc.sync_gradients = m == len(micro) - 1
            last = m == len(micro) - 1 or deepspeed
            sync = nullcontext() if last else self.acc.no_sync(self.model)
            with sync:
                with self.acc.autocast():
                    zero = 0.0
                    if self.sharding in ("none", "deepspeed-zero2"):  # whole parameters on every rank
                        # A batch without images leaves the vision side without gradient; a zero term
                        # gives every trainable parameter one, as DDP and ZeRO-2 expect, with no extra
                        # graph walk. (FSDP sends zeros for them itself.) Made before the forward, its
                        # backward runs last, so every parameter's gradient completes in the same order
                        # whether its batch had images or not: ZeRO-2 reduces them in that order.
                        zero = 0.0 * sum(p.sum() for p in self.trainable)
                    loss = self.model(**batch, loss_only=True).loss / len(micro) + zero
                # DeepSpeed would divide by the accumulation steps again (the loss is divided above).
                self.acc.backward(loss, **({"scale_wrt_gas": False} if sharding.zero_stage(self.sharding) else {}))
            total += loss.detach()
        loss = self.acc.reduce(total, reduction="mean").item()  # the same number on every rank
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            last = list_checkpoints(self.out)
            raise TrainingDiverged(
                f"loss is {loss} at step {step + 1}; training stopped without applying this update. "
                f"Last good checkpoint: {last[-1] if last else 'none'}. Lower the learning rate "
                "(train.blr / train.lr_multipliers) or use --train.mixed_precision fp32, then --resume auto.")
        clip = sharding.clip_grad_norm if self.own_fsdp else self.acc.clip_grad_norm_
        norm = clip(self.trainable, self.tc.clip_grad) if self.tc.clip_grad else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, float(norm) if norm is not None else float("nan")

    # ---- state ----
    def save_state(self) -> Path | None:
        """Write OUT/checkpoints/step-N atomically (every rank's RNG state included) and keep the last K."""
        from accelerate.utils import gather_object

        rng = gather_object([_rng_state()])  # one per rank, in rank order
        final = self.out / CHECKPOINTS / f"step-{self.step}"
        adapter = self.full_state()  # collectives when sharded
        optimizer = sharding.optimizer_state(self.sharding, self.model, self.engine_optimizer())
        if self.acc.is_main_process:
            with atomic_directory(final) as tmp:
                self.unwrapped().write_checkpoint(tmp, adapter)
                torch.save({"step": self.step, "optimizer": optimizer, "sharding": self.sharding,
                            "scheduler": self.scheduler.state_dict(), "train": dataclasses.asdict(self.tc),
                            "total_batch": self.total_batch, "max_steps": self.max_steps}, tmp / "trainer_state.pt")
                for rank, state in enumerate(rng):
                    torch.save(state, tmp / f"rng_state_{rank}.pt")
            for old in list_checkpoints(self.out)[: -self.tc.keep_last]:
                shutil.rmtree(old)
        self.acc.wait_for_everyone()
        return final

    def load_state(self, path: Path) -> None:
        state = read_torch(path / "trainer_state.pt", "the trainer state of a training checkpoint")
        if state["total_batch"] != self.total_batch:
            raise ValueError(f"{path}: saved with total batch {state['total_batch']}, this run has {self.total_batch} "
                             "(batch_size x grad_accum x processes); the data position would not continue")
        if state.get("sharding", "none") != self.sharding:
            raise ValueError(f"{path}: saved with train.sharding {state.get('sharding', 'none')}, this run has "
                             f"{self.sharding}; each engine keeps its own optimizer state: resume with "
                             f"--train.sharding {state.get('sharding', 'none')}")
        # The adapter weights were loaded before the model was sharded (__init__).
        sharding.load_optimizer_state(self.sharding, self.model, self.engine_optimizer(), state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        rng = path / f"rng_state_{self.acc.process_index}.pt"
        if rng.exists():
            _set_rng_state(read_torch(rng, "the RNG state of a training checkpoint"))

    def precision_note(self) -> str:
        """What the steps compute in, and why (e.g. "bf16 (auto: this CPU computes in bf16)")."""
        return precision.describe(self.tc.mixed_precision, self.precision)

    def unwrapped(self) -> AdemVLModel:
        return self.acc.unwrap_model(self.model)

    def full_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights whole, on every rank (a collective when sharded)."""
        return sharding.full_trainable_state(self.unwrapped())

    def engine_optimizer(self) -> Any:
        """The optimizer whose state the engine defines: torch's AdamW under FSDP, else Accelerate's wrapper."""
        return self.base_optimizer() if self.sharding == "fsdp" else self.optimizer

    def weights_checksum(self) -> float:
        return float(sum(p.double().sum() for p in self.full_state().values()))

    # ---- run ----
    def fit(self) -> dict[str, Any]:
        """Train to max_steps; returns a summary (also written to OUT/summary.json)."""
        main = self.acc.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
                                                  + f"# precision: {self.precision_note()}\n")
            self.acc.init_trackers("tensorboard")
        log = open(self.out / "log.jsonl", "a") if main else None
        if main:
            where = f"resumed from {self.resume_from} at step {self.step}" if self.resume_from else "from scratch"
            print(f"ademvl train: {len(self.samples)} samples, total batch {self.total_batch} "
                  f"({self.acc.num_processes} process(es) x {self.tc.batch_size} x {self.tc.grad_accum} accum), "
                  f"{self.max_steps} steps, lr {self.lr:.3g}, {self.raw.num_trainable():,} trainable parameters, "
                  f"precision {self.precision_note()}, {where}",
                  file=sys.stderr)
        bar = tqdm(total=self.max_steps, initial=self.step, desc="train", disable=not main, dynamic_ncols=True)
        start, t_last, losses = time.time(), time.time(), []
        batches = iter(self.batches(self.step))
        try:
            while self.step < self.max_steps:
                lr = self.lr * self.scheduler.lr_lambdas[0](self.step)  # this step's base lr (multiplier 1)
                loss, norm = self.train_step(self.step, [next(batches) for _ in range(self.tc.grad_accum)])
                self.step += 1
                now = time.time()
                sec, t_last = now - t_last, now
                losses.append(loss)
                if main and (self.step % self.tc.log_every == 0 or self.step == self.max_steps):
                    row = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "sec_per_step": sec,
                           "epoch": self.step * self.total_batch / len(self.samples), "time": now - start}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    self.acc.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": norm,
                                  "train/sec_per_step": sec}, step=self.step)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_per_step=f"{sec:.2f}")
                bar.update(1)
                if self.step % self.tc.save_every == 0 or self.step == self.max_steps:
                    self.save_state()
        finally:
            bar.close()
            if log:
                log.close()
        self.acc.wait_for_everyone()
        sums = self.acc.gather(torch.tensor([self.weights_checksum()], dtype=torch.float64, device=self.acc.device))
        llm_bytes = self.acc.gather(torch.tensor([sharding.local_bytes(self.unwrapped().llm)], device=self.acc.device))
        peak_rss = self.acc.gather(torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024], device=self.acc.device))
        summary = {"steps": self.step, "final_loss": losses[-1] if losses else None, "wall_s": time.time() - start,
                   "sec_per_step": (time.time() - start) / max(1, len(losses)), "processes": self.acc.num_processes,
                   "ranks_identical": bool((sums == sums[0]).all()), "trainable_params": self.raw.num_trainable(),
                   "precision": "fp32" if self.precision == "no" else self.precision, "precision_note": self.precision_note(),
                   "sharding": self.sharding, "llm_param_bytes_per_rank": llm_bytes.tolist(),
                   "peak_rss_mib_per_rank": peak_rss.tolist(),
                   "checkpoint": str(self.out / "checkpoint")}
        adapter = self.full_state()
        if main:
            self.unwrapped().save_pretrained(self.out / "checkpoint", adapter)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        self.acc.wait_for_everyone()  # every rank tears the process group down after rank 0's writes
        self.acc.end_training()
        return summary


def train(cfg: RunConfig, resume: str | None = None) -> dict[str, Any]:
    """Run the recipe for a loaded config (`ademvl.config.load_run_config`)."""
    return Trainer(cfg, resume).fit()


def check_output_dir(out: str | Path, resume: str | None) -> None:
    """A new run never writes over an earlier run's checkpoints (it would replace its step-N and
    prune the rest): an output directory holding one must be resumed, or another one chosen."""
    out = output_dir(out, "train.output_dir (--output-dir)")
    earlier = [p.name for p in ((out / "checkpoint"), *list_checkpoints(out)) if p.is_dir()]
    if earlier and not resume:
        raise InputError(out, f"holds an earlier run ({', '.join(earlier[-3:])}); a new run would overwrite it",
                         "continue it with --resume auto, or choose another --output-dir")


def train_and_report(cfg: RunConfig, resume: str | None = None) -> int:
    """`ademvl train`: train, print the summary once (rank 0), and exit cleanly under torchrun."""
    check_output_dir(cfg.train.output_dir, resume)
    try:
        summary = train(cfg, resume)
    except TrainingDiverged as e:
        print(f"ademvl train: error: {e}", file=sys.stderr)
        return 1
    if summary["processes"] == 1 or os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))
    if summary["processes"] > 1:
        # Skip the interpreter's teardown: gloo's worker threads outlive destroy_process_group and
        # may still be releasing the last collective's tensors, which needs the GIL; a thread that
        # asks for it while Python finalizes is ended by pthread_exit inside a C++ destructor and
        # the rank aborts ("terminate called without an active exception", ~1 run in 40 here;
        # seen in a core dump). Everything is written and closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
