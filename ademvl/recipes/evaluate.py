"""The evaluation recipe: one loop over the task interface (ademvl/tasks/__init__.py).

    samples = task.eval_samples(opts)            the prompts
    texts   = generate_texts(model, samples)     greedy by default, left-padded batches, KV cache
    outputs = task.predict(samples, texts, opts) the files the task's standard scorer reads
    scores  = task.score_outputs(outputs, opts)  written beside them as scores.json

What each task writes: scienceqa OUT/preds.json {pid: choice index, -1 = unreadable} and
generations.json; coco OUT/preds.json [{image_id, caption}] (the COCO results format); mme
OUT/{subtask}.txt (image \\t question \\t ground truth \\t prediction, the eval_tool's layout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import tasks
from ..data import Sample
from ..files import atomic_write_files
from ..precision import autocast, resolve
from ..released_protocol import PROTOCOLS


@torch.no_grad()
def generate_texts(model: Any, samples: list[Sample], batch_size: int = 16, desc: str = "generate",
                   processor: Any = None, precision: str = "fp32", **generate_kwargs: Any) -> list[str]:
    """The model's answer to the last turn of each sample (special tokens dropped).

    processor: another input layout than the model's own (e.g. the released one).
    precision: fp32, bf16 (autocast over the model's weights) or auto (ademvl.precision.resolve: bf16 on a
    GPU or a CPU that computes in bf16). fp32 by default: a cached decode step is memory-bound, and
    autocast re-casts every frozen weight at every step (`ademvl bench --precision fp32 bf16` measures both)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    was_training = model.training
    model.eval()  # adapter dropout off; restored below so a trainer can evaluate mid-run
    device = model.pos_k.device
    generate_kwargs.setdefault("do_sample", False)
    texts: list[str] = []
    with tqdm(total=len(samples), desc=desc, unit="sample", mininterval=1.0) as bar:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            batch = (processor or model.processor)(chunk, train=False)
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            with autocast(resolve(precision), device):
                out = model.generate(**batch, **generate_kwargs)
            n = generate_kwargs.get("num_return_sequences", 1)
            texts += model.tokenizer.batch_decode(out[::n], skip_special_tokens=True)
            bar.update(len(chunk))
    model.train(was_training)
    return texts


@dataclass
class Evaluation:
    """What one evaluation produced: the task's output files, their scores, a console line."""

    task: str
    outputs: dict[str, Any]
    scores: Any
    summary: str
    samples: list[Sample] = field(repr=False, default_factory=list)


def evaluate(model: Any, task: str, opts: Any, out_dir: str | Path | None = None, batch_size: int = 16,
             samples: list[Sample] | None = None, precision: str = "fp32") -> Evaluation:
    """Run `task` (a name in ademvl.tasks.EVAL_TASKS) with its EvalOptions; write OUT/ if given.

    `samples`: the task's eval_samples(opts), when the caller read them already (the CLI does,
    so that bad data stops before a large model loads)."""
    t = tasks.get(task, evaluable=True)
    samples = t.eval_samples(opts) if samples is None else samples
    processor, protocol = None, getattr(opts, "protocol", "ademvl")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if protocol == "released":  # the authors' layout and eval script
        from ..released_protocol import processor_for

        processor = processor_for(model, task)
    # A task may read its multiple choice by forced choice (emoji: --mc choice): the option letter the
    # model scores highest after "The answer is" (one forward, no generation); written as that answer.
    chosen = [s for s in samples if s.meta.get("choices")] if getattr(t, "choice_by_logits", None) and t.choice_by_logits(opts) else []
    free = [s for s in samples if not s.meta.get("choices")] if chosen else samples
    texts = generate_texts(model, free, batch_size, desc=f"{task} {getattr(opts, 'split', '')}".strip(),
                           processor=processor, precision=precision, **t.generation(opts))
    if chosen:
        from ..tasks.scienceqa import ANSWER_PREFIX, LETTERS, forced_choice

        letters = forced_choice(model, chosen, batch_size)
        by_id = {s.id: text for s, text in zip(free, texts)}
        by_id.update({s.id: f"{ANSWER_PREFIX} {LETTERS[letters[s.id]]}." for s in chosen})
        texts = [by_id[s.id] for s in samples]
    outputs = t.predict(samples, texts, opts)
    scores = t.score_outputs(outputs, opts)
    if out_dir is not None:
        write_outputs(out_dir, outputs, scores)
    return Evaluation(task, outputs, scores, t.summary(outputs, samples, opts), samples)


def write_outputs(out_dir: str | Path, outputs: dict[str, Any], scores: Any = None) -> None:
    """Each output as its file (text as is, anything else as JSON), then scores.json."""
    files = {name: obj.encode() if isinstance(obj, str) else (json.dumps(obj, indent=1) + "\n").encode()
             for name, obj in outputs.items()}
    if scores is not None:
        files["scores.json"] = (json.dumps(scores, indent=2) + "\n").encode()
    atomic_write_files(out_dir, files)  # all or none: a failure keeps an earlier run's set whole


def score(task: str, opts: Any) -> Any:
    """Scores of predictions made elsewhere (`ademvl score TASK`), with the task's own scorer."""
    return tasks.get(task, evaluable=True).score_files(opts)
