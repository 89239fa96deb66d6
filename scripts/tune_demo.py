"""Short demo training runs that track letter accuracy on the val split (how ademvl/configs/demo.yaml was tuned).

The answer loss is a poor guide here: "The answer is" and "." are learned in ~20 steps and the
loss sits near 0.2 while the letter is still at chance (NOTES.md). So this trains with the demo's
recipe and, every --eval-every steps, reads the option letter the model finds most likely after
"The answer is" (`ademvl.tasks.scienceqa.forced_choice`) on --per-type val problems of each question type.

    python scripts/tune_demo.py --out runs/tune/a --steps 150 [--model.beta 0.1 ...]   # config overrides

Prints one JSON line per evaluation (also OUT/val.jsonl): step, seconds so far, accuracy per type.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ademvl.config import load_run_config
from ademvl.recipes.demo import REPO_CONFIG
from ademvl.recipes.train import Trainer
from ademvl.tasks import scienceqa as sqa
from ademvl.tasks.scienceqa import forced_choice
from ademvl.tasks.shapes import per_type
from ademvl.tasks import shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("runs/tune/data"), help="demo data (generated if missing)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", default=str(REPO_CONFIG))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--per-type", type=int, default=40, help="val problems per question type")
    ap.add_argument("--seed", type=int, default=0)
    args, overrides = ap.parse_known_args()

    if not (args.data / "problems.json").exists():
        shapes.write_dataset(args.data, 4000, args.seed)
    cfg = load_run_config(args.config, [*overrides, f"data.root={args.data}", f"train.output_dir={args.out}",
                                        f"train.max_steps={args.steps}", f"train.seed={args.seed}", "train.save_every=1000000000"])
    problems = sqa.read_problems(args.data, "val")
    chosen, count = [], {}
    for pid, p in problems.items():
        if count.get(p["qtype"], 0) < args.per_type:
            count[p["qtype"]] = count.get(p["qtype"], 0) + 1
            chosen.append((pid, p))
    val = [sqa.to_sample(pid, p) for pid, p in chosen]
    answers = {pid: {"qtype": p["qtype"], "answer": p["answer"]} for pid, p in chosen}

    trainer = Trainer(cfg)
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    window: list[float] = []
    batches = iter(trainer.batches(0))
    with open(args.out / "val.jsonl", "w") as log:
        for step in range(args.steps):
            loss, _ = trainer.train_step(step, [next(batches) for _ in range(cfg.train.grad_accum)])
            trainer.step = step + 1
            window.append(loss)
            if not torch.isfinite(torch.tensor(loss)):
                print(json.dumps({"step": step + 1, "diverged": loss}), flush=True)
                return
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                preds = forced_choice(trainer.unwrapped(), val)
                row = {"step": step + 1, "s": round(time.time() - start), "loss": round(loss, 4),
                       "max_loss": round(max(window), 2), **per_type(answers, preds, [pid for pid, _ in chosen])}
                window = []
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")
                log.flush()
    print(json.dumps(cfg.to_dict(), default=str), file=sys.stderr)


if __name__ == "__main__":
    main()
