"""Tasks: one module each, one interface. A new task is one new file here plus its name below.

Every task module exposes `load_samples(**options) -> list[Sample]`: its training (or evaluation)
samples, taking the keys of a run config's `data:` section besides `task:`.

A task that can be evaluated (`ademvl eval NAME`, `ademvl score NAME`) also exposes:

    EvalOptions                      dataclass: what evaluation reads (data_root, split, limit,
                                     protocol: ademvl | released, ...)
    eval_samples(opts)               -> list[Sample], the prompts to answer
    generation(opts)                 -> generate() keyword arguments (max_new_tokens, num_beams)
    predict(samples, texts, opts)    -> {file name: JSON-able object or text}: the answers read
                                        into the files the task's standard scorer takes
    score_outputs(outputs, opts)     -> scores of those outputs (None when no ground truth)
    summary(outputs, samples, opts)  -> one line for the console
    choice_by_logits(opts)           -> (optional) True: samples with meta["choices"] are answered
                                        by the option letter scored highest after "The answer is"
                                        (one forward each) instead of by generation
    ScoreOptions                     dataclass: the files `ademvl score NAME` reads
    score_files(opts)                -> scores of predictions made elsewhere
    format_scores(scores, name)      -> the paper's table row(s)

The loop over this interface is ademvl/recipes/evaluate.py; the CLI builds each command's options
from the dataclasses' fields.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

TASKS = ("scienceqa", "coco", "mme", "instruct", "synthetic")  # shapes.py, emoji.py write the layouts of these
EVAL_TASKS = ("scienceqa", "coco", "mme", "emoji")


def get(name: str, evaluable: bool = False) -> ModuleType:
    """The task module `ademvl.tasks.<name>`, with a clear error for an unknown name."""
    names = EVAL_TASKS if evaluable else TASKS
    if name not in names:
        raise ValueError(f"task {name!r}: no such {'evaluation ' if evaluable else ''}task; choose one of {', '.join(names)}")
    return importlib.import_module(f"{__name__}.{name}")


def option(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A task option: a dataclass field whose help text the CLI shows (the PEFT config style)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
