"""Scores as the papers report them, for predictions made here or elsewhere (`ademvl score`).

    ScienceQA  official keys of ScienceQA's scorer (acc_natural ... acc_average), in percent
    COCO       pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L, CIDEr with its PTB tokenizer (fractions)
    MME        the eval_tool's acc, acc+ (both questions of an image right) and their sum per
               subtask, then the perception and cognition totals
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# ---- ScienceQA ------------------------------------------------------------------------------
SCIENCEQA_KEYS = ("acc_natural", "acc_social", "acc_language", "acc_has_text", "acc_has_image",
                  "acc_no_context", "acc_grade_1_6", "acc_grade_7_12", "acc_average")
# Column titles of the paper's Table I, in its order (the same order as the keys).
SCIENCEQA_TITLES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")


def _scienceqa_groups(p: dict[str, Any]) -> dict[str, bool]:
    """Which columns a problem counts in (ScienceQA's get_scores: TXT = non-empty hint, IMG = an
    image, NO = neither)."""
    grade = p.get("grade", "")
    return {
        "acc_natural": p.get("subject") == "natural science",
        "acc_social": p.get("subject") == "social science",
        "acc_language": p.get("subject") == "language science",
        "acc_has_text": bool(p.get("hint")),
        "acc_has_image": bool(p.get("image")),
        "acc_no_context": not p.get("hint") and not p.get("image"),
        "acc_grade_1_6": grade in {f"grade{g}" for g in range(1, 7)},
        "acc_grade_7_12": grade in {f"grade{g}" for g in range(7, 13)},
        "acc_average": True,
    }


def score_scienceqa(problems: dict[str, dict[str, Any]], preds: dict[str, int],
                    split_pids: Iterable[str] | None = None) -> dict[str, float | None]:
    """Accuracy in percent (2 decimals) per column; None for a column with no problem.

    split_pids: the problems to score (every one needs a prediction); default: the predicted ones.
    A prediction is a choice index; -1 (unreadable) is wrong.
    """
    pids = [str(p) for p in (split_pids if split_pids is not None else preds)]
    if not pids:
        raise ValueError("nothing to score: no predictions")
    unknown = [p for p in pids if p not in problems]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted ids are not in the problems (e.g. {unknown[:3]}); "
                         f"score against the problems.json the predictions were made for")
    missing = [p for p in pids if p not in preds]
    if missing:
        raise ValueError(f"{len(missing)} of the {len(pids)} problems of the split have no prediction (e.g. "
                         f"{missing[:3]}); predict all of them, or leave out --split to score only the predicted ones")
    right = {k: 0 for k in SCIENCEQA_KEYS}
    total = {k: 0 for k in SCIENCEQA_KEYS}
    for pid in pids:
        p = problems[pid]
        try:
            ok = int(preds[pid]) == int(p["answer"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"problem {pid}: prediction {preds[pid]!r} is not a choice index (0-4, -1 = unreadable)") from e
        for key, member in _scienceqa_groups(p).items():
            if member:
                total[key] += 1
                right[key] += ok
    return {k: (round(100.0 * right[k] / total[k], 2) if total[k] else None) for k in SCIENCEQA_KEYS}


def format_scienceqa(scores: dict[str, float | None], name: str = "") -> str:
    """The Table I row: NAT SOC LAN | TXT IMG NO | G1-6 G7-12 | Avg."""
    head = f"{'':<12}" + "".join(f"{t:>8}" for t in SCIENCEQA_TITLES)
    row = f"{name[:12]:<12}" + "".join(f"{'-' if scores[k] is None else format(scores[k], '.2f'):>8}"
                                      for k in SCIENCEQA_KEYS)
    return head + "\n" + row


def split_pids_of(problems_file: str | Path, split: str) -> list[str]:
    """The ids of a split: pid_splits.json beside problems.json, else the problems' `split` field."""
    problems_file = Path(problems_file)
    splits_file = problems_file.with_name("pid_splits.json")
    if splits_file.exists():
        splits = json.loads(splits_file.read_text())
        if split not in splits:
            raise ValueError(f"{splits_file}: no split {split!r}; it has {', '.join(splits)}")
        return [str(p) for p in splits[split]]
    problems = json.loads(problems_file.read_text())
    pids = [pid for pid, p in problems.items() if p.get("split") == split]
    if not pids:
        raise ValueError(f"{problems_file}: no problem has split {split!r} and there is no pid_splits.json beside it")
    return pids


# ---- COCO captions --------------------------------------------------------------------------
COCO_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def require_java() -> str:
    """pycocoevalcap's PTB tokenizer and METEOR run on Java; say so plainly when it is missing."""
    java = shutil.which("java")
    if java is None:
        raise FileNotFoundError("COCO caption scoring needs Java (pycocoevalcap runs Stanford's PTB tokenizer "
                                "and METEOR 1.5 as Java programs) and no `java` is on PATH; install a JRE "
                                "(e.g. apt-get install default-jre-headless) and try again")
    return java


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {what}") from e


def score_coco(gt_file: str | Path, preds: str | Path | list[dict[str, Any]],
               metrics: Iterable[str] = COCO_KEYS) -> dict[str, float]:
    """pycocoevalcap's scores of predictions in the COCO results format ([{image_id, caption}]).

    Scores the predicted images (as COCOEvalCap does with params['image_id'] set to the result's
    images), each against all its ground-truth captions; warns when they are fewer than the
    ground truth's images. SPICE is left out (slow, and not among the paper's numbers).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gt = _read_json(gt_file, "COCO-format ground truth ({images, annotations: [{image_id, caption}]})")
    if not isinstance(gt, dict) or "annotations" not in gt:
        raise ValueError(f"{gt_file}: expected COCO-format ground truth with an 'annotations' list "
                         f"(e.g. coco_karpathy_test_gt.json)")
    results = preds if isinstance(preds, list) else _read_json(preds, "predictions ([{image_id, caption}])")
    refs: dict[Any, list[dict[str, str]]] = {}
    for a in gt["annotations"]:
        refs.setdefault(a["image_id"], []).append({"caption": a["caption"]})
    hyps: dict[Any, list[dict[str, str]]] = {}
    for i, r in enumerate(results):
        if not isinstance(r, dict) or "image_id" not in r or "caption" not in r:
            raise ValueError(f"prediction {i}: {r!r} is not {{image_id, caption}} (the COCO results format)")
        if r["image_id"] not in refs:
            raise ValueError(f"prediction {i}: image_id {r['image_id']!r} is not in {gt_file}")
        if r["image_id"] in hyps:
            raise ValueError(f"prediction {i}: a second caption for image_id {r['image_id']!r}; give one per image")
        hyps[r["image_id"]] = [{"caption": str(r["caption"])}]
    if not hyps:
        raise ValueError("nothing to score: no predictions")
    if len(hyps) < len(refs):
        warnings.warn(f"scoring {len(hyps)} predicted images of the {len(refs)} in {gt_file}: "
                      f"not comparable with published numbers", stacklevel=2)
    require_java()
    tok = PTBTokenizer()
    gts = tok.tokenize({k: refs[k] for k in hyps})
    res = tok.tokenize(hyps)
    wanted = list(metrics)
    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
    if "METEOR" in wanted:
        scorers.insert(1, (Meteor(), ["METEOR"]))
    out: dict[str, float] = {}
    for scorer, names in scorers:
        if not set(names) & set(wanted):
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts
            score, _ = scorer.compute_score(gts, res)
        for name, value in zip(names, score if isinstance(score, list) else [score]):
            out[name] = float(value)
        if isinstance(scorer, Meteor):  # its Java process stays up otherwise
            _close_meteor(scorer)
    return {k: out[k] for k in COCO_KEYS if k in out and k in wanted}


def _close_meteor(m: Any) -> None:
    with m.lock:
        m.meteor_p.stdin.close()
        m.meteor_p.kill()
        m.meteor_p.wait()


def format_coco(scores: dict[str, float]) -> str:
    """In percent, as papers print them (B@4 38.5, CIDEr 133.2)."""
    head = "".join(f"{k:>9}" for k in scores)
    row = "".join(f"{100 * v:>9.2f}" for v in scores.values())
    return head + "\n" + row


# ---- MME ------------------------------------------------------------------------------------
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_label(answer: str) -> str:
    """The eval_tool's reading of an answer: yes / no / other (from its first 4 characters)."""
    a = answer.strip().lower()
    if a in ("yes", "no"):
        return a
    head = a[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score_mme_file(path: str | Path) -> dict[str, float]:
    """acc, acc+ (percent) and score = acc + acc+ of one subtask's result file.

    Lines: image \\t question \\t ground truth \\t prediction; the two questions of an image are
    consecutive lines (the eval_tool pairs lines two by two; here a pair must share its image).
    """
    path = Path(path)
    lines = [ln.rstrip("\n").rstrip("\r") for ln in path.read_text().splitlines() if ln.strip()]
    if not lines or len(lines) % 2:
        raise ValueError(f"{path}: {len(lines)} result lines; MME asks two questions per image (an even number)")
    right = plus = 0
    for i in range(0, len(lines), 2):
        pair = []
        for n, line in enumerate(lines[i:i + 2], start=i + 1):
            parts = line.split("\t")
            if len(parts) != 4:
                raise ValueError(f"{path}:{n}: {len(parts)} tab-separated fields; expected image, question, "
                                 f"ground truth, prediction")
            image, _, gt, pred = parts
            gt = gt.strip().lower()
            if gt not in ("yes", "no"):
                raise ValueError(f"{path}:{n}: ground truth {gt!r}; MME's answers are yes or no")
            pair.append((image, gt == mme_label(pred)))
        if pair[0][0] != pair[1][0]:
            raise ValueError(f"{path}:{i + 1}-{i + 2}: consecutive lines name different images "
                             f"({pair[0][0]}, {pair[1][0]}); write both questions of an image together")
        ok = [p[1] for p in pair]
        right += sum(ok)
        plus += all(ok)
    acc = 100.0 * right / len(lines)
    acc_plus = 100.0 * plus / (len(lines) // 2)
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}


def score_mme(results_dir: str | Path) -> dict[str, Any]:
    """{"subtasks": {name: {acc, acc_plus, score}}, "perception": .., "cognition": ..}.

    Totals sum the subtask scores found; missing subtask files are listed under "missing" (and
    warned about), since a total over fewer subtasks does not compare with published ones.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir}: no MME results directory (one {{subtask}}.txt per subtask)")
    subtasks, missing = {}, []
    for name in MME_PERCEPTION + MME_COGNITION:
        f = results_dir / f"{name}.txt"
        if f.exists():
            subtasks[name] = score_mme_file(f)
        else:
            missing.append(name)
    if not subtasks:
        raise FileNotFoundError(f"{results_dir}: none of the MME subtask files ({', '.join(MME_PERCEPTION + MME_COGNITION)}.txt)")
    if missing:
        warnings.warn(f"{results_dir}: no results for {', '.join(missing)}; the totals leave them out", stacklevel=2)
    out: dict[str, Any] = {"subtasks": subtasks,
                           "perception": sum(subtasks[n]["score"] for n in MME_PERCEPTION if n in subtasks),
                           "cognition": sum(subtasks[n]["score"] for n in MME_COGNITION if n in subtasks)}
    if missing:
        out["missing"] = missing
    return out


def format_mme(scores: dict[str, Any]) -> str:
    lines = [f"{'subtask':<24}{'acc':>8}{'acc+':>8}{'score':>9}"]
    for name, s in scores["subtasks"].items():
        lines.append(f"{name:<24}{s['acc']:>8.2f}{s['acc_plus']:>8.2f}{s['score']:>9.2f}")
    lines.append(f"{'Perception':<24}{'':>16}{scores['perception']:>9.2f}")
    lines.append(f"{'Cognition':<24}{'':>16}{scores['cognition']:>9.2f}")
    if scores.get("missing"):
        lines.append(f"(no results for: {', '.join(scores['missing'])})")
    return "\n".join(lines)


# ---- CLI ------------------------------------------------------------------------------------
def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score predictions (ScienceQA, COCO captions, MME)")
    ssub = p.add_subparsers(dest="score_task", required=True, metavar="TASK")

    s = ssub.add_parser("scienceqa", help="ScienceQA accuracy by subject, context and grade")
    s.add_argument("--problems", required=True, help="problems.json of the released dataset")
    s.add_argument("--preds", required=True, help="preds.json: {pid: choice index}, -1 = unreadable")
    s.add_argument("--split", default=None,
                   help="score every problem of this split (ids from pid_splits.json beside problems.json); "
                        "default: the predicted problems")
    s.add_argument("--out", default=None, help="write the scores as JSON")
    s.set_defaults(func=run_scienceqa)

    c = ssub.add_parser("coco", help="COCO caption metrics (pycocoevalcap; needs Java)")
    c.add_argument("--gt", required=True, help="COCO-format ground truth, e.g. coco_karpathy_test_gt.json")
    c.add_argument("--preds", required=True, help="predictions in the COCO results format [{image_id, caption}]")
    c.add_argument("--out", default=None, help="write the scores as JSON")
    c.set_defaults(func=run_coco)

    m = ssub.add_parser("mme", help="MME acc / acc+ per subtask, perception and cognition totals")
    m.add_argument("--results", required=True, help="directory with one {subtask}.txt per subtask")
    m.add_argument("--out", default=None, help="write the scores as JSON")
    m.set_defaults(func=run_mme)


def run_scienceqa(args: argparse.Namespace) -> int:
    problems = _read_json(args.problems, "ScienceQA problems.json")
    preds = _read_json(args.preds, "predictions {pid: choice index}")
    split_pids = split_pids_of(args.problems, args.split) if args.split else None
    scores = score_scienceqa(problems, preds, split_pids)
    print(format_scienceqa(scores, args.split or ""))
    if args.out:
        write_json(args.out, scores)
    return 0


def run_coco(args: argparse.Namespace) -> int:
    scores = score_coco(args.gt, args.preds)
    print(format_coco(scores))
    if args.out:
        write_json(args.out, scores)
    return 0


def run_mme(args: argparse.Namespace) -> int:
    scores = score_mme(args.results)
    print(format_mme(scores))
    if args.out:
        write_json(args.out, scores)
    return 0
