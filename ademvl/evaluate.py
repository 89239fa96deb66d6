"""Evaluation recipes (`ademvl eval {scienceqa,coco,mme}`): generate, read, write, score.

Each one builds the task's samples, generates greedily (COCO: optionally beam search) on the
processor's left-padded batches, and writes what the task's standard scorer reads:

    scienceqa   OUT/preds.json {pid: choice index, -1 = unreadable}, OUT/scores.json (official
                keys), OUT/generations.json {pid: generated text}
    coco        OUT/preds.json [{image_id, caption}] (COCO results format), OUT/scores.json
    mme         OUT/{subtask}.txt  image \\t question \\t ground truth \\t prediction, OUT/scores.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import score
from .data import Sample
from .tasks import coco as coco_task
from .tasks import mme as mme_task
from .tasks import scienceqa as sqa


@torch.no_grad()
def generate_texts(model: Any, samples: list[Sample], batch_size: int = 16, desc: str = "generate",
                   processor: Any = None, **generate_kwargs: Any) -> list[str]:
    """The model's answer to the last turn of each sample (special tokens dropped).

    processor: another input layout than the model's own (e.g. the released one)."""
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
            out = model.generate(**batch, **generate_kwargs)
            n = generate_kwargs.get("num_return_sequences", 1)
            texts += model.tokenizer.batch_decode(out[::n], skip_special_tokens=True)
            bar.update(len(chunk))
    model.train(was_training)
    return texts


def _write(out_dir: str | Path | None, **files: Any) -> None:
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, obj in files.items():
        (out / f"{name}.json").write_text(json.dumps(obj, indent=1) + "\n")


# ---- ScienceQA ------------------------------------------------------------------------------
def default_max_new_tokens(prompt_format: str) -> int:
    """Enough to reach the letter: "The answer is X." comes first for A, AL, AE, ... (8 tokens);
    after a lecture/solution for LA, EA, LEA, ELA (up to the released max length, 512)."""
    return 8 if sqa.split_format(prompt_format)[1].startswith("A") else 512


def evaluate_scienceqa(model: Any, data_root: str | Path, split: str = "test", out_dir: str | Path | None = None,
                       batch_size: int = 16, prompt_format: str = "CQM-A", use_caption: bool = False,
                       blank_images: bool = False, limit: int | None = None, max_new_tokens: int | None = None,
                       caption_file: str | None = None, skip_invalid: bool = False) -> dict[str, Any]:
    """ScienceQA protocol: generate, read the letter after "The answer is", score every problem of
    the split (first `limit`). blank_images: every problem takes the no-image path (indicator 0).

    Returns {"scores": official keys, "preds": {pid: index}, "unreadable": count}.
    """
    problems = sqa.read_problems(data_root, split, use_caption, caption_file)
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    usable = sqa.valid_problems(problems, skip_invalid)
    samples = [sqa.to_sample(pid, p, prompt_format, use_caption, blank_image=blank_images) for pid, p in usable.items()]
    texts = generate_texts(model, samples, batch_size, desc=f"scienceqa {split}",
                           max_new_tokens=max_new_tokens or default_max_new_tokens(prompt_format))
    preds = {pid: -1 for pid in problems}  # skipped problems stay -1: wrong, never dropped
    generations = {}
    for s, text in zip(samples, texts):
        preds[s.id] = sqa.parse_answer(text, len(s.meta["choices"]))
        generations[s.id] = text
    scores = score.score_scienceqa(problems, preds, list(problems))
    unreadable = sum(1 for s in samples if preds[s.id] == -1)
    _write(out_dir, preds=preds, scores=scores, generations=generations)
    return {"scores": scores, "preds": preds, "unreadable": unreadable}


# ---- COCO captions --------------------------------------------------------------------------
def clean_caption(text: str) -> str:
    """The caption after the prompt (the released eval keeps what follows "picture of")."""
    text = text.strip()
    head = "picture of"
    return text.split(head, 1)[1].strip() if head in text else text


def evaluate_coco(model: Any, image_root: str | Path, split: str = "test", out_dir: str | Path | None = None,
                  ann_root: str | None = None, ann_file: str | None = None, gt_file: str | Path | None = None,
                  batch_size: int = 16, num_beams: int = 1, max_new_tokens: int = 20,
                  limit: int | None = None, metrics: tuple[str, ...] = score.COCO_KEYS) -> dict[str, Any]:
    """Caption every image of the split; score with pycocoevalcap when the ground truth is there.

    Returns {"preds": [{image_id, caption}], "scores": {...} or None}.
    """
    samples = coco_task.load_samples(str(image_root), split, ann_file=ann_file, ann_root=ann_root, limit=limit)
    texts = generate_texts(model, samples, batch_size, desc=f"coco {split}", num_beams=num_beams,
                           max_new_tokens=max_new_tokens)
    preds = [{"image_id": s.meta["image_id"], "caption": clean_caption(t)} for s, t in zip(samples, texts)]
    gt = Path(gt_file) if gt_file else coco_task.gt_file(image_root, split, ann_root)
    scores = None
    if gt.exists():
        scores = score.score_coco(gt, preds, metrics)
    else:
        warnings.warn(f"{gt}: no ground truth, captions written but not scored (pass gt_file / --gt)", stacklevel=2)
    _write(out_dir, preds=preds, **({"scores": scores} if scores else {}))
    return {"preds": preds, "scores": scores}


# ---- MME ------------------------------------------------------------------------------------
def evaluate_mme(model: Any, data_root: str | Path, out_dir: str | Path | None = None, batch_size: int = 16,
                 max_new_tokens: int = 10, limit: int | None = None, subtasks: list[str] | None = None) -> dict[str, Any]:
    """Answer every MME question, write one result file per subtask (eval_tool layout), score them.

    Returns {"scores": score.score_mme(...), "results_dir": path}.
    """
    samples = mme_task.load_samples(str(data_root), subtasks=subtasks, limit=limit)
    texts = generate_texts(model, samples, batch_size, desc="mme", max_new_tokens=max_new_tokens)
    results_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="ademvl-mme-"))
    results_dir.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {}
    for s, text in zip(samples, texts):
        answer = " ".join(text.replace("\t", " ").split())  # one line, no tabs: the eval_tool splits on them
        m = s.meta
        lines.setdefault(m["subtask"], []).append("\t".join([m["image_name"], m["question"], m["gt"], answer]))
    for task, task_lines in lines.items():
        (results_dir / f"{task}.txt").write_text("\n".join(task_lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the subtasks left out were chosen; score_mme lists them
        scores = score.score_mme(results_dir)
    (results_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return {"scores": scores, "results_dir": str(results_dir)}


# ---- CLI ------------------------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on ScienceQA, COCO captions or MME")
    esub = p.add_subparsers(dest="eval_task", required=True, metavar="TASK")

    def common(q: argparse.ArgumentParser, data_help: str) -> None:
        q.add_argument("--checkpoint", required=True, help="directory written by save_pretrained / ademvl train")
        q.add_argument("--llm", default=None, help="override the base LLM recorded in the checkpoint")
        q.add_argument("--vision", default=None, help="override the vision tower recorded in the checkpoint")
        q.add_argument("--data-root", required=True, help=data_help)
        q.add_argument("--out", default=None, help="output directory")
        q.add_argument("--batch-size", type=int, default=16)
        q.add_argument("--limit", type=int, default=None, help="only the first N items (quick checks; not comparable)")
        q.add_argument("--max-new-tokens", type=int, default=None)
        q.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
        q.add_argument("--protocol", default="ademvl", choices=["ademvl", "released"],
                       help="released: the authors' input layout and eval script, for imported checkpoints (docs/released.md)")

    s = esub.add_parser("scienceqa", help="ScienceQA accuracy (released layout or parquet)")
    common(s, "ScienceQA directory (problems.json, pid_splits.json, images/; or the parquet files)")
    s.add_argument("--split", default="test")
    s.add_argument("--prompt-format", default="CQM-A", help="INPUT-OUTPUT template, e.g. CQM-A, QCM-A, QCM-LEA")
    s.add_argument("--use-caption", action="store_true", help="add captions.json's caption to the context")
    s.add_argument("--caption-file", default=None)
    s.add_argument("--blank-images", action="store_true", help="evaluate every problem without its image (indicator 0)")
    s.add_argument("--skip-invalid", action="store_true",
                   help="score problems that break a rule (choices, answer, image) as wrong instead of stopping")
    s.set_defaults(func=run_scienceqa)

    c = esub.add_parser("coco", help="COCO captions (Karpathy split), BLEU/METEOR/ROUGE-L/CIDEr")
    common(c, "COCO images root (the Karpathy files' image paths are relative to it)")
    c.add_argument("--split", default="test", choices=["val", "test"])
    c.add_argument("--ann-root", default=None, help="directory of coco_karpathy_*.json (default: --data-root)")
    c.add_argument("--gt", default=None, help="ground truth (default: ANN_ROOT/coco_karpathy_{split}_gt.json)")
    c.add_argument("--num-beams", type=int, default=1, help="1 = greedy")
    c.set_defaults(func=run_coco)

    m = esub.add_parser("mme", help="MME yes/no benchmark; writes the eval_tool's result files")
    common(m, "MME_Benchmark_release_version directory")
    m.add_argument("--subtasks", nargs="+", default=None, help="only these subtasks")
    m.set_defaults(func=run_mme)


def load_model(args: argparse.Namespace) -> Any:
    from .model import AdemVLModel

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.protocol == "ademvl" and (Path(args.checkpoint) / "released.json").exists():
        warnings.warn(f"{args.checkpoint} was imported from the authors' release; it was trained on their token "
                      "layout: evaluate it with --protocol released (docs/released.md)", stacklevel=2)
    model = AdemVLModel.from_pretrained(args.checkpoint, llm=args.llm, vision=args.vision)
    return model.to(device)


def run_scienceqa(args: argparse.Namespace) -> int:
    if args.protocol == "released":  # the authors' eval script (ademvl/released_protocol.py)
        from .released_protocol import run as run_released
        return run_released("scienceqa", args, load_model(args))
    model = load_model(args)
    r = evaluate_scienceqa(model, args.data_root, args.split, args.out, args.batch_size, args.prompt_format,
                           args.use_caption, args.blank_images, args.limit, args.max_new_tokens,
                           args.caption_file, args.skip_invalid)
    print(score.format_scienceqa(r["scores"], args.split + (" blank" if args.blank_images else "")))
    print(f"{len(r['preds'])} problems, {r['unreadable']} answers unreadable (counted wrong)"
          + (f"; wrote {args.out}/preds.json, scores.json" if args.out else ""))
    return 0


def run_coco(args: argparse.Namespace) -> int:
    if args.protocol == "released":  # the authors' eval script (ademvl/released_protocol.py)
        from .released_protocol import run as run_released
        return run_released("coco", args, load_model(args))
    model = load_model(args)
    r = evaluate_coco(model, args.data_root, args.split, args.out, args.ann_root, gt_file=args.gt,
                      batch_size=args.batch_size, num_beams=args.num_beams,
                      max_new_tokens=args.max_new_tokens or 20, limit=args.limit)
    if r["scores"]:
        print(score.format_coco(r["scores"]))
    print(f"{len(r['preds'])} captions" + (f"; wrote {args.out}/preds.json" if args.out else ""))
    return 0


def run_mme(args: argparse.Namespace) -> int:
    if args.protocol == "released":  # the authors' eval script (ademvl/released_protocol.py)
        from .released_protocol import run as run_released
        return run_released("mme", args, load_model(args))
    model = load_model(args)
    r = evaluate_mme(model, args.data_root, args.out, args.batch_size, args.max_new_tokens or 10, args.limit,
                     args.subtasks)
    print(score.format_mme(r["scores"]))
    print(f"result files in {r['results_dir']}")
    return 0
