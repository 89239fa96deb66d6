"""`ademvl ablate`: the paper's ablation tables (VI-X), each row a setting of AdemVLConfig, run on a
ScienceQA-layout task of this machine and set beside the paper's ScienceQA averages.

    TABLES                  the rows: a name, the AdemVLConfig fields that make it (at the paper's
                            16x16 grid), the paper's number (ADEM-VL.md) or None where it is not restated
    on_grid                 a row's token counts mapped to the tower's grid (the same ratios of its side)
    run_ablation            every (row, seed) a job: train (recipes/train.py), then the ScienceQA protocol
                            on the test split; two side by side on a CPU, one thread each
    write_table             DIR/table_<T>.md and .png: ours (mean, range over seeds) beside the paper,
                            and whether the paper's ordering holds

Resuming: a job is a directory OUT/jobs/<hash of its run config>/ (a row shared by two tables, such
as ADEM-VL's own settings, runs once); it is finished when its result.json exists, written last and
by rename. A rerun skips finished jobs and starts the others afresh (a killed job's partial
directory is removed first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..config import AdemVLConfig, RunConfig, load_run_config, structured
from ..files import InputError, output_dir, read_json, write_json

PAPER_GRID = 16  # CLIP ViT-L/14 at 224 px: the grid the paper's token counts refer to
GRID_KEYS = ("scales", "input_tokens")  # settings counted in tokens of that grid


@dataclass(frozen=True)
class Row:
    """One row of a paper table: AdemVLConfig fields over ADEM-VL's defaults, and the paper's number."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    paper: float | None = None  # ScienceQA average, LLaMA-7B (ADEM-VL.md); None: not restated there


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    rows: tuple[Row, ...]
    build_up: bool = False  # each row adds one part to the row above (Table VI): check each step's sign
    note: str = ""


# Table VI's baseline: the counts the paper prints (3.4M, 4.0M, 4.5M at LLaMA-7B) pin it to one
# scale (256 tokens), no [cls] projector and no drop; `ademvl params --table VI` shows the counts.
BASELINE = dict(fusion_form="memvp", scales=(256,), use_cls=False, drop_ratio=0.0)
TABLES: dict[str, Table] = {t.key: t for t in (
    Table("VI", "Component build-up", (
        Row("baseline: MemVP-style act(h K^T) V, one scale, no [cls], no drop", BASELINE, 92.45),
        Row("+ [cls] token", {**BASELINE, "use_cls": True}, 92.61),
        Row("+ parameter-free cross-attention act(h) act(K)^T", {**BASELINE, "use_cls": True, "fusion_form": "cross_attention"}, 93.37),
        Row("+ multiscale (256, 64)", {"drop_ratio": 0.0}, 93.47),
        Row("+ adaptive fusion (ADEM-VL)", {}, 93.85),
    ), build_up=True),
    Table("VII", "Where the fusion reads its query and adds its term", tuple(
        Row(f"query from {q.replace('_', ' ')}, added to {a.replace('_', ' ')}", {"query_from": q, "add_to": a},
            93.85 if (q, a) == ("mlp_input", "mlp_output") else None)
        for q, a in (("mhsa_input", "mhsa_input"), ("mhsa_input", "mhsa_output"), ("mhsa_output", "mhsa_output"),
                     ("mlp_input", "mlp_input"), ("mlp_input", "mlp_output"), ("mlp_output", "mlp_output"))),
          note="Six rows: each module's input -> input, input -> output, output -> output (our reading of the "
               "table; ADEM-VL.md restates only the best, MLP input -> MLP output)."),
    Table("VIII", "Projection (nonlinearity) on query and key", (
        Row("none", {"qk_act": "none"}, 92.16),
        Row("softmax", {"qk_act": "softmax"}, 79.42),
        Row("ReLU", {"qk_act": "relu"}, 91.99),
        Row("ELU", {"qk_act": "elu"}, 92.45),
        Row("SiLU (ADEM-VL)", {"qk_act": "silu"}, 93.85),
        Row("SiLU positive", {"qk_act": "silu_positive"}, None),
    ), note="The paper reports that SiLU positive collapses; ADEM-VL.md gives no number for it."),
    Table("IX", "Multiscale downsampling", (
        Row("one scale (256)", {"scales": (256,)}, 93.70),
        Row("(64, 16)", {"scales": (64, 16)}),
        Row("(256, 16)", {"scales": (256, 16)}),
        Row("(256, 64) (ADEM-VL)", {"scales": (256, 64)}, 93.85),
        Row("(256, 64, 16)", {"scales": (256, 64, 16)}, 93.59),
        Row("(256, 64), max pooling", {"scales": (256, 64), "pooling": "max"}),
    )),
    Table("X", "Visual tokens also fed as input tokens", (
        Row("0 input tokens, [cls] (ADEM-VL)", {"input_tokens": 0}, 93.85),
        Row("0 input tokens, no [cls]", {"input_tokens": 0, "use_cls": False}),
        Row("64 input tokens, [cls]", {"input_tokens": 64}),
        Row("64 input tokens, no [cls]", {"input_tokens": 64, "use_cls": False}),
        Row("256 input tokens, [cls]", {"input_tokens": 256}),
        Row("256 input tokens, no [cls]", {"input_tokens": 256, "use_cls": False}),
    )),
)}
PAPER_DEFAULTS = {"scales": (256, 64)}  # ADEM-VL's own scales, at the paper's grid


def on_grid(settings: dict[str, Any], side: int) -> dict[str, Any]:
    """A row's settings (over ADEM-VL's scales) for a tower whose grid is side x side: a count of
    k x k tokens at the paper's 16 x 16 grid becomes round(k * side / 16)^2, the same ratio of the side."""
    def scaled(n: int) -> int:
        return max(1, round(math.isqrt(n) * side / PAPER_GRID)) ** 2 if n else 0

    out = {**PAPER_DEFAULTS, **settings}
    out["scales"] = tuple(scaled(s) for s in out["scales"])
    if "input_tokens" in out:
        out["input_tokens"] = scaled(out["input_tokens"])
    return out


# ---- parameter counts ------------------------------------------------------------------------
PAPER_PARAMS = {"VI": ("3.4M", "4.0M", "4.0M", "4.5M", "4.5M")}  # the paper's #param column; steps without new parameters repeat it


def count_rows(table: str, llm: str, vision: str, base: AdemVLConfig | None = None) -> list[tuple[str, int, int]]:
    """(row, our trainable count, the released code's count) at the given shapes (meta device, no weights).

    The released code also builds an adapter on the last vision block, which never runs: its
    count adds one block's adapter where the tower is a ViT read at -2 (ADEM-VL.md, "What trains")."""
    from ..model import build_meta

    base = base or AdemVLConfig()
    side = build_meta(llm, vision, base.replace(scales=(1,))).tower.side  # one token fits any grid: only its side is read
    out = []
    for row in TABLES[table].rows:
        model = build_meta(llm, vision, base.replace(**on_grid(row.settings, side)))
        ours = model.num_trainable()
        dead = sum(p.numel() for p in model.vision_adapters[0].parameters()) if (
            len(model.vision_adapters) and model.config.vision_layer == -2 and model.tower.kind == "vit") else 0
        out.append((row.name, ours, ours + dead))
    return out


def param_table(table: str, llm: str, vision: str, base: AdemVLConfig | None = None) -> list[str]:
    """`ademvl params --table T`: each row's trainable parameters beside the paper's count."""
    paper = PAPER_PARAMS.get(table, ())
    lines = [f"Table {table} ({TABLES[table].title}) at LLM {llm} + vision {vision}:",
             f"  {'row':<68} {'ours':>12} {'released code':>14} {'paper':>6}"]
    for i, (name, ours, released) in enumerate(count_rows(table, llm, vision, base)):
        lines.append(f"  {name:<68} {ours:>12,} {released:>14,} {paper[i] if i < len(paper) else '':>6}")
    lines.append("released code: + the adapter of the last vision block, which never runs (we build no dead parameters)")
    return lines


# ---- the runner --------------------------------------------------------------------------------
TASKS = ("shapes", "emoji")  # ScienceQA-layout data made under OUT/data: shapes here, emoji by ademvl/emoji.py
RESULT = "result.json"
JOBS = "jobs"


@dataclass
class Plan:
    """What `ademvl ablate` runs: tables x rows x seeds on one task, with a short schedule."""

    tables: list[str]
    task: str = "shapes"
    seeds: list[int] = field(default_factory=lambda: [0])
    out: str = "runs/ablate"
    config: str = "demo"  # the run config each row changes (a shipped name or a path)
    overrides: list[str] = field(default_factory=list)  # section.key=value on that config
    data: str | None = None  # a ScienceQA-layout directory; default for shapes: made under OUT/data
    n: int = 4000  # shapes problems to make (80/10/10)
    steps: int = 150  # optimizer steps per row (short schedule)
    rows: list[int] | None = None  # 1-based rows of each table to run (quick checks)
    split: str = "test"
    limit: int | None = None  # only the first N problems of the split (quick checks)
    jobs: int | None = None  # jobs side by side: default 2 on a CPU (one thread each), 1 on a GPU
    batch_size: int = 16  # evaluation batch
    run: bool = True  # False: only write the tables from the jobs finished so far


def task_data(plan: Plan, out: Path) -> Path:
    """The task's ScienceQA-layout directory (problems.json, pid_splits.json, images/)."""
    if plan.task not in TASKS:
        raise InputError(f"--task {plan.task}: choose one of {', '.join(TASKS)}")
    if plan.data:
        root = Path(plan.data)
        if not (root / "problems.json").is_file():
            raise InputError(root, "has no problems.json", "pass a ScienceQA-layout directory (problems.json, "
                                                           "pid_splits.json, images/) as --data")
        return root
    root = out / "data"
    if plan.task == "emoji":  # the corpus of `ademvl data emoji` (renders cached: ~25 s when built before)
        from ..emoji import build

        build(root)
        return root
    if not (root / "pid_splits.json").is_file():  # written last: a directory without it is incomplete
        from ..tasks.shapes import write_dataset

        write_dataset(root, plan.n, seed=0)
    return root


def job_specs(plan: Plan, out: Path, data: Path) -> dict[tuple[str, int, int], Path]:
    """(table, row index, seed) -> its job directory, with job.json written; equal runs share one."""
    from ..model import build_meta

    base = load_run_config(plan.config, plan.overrides)
    side = build_meta(base.model.llm, base.model.vision, base.model).tower.side
    chosen = {t: [i for i in range(len(TABLES[t].rows)) if plan.rows is None or i + 1 in plan.rows] for t in plan.tables}
    specs, jobs = {}, {}
    for t, rows in chosen.items():
        for i in rows:
            settings = on_grid(TABLES[t].rows[i].settings, side)
            model = base.model.replace(**settings, max_length=base.model.max_length + settings.get("input_tokens", 0))
            for seed in plan.seeds:
                run = RunConfig(model=model, data={"task": "scienceqa", "root": str(data), "split": "train",
                                                   "prompt_format": "CQM-A"},
                                train=dataclasses.replace(base.train, seed=seed, max_steps=plan.steps, output_dir=""))
                spec = {"run": run.to_dict(), "data": str(data), "split": plan.split, "limit": plan.limit}
                job = out / JOBS / hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
                spec["run"]["train"]["output_dir"] = str(job / "train")
                jobs.setdefault(job, {**spec, "batch_size": plan.batch_size, "rows": []})["rows"].append(f"{t}.{i + 1}")
                specs[(t, i, seed)] = job
    for job, spec in jobs.items():
        job.mkdir(parents=True, exist_ok=True)
        write_json(job / "job.json", spec)
    return specs


def run_job(job: Path) -> dict[str, Any]:
    """Train one row on one seed, evaluate it on the split, write result.json last (by rename)."""
    import torch

    from ..model import AdemVLModel
    from ..tasks import scienceqa
    from .evaluate import evaluate
    from .train import train

    spec = read_json(job / "job.json", "an ablation job", form=dict)
    cfg = structured(RunConfig, spec["run"])
    start = time.time()
    summary = train(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AdemVLModel.from_pretrained(Path(cfg.train.output_dir) / "checkpoint").to(device)
    opts = scienceqa.EvalOptions(data_root=spec["data"], split=spec["split"], limit=spec["limit"])
    res = evaluate(model, "scienceqa", opts, out_dir=job / "eval", batch_size=spec["batch_size"])
    shutil.rmtree(Path(cfg.train.output_dir) / "checkpoints", ignore_errors=True)  # optimizer states: not needed
    result = {"score": res.scores["acc_average"], "scores": res.scores, "trainable": summary["trainable_params"],
              "steps": summary["steps"], "final_loss": summary["final_loss"], "train_wall_s": summary["wall_s"],
              "wall_s": time.time() - start, "device": device}
    write_json(job / RESULT, result)
    return result


def launch(pending: list[Path], jobs: int) -> dict[Path, int]:
    """Run the jobs, `jobs` at a time: in this process when 1, else as subprocesses with one
    thread each (a 2-core machine: two side by side). Returns each job's exit status."""
    status: dict[Path, int] = {}
    if jobs <= 1:
        for job in pending:
            try:
                run_job(job)
                status[job] = 0
            except Exception as e:  # one failed row must not stop the others; its log says why
                (job / "log.txt").write_text(f"{type(e).__name__}: {e}\n")
                status[job] = 1
            print(f"ademvl ablate: {len(status)}/{len(pending)} jobs done ({job.name}: {'ok' if not status[job] else 'failed'})",
                  file=sys.stderr)
        return status
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    queue, running = list(pending), {}
    # Killed (SIGTERM or Ctrl-C), the runner takes its jobs with it: none runs on unwatched, and
    # the next run starts them afresh.
    before = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        while queue or running:
            while queue and len(running) < jobs:
                job = queue.pop(0)
                log = open(job / "log.txt", "w")
                running[job] = (subprocess.Popen([sys.executable, "-m", "ademvl.recipes.ablate", str(job)],
                                                 stdout=log, stderr=subprocess.STDOUT, env=env), log)
            time.sleep(2)
            for job, (proc, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    status[job] = proc.returncode
                    del running[job]
                    print(f"ademvl ablate: {len(status)}/{len(pending)} jobs done ({job.name}: "
                          f"{'ok' if proc.returncode == 0 else f'failed, see {job}/log.txt'})", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, before)
        for proc, log in running.values():
            proc.terminate()
            proc.wait()
            log.close()
    return status


def run_ablation(plan: Plan) -> list[Path]:
    """Every pending job, then the tables; returns the table files written."""
    import torch

    out = output_dir(plan.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    data = task_data(plan, out)
    specs = job_specs(plan, out, data)
    unique = list(dict.fromkeys(specs.values()))
    unfinished = [job for job in unique if not (job / RESULT).is_file()]
    pending = unfinished if plan.run else []
    for job in pending:  # a killed job restarts afresh: only job.json is kept
        for p in job.iterdir():
            if p.name != "job.json":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    jobs = plan.jobs or (1 if torch.cuda.is_available() else 2)
    print(f"ademvl ablate: {len(unique)} jobs ({len(unique) - len(unfinished)} finished earlier), {jobs} at a time, "
          f"{plan.steps} steps each, task {plan.task}, seeds {plan.seeds}", file=sys.stderr)
    start = time.time()
    launch(pending, jobs)
    wall = time.time() - start
    written = []
    for t in plan.tables:
        results = {(i, s): finished(job, data, plan) for (tt, i, s), job in specs.items() if tt == t}
        written += write_table(TABLES[t], results, plan, out, wall)
    return written


def finished(job: Path, data: Path, plan: Plan) -> dict[str, Any] | None:
    """A finished job's result.json with its answers broken down (`breakdown`); None while unfinished."""
    if not (job / RESULT).is_file():
        return None
    result = read_json(job / RESULT, "an ablation result", form=dict)
    found = breakdown(job, data, plan.split, plan.limit)
    return {**result, "breakdown": found and found["by type"], "questions": found and found["questions"]}


@lru_cache(maxsize=4)
def _problems_and_split(data: str, split: str) -> tuple[dict[str, Any], list[str]]:
    return (read_json(Path(data) / "problems.json", "ScienceQA problems", form=dict),
            read_json(Path(data) / "pid_splits.json", "ScienceQA splits", form=dict)[split])


def breakdown(job: Path, data: Path, split: str, limit: int | None) -> dict[str, Any] | None:
    """The number of questions scored and ("by type") the accuracy (%) per question type (the problems'
    `qtype`, which the shapes and emoji data carry) with the most common answer's share of all answers
    (%). An average alone can hide a row that answers one letter everywhere: it then scores that
    letter's share of the truths, whatever it saw."""
    if not (job / "eval" / "preds.json").is_file() or not (Path(data) / "pid_splits.json").is_file():
        return None
    from ..tasks.shapes import per_type

    problems, pids = _problems_and_split(str(data), split)
    pids = pids[:limit] if limit is not None else pids
    preds = read_json(job / "eval" / "preds.json", "an evaluation's predictions", form=dict)
    by_type = per_type(problems, preds, pids)
    by_type.pop("image_questions")  # the shapes demo's summary, not a question type
    by_type["most common answer"] = 100 * max(Counter(preds.get(pid, -1) for pid in pids).values()) / len(pids)
    return {"by type": by_type, "questions": len(pids)}


# ---- tables and plots --------------------------------------------------------------------------
def _fmt(x: float | None, sign: bool = False) -> str:
    return "n/a" if x is None else (f"{x:+.2f}" if sign else f"{x:.2f}")


def orderings(table: Table, ours: dict[int, float], noise: float | None = None) -> list[str]:
    """Whether the paper's ordering holds among the rows with both numbers: best, worst, each step.
    `noise` (points): differences smaller than it are marked "within noise"."""
    both = [i for i, r in enumerate(table.rows) if r.paper is not None and i in ours]
    if len(both) < 2:
        return ["fewer than two rows have both the paper's number and ours: no ordering to check"]

    def small(diff: float) -> bool:
        return noise is not None and abs(diff) < noise

    lines = []
    for word, pick in (("best", max), ("worst", min)):
        p, top = pick(both, key=lambda i: table.rows[i].paper), pick(ours[i] for i in both)
        at_top = [table.rows[i].name for i in both if ours[i] == top]
        tied = f" (tied: {len(at_top)} rows at {top:.2f})" if len(at_top) > 1 else ""
        others = [ours[i] for i in both if ours[i] != top]
        # does not hold: is the paper's row within noise of ours? holds: is the next row within noise?
        gap = ours[p] - top if ours[p] != top else (top - pick(others) if others else 0.0)
        doubt = f" (within noise: {abs(gap):.2f} < {noise:.2f})" if others and small(gap) else ""
        lines.append(f"{word} row: paper {table.rows[p].name!r}, ours {' / '.join(map(repr, at_top))}: "
                     f"{'holds' if ours[p] == top else 'does not hold'}{tied}{doubt}")
    if table.build_up:
        for i in range(1, len(table.rows)):
            if {i - 1, i} <= set(both):
                dp, do = table.rows[i].paper - table.rows[i - 1].paper, ours[i] - ours[i - 1]
                verdict = "no change here" if do == 0 else "same sign" if (dp > 0) == (do > 0) else "sign differs"
                doubt = f" (within noise: {abs(do):.2f} < {noise:.2f})" if do != 0 and small(do) else ""
                lines.append(f"step {table.rows[i].name!r}: paper {_fmt(dp, True)}, ours {_fmt(do, True)}: {verdict}{doubt}")
    return lines


def noise_of(scores: list[float], questions: int, seeds: int) -> float:
    """Two standard errors of a difference between two rows' mean accuracies (points), binomial at the
    rows' mean accuracy, each mean over `questions` x `seeds` answers: a floor, since seed-to-seed
    training noise comes on top and the seeds answer the same questions."""
    p = sum(scores) / len(scores) / 100
    return 2 * math.sqrt(2) * 100 * math.sqrt(p * (1 - p) / (questions * seeds))


def write_table(table: Table, results: dict[tuple[int, int], dict[str, Any] | None], plan: Plan, out: Path,
                wall: float) -> list[Path]:
    """OUT/table_<T>.md and OUT/table_<T>.png from the jobs' results."""
    seeds = sorted({s for _, s in results})
    lines = [f"# Table {table.key}: {table.title}", "",
             f"Task {plan.task}, {plan.steps} training steps per row, seeds {' '.join(map(str, seeds))}; score: ScienceQA "
             f"average accuracy (%) on the {plan.split} split{f' (first {plan.limit})' if plan.limit else ''}. "
             f"Paper: ScienceQA average, LLaMA-7B (ADEM-VL.md; n/a = not restated there).", "",
             "| # | row | paper | ours: mean | min - max over seeds | per seed | trainable |",
             "|---:|---|---:|---:|---:|---|---:|"]
    ours: dict[int, float] = {}
    for i, row in enumerate(table.rows):
        runs = {s: results.get((i, s)) for s in seeds if (i, s) in results}
        if not runs:
            continue
        got = [r["score"] for r in runs.values() if r is not None]
        if len(got) == len(runs):
            ours[i] = sum(got) / len(got)
        per_seed = ", ".join(f"{s}: {_fmt(r['score']) if r else 'not finished'}" for s, r in runs.items())
        trainable = next((f"{r['trainable']:,}" for r in runs.values() if r), "")
        lines.append(f"| {i + 1} | {row.name} | {_fmt(row.paper)} | {_fmt(ours.get(i))} | "
                     f"{f'{min(got):.2f} - {max(got):.2f}' if got else 'n/a'} | {per_seed} | {trainable} |")
    counts = {r["questions"] for r in results.values() if r and r.get("questions")}
    noise = noise_of(list(ours.values()), counts.pop(), len(seeds)) if ours and len(counts) == 1 else None
    lines += ["", "Does the paper's ordering hold here?", ""] + [f"- {x}" for x in orderings(table, ours, noise)]
    if noise is not None:
        lines += ["", f"Within noise: a difference under {noise:.2f} points, two standard errors of a difference "
                      f"between two rows' means (binomial at their mean accuracy, {len(seeds)} seed(s) x the "
                      "questions scored; a floor: training noise between seeds comes on top)."]
    lines += breakdown_lines(table, results)
    if table.note:
        lines += ["", table.note]
    lines += ["", f"This sitting's jobs ran in {wall / 60:.1f} min wall." if plan.run else "Written with --tables-only: no job ran."]
    md = out / f"table_{table.key}.md"
    md.write_text("\n".join(lines) + "\n")
    return [md, plot_table(table, results, ours, out / f"table_{table.key}.png")]


def breakdown_lines(table: Table, results: dict[tuple[int, int], dict[str, Any] | None]) -> list[str]:
    """Each row's accuracy per question type and its most common answer's share, means over seeds."""
    got = {k: r["breakdown"] for k, r in results.items() if r and r.get("breakdown")}
    if not got:
        return []
    cols = list(dict.fromkeys(c for b in got.values() for c in b))
    lines = ["", "Accuracy (%) by question type, and how often the most common answer was given (% of answers; "
                 "a row near 100 answers one option everywhere), means over the seeds:", "",
             "| # | row | " + " | ".join(cols) + " |", "|---:|---|" + "---:|" * len(cols)]
    for i, row in enumerate(table.rows):
        per_seed = [b for (j, _), b in got.items() if j == i]
        if per_seed:
            means = [sum(b.get(c, 0.0) for b in per_seed) / len(per_seed) for c in cols]
            lines.append(f"| {i + 1} | {row.name} | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    return lines


def plot_table(table: Table, results: dict[tuple[int, int], dict[str, Any] | None], ours: dict[int, float],
               path: Path) -> Path:
    """Two panels, rows top to bottom: ours (mean, each seed a dot) and the paper's number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [i for i in range(len(table.rows)) if any(k[0] == i for k in results)]
    names = [table.rows[i].name if len(table.rows[i].name) < 48 else table.rows[i].name[:45] + "..." for i in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 1.5), sharey=True)
    y = list(range(len(rows)))[::-1]
    a.barh(y, [ours.get(i, 0.0) for i in rows], color="tab:blue")
    for yy, i in zip(y, rows):
        a.plot([r["score"] for (j, _), r in results.items() if j == i and r], [yy] * sum(
            1 for (j, _), r in results.items() if j == i and r), "k.")
    for yy, i in zip(y, rows):  # the numbers, for reading off
        a.annotate(_fmt(ours.get(i)), (ours.get(i, 0.0), yy), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        b.annotate(_fmt(table.rows[i].paper), (table.rows[i].paper or 0.0, yy), xytext=(3, 0), textcoords="offset points",
                   va="center", fontsize=8)
    a.set_yticks(y, names, fontsize=8)
    a.set_xlabel("ours: accuracy (%), mean and seeds")
    b.barh(y, [table.rows[i].paper or 0.0 for i in rows], color="tab:gray")
    a.margins(x=0.15)
    b.set_xlabel("paper: ScienceQA average (%), 0 = not restated")
    known = [table.rows[i].paper for i in rows if table.rows[i].paper]
    if known:
        b.set_xlim(min(known) - 2, max(known) + 3)
    fig.suptitle(f"Table {table.key}: {table.title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":  # one job in its own process: `python -m ademvl.recipes.ablate JOB_DIR`
    run_job(Path(sys.argv[1]))
