"""MME, as released (MME_Benchmark_release_version): one folder per subtask.

    root/{subtask}/questions_answers_YN/{name}.txt + root/{subtask}/images/{name}.jpg
        (artwork, celebrity, landmark, posters, scene)
    root/{subtask}/{name}.txt + root/{subtask}/{name}.{jpg,png}   (the other subtasks)

Each .txt holds the two questions of its image, one per line: "question<TAB>Yes|No"; the
questions end with "Please answer yes or no.". Prompt: "Instruction: {question}\\nResponse:" (the
released eval). `load_samples(root, split="test")` returns one sample per question, the two of an
image next to each other; meta has subtask, image name, question and ground truth for the result
files (`ademvl eval mme` writes them in the layout MME's eval_tool reads).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import Sample
from ..files import InputError, InputNotFound, read_text
from . import option
from .instruct import prompt_of

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = MME_PERCEPTION + MME_COGNITION
RESULTS = "MME results (image<TAB>question<TAB>ground truth<TAB>prediction per line)"
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


def subtask_files(root: Path, subtask: str) -> tuple[Path, Path]:
    """(questions dir, images dir) of a subtask in either released layout."""
    base = root / subtask
    if (base / "questions_answers_YN").is_dir():
        return base / "questions_answers_YN", base / "images"
    return base, base


def load_samples(root: str, split: str = "test", subtasks: list[str] | None = None,
                 limit: int | None = None) -> list[Sample]:
    """All questions of the subtasks found under root (or of `subtasks`); limit: images per subtask."""
    root = Path(root)
    if not root.is_dir():
        raise InputNotFound(root, "MME benchmark folder not found (MME_Benchmark_release_version)")
    names = subtasks or [s for s in SUBTASKS if (root / s).is_dir()]
    if not names:
        raise InputNotFound(root, f"no MME subtask folders ({', '.join(SUBTASKS)})")
    samples = []
    for task in names:
        qdir, idir = subtask_files(root, task)
        if not qdir.is_dir():
            raise InputNotFound(qdir, "MME subtask folder not found", f"subtasks are: {', '.join(SUBTASKS)}")
        for qa in sorted(qdir.glob("*.txt"))[:limit]:
            image = next((idir / (qa.stem + s) for s in IMAGE_SUFFIXES if (idir / (qa.stem + s)).exists()), None)
            if image is None:
                raise InputNotFound(qa, f"no image {qa.stem}.jpg/.png beside it in {idir}")
            for n, line in enumerate(read_text(qa, "MME questions (question<TAB>Yes|No per line)").splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                    raise InputError(f"{qa}:{n}", f"expected 'question<TAB>Yes|No', got {line[:80]!r}")
                question, gt = parts[0].strip(), parts[1].strip()
                samples.append(Sample(id=f"{task}/{qa.stem}/{n}", image=str(image), turns=[(prompt_of(question), gt)],
                                      meta={"subtask": task, "image_name": image.name, "question": question, "gt": gt}))
    return samples


# ---- evaluation (the task interface: ademvl/tasks/__init__.py) --------------------------------
@dataclass
class EvalOptions:
    """`ademvl eval mme`: answer every question, write the eval_tool's result files, score them."""

    data_root: str = option(help="MME_Benchmark_release_version directory")
    subtasks: list[str] | None = option(None, "only these subtasks")
    max_new_tokens: int = option(10, "answer length limit (the released eval: 10)")
    limit: int | None = option(None, "only the first N images per subtask (quick checks; not comparable)")
    protocol: str = option("ademvl", "ademvl (ours) | released: the authors' input layout and eval script, for "
                                     "imported checkpoints (docs/released.md)")


def eval_samples(o: EvalOptions) -> list[Sample]:
    samples = load_samples(o.data_root, subtasks=o.subtasks, limit=o.limit)
    if o.protocol == "released":
        from ..released_protocol import mme_prompt

        return [Sample(s.id, s.image, [(mme_prompt(s.meta["question"]), "")], s.meta) for s in samples]
    return samples


def generation(o: EvalOptions) -> dict[str, Any]:
    if o.protocol == "released":
        from ..released_protocol import MME_NEW_TOKENS

        return {"max_new_tokens": MME_NEW_TOKENS}
    return {"max_new_tokens": o.max_new_tokens}


def predict(samples: list[Sample], texts: list[str], o: EvalOptions) -> dict[str, Any]:
    """{subtask}.txt: image \\t question \\t ground truth \\t prediction, the layout MME's eval_tool reads."""
    lines: dict[str, list[str]] = {}
    for s, text in zip(samples, texts):
        # one line, no tabs: the eval_tool splits on them (eval_mme.py only removes the newlines)
        answer = text.replace("\n", "").replace("\t", " ") if o.protocol == "released" else " ".join(text.replace("\t", " ").split())
        m = s.meta
        lines.setdefault(m["subtask"], []).append("\t".join([m["image_name"], m["question"], m["gt"], answer]))
    return {f"{task}.txt": "\n".join(task_lines) + "\n" for task, task_lines in lines.items()}


def score_outputs(outputs: dict[str, Any], o: EvalOptions) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the subtasks left out were chosen; the scores list them
        return score_results({name[: -len(".txt")]: text for name, text in outputs.items()})


def summary(outputs: dict[str, Any], samples: list[Sample], o: EvalOptions) -> str:
    return f"{len(samples)} questions in {len(outputs)} subtasks"


@dataclass
class ScoreOptions:
    """`ademvl score mme`: acc / acc+ per subtask, perception and cognition totals."""

    results: str = option(help="directory with one {subtask}.txt per subtask")


def score_files(o: ScoreOptions) -> dict[str, Any]:
    return score_mme(o.results)


# ---- the scorer (MME's eval_tool) -------------------------------------------------------------
def mme_label(answer: str) -> str:
    """The eval_tool's reading of an answer: yes / no / other (from its first 4 characters)."""
    a = answer.strip().lower()
    if a in ("yes", "no"):
        return a
    head = a[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score_lines(text: str, where: str) -> dict[str, float]:
    """acc, acc+ (percent) and score = acc + acc+ of one subtask's result lines.

    Lines: image \\t question \\t ground truth \\t prediction; the two questions of an image are
    consecutive lines (the eval_tool pairs lines two by two; here a pair must share its image).
    """
    lines = [ln.rstrip("\r") for ln in text.splitlines() if ln.strip()]
    if not lines or len(lines) % 2:
        raise InputError(where, f"{len(lines)} result lines; MME asks two questions per image (an even number)")
    right = plus = 0
    for i in range(0, len(lines), 2):
        pair = []
        for n, line in enumerate(lines[i:i + 2], start=i + 1):
            parts = line.split("\t")
            if len(parts) != 4:
                raise InputError(f"{where}:{n}", f"{len(parts)} tab-separated fields; expected image, question, "
                                                 "ground truth, prediction")
            image, _, gt, pred = parts
            gt = gt.strip().lower()
            if gt not in ("yes", "no"):
                raise InputError(f"{where}:{n}", f"ground truth {gt!r}; MME's answers are yes or no")
            pair.append((image, gt == mme_label(pred)))
        if pair[0][0] != pair[1][0]:
            raise InputError(f"{where}:{i + 1}-{i + 2}", f"consecutive lines name different images "
                                                         f"({pair[0][0]}, {pair[1][0]}); write both questions of an image together")
        ok = [p[1] for p in pair]
        right += sum(ok)
        plus += all(ok)
    acc = 100.0 * right / len(lines)
    acc_plus = 100.0 * plus / (len(lines) // 2)
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}


def score_mme_file(path: str | Path) -> dict[str, float]:
    return score_lines(read_text(path, RESULTS), str(path))


def score_results(results: dict[str, str], where: str = "") -> dict[str, Any]:
    """{"subtasks": {name: {acc, acc_plus, score}}, "perception": .., "cognition": ..} of result texts.

    Totals sum the subtask scores found; missing subtasks are listed under "missing" (and warned
    about), since a total over fewer subtasks does not compare with published ones.
    """
    subtasks = {n: score_lines(results[n], f"{where}{n}.txt") for n in MME_PERCEPTION + MME_COGNITION if n in results}
    missing = [n for n in MME_PERCEPTION + MME_COGNITION if n not in results]
    if not subtasks:
        raise InputNotFound(where or "results", f"none of the MME subtask files "
                                                f"({', '.join(MME_PERCEPTION + MME_COGNITION)}.txt)")
    if missing:
        warnings.warn(f"{where or 'results'}: no results for {', '.join(missing)}; the totals leave them out", stacklevel=2)
    out: dict[str, Any] = {"subtasks": subtasks,
                           "perception": sum(subtasks[n]["score"] for n in MME_PERCEPTION if n in subtasks),
                           "cognition": sum(subtasks[n]["score"] for n in MME_COGNITION if n in subtasks)}
    if missing:
        out["missing"] = missing
    return out


def score_mme(results_dir: str | Path) -> dict[str, Any]:
    """score_results of a directory of {subtask}.txt files (the eval_tool's layout)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise InputNotFound(results_dir, "no MME results directory (one {subtask}.txt per subtask)")
    found = {n: read_text(results_dir / f"{n}.txt", RESULTS) for n in MME_PERCEPTION + MME_COGNITION
             if (results_dir / f"{n}.txt").exists()}
    return score_results(found, f"{results_dir}/")


def format_scores(scores: dict[str, Any], name: str = "") -> str:
    lines = [f"{'subtask':<24}{'acc':>8}{'acc+':>8}{'score':>9}"]
    for task, s in scores["subtasks"].items():
        lines.append(f"{task:<24}{s['acc']:>8.2f}{s['acc_plus']:>8.2f}{s['score']:>9.2f}")
    lines.append(f"{'Perception':<24}{'':>16}{scores['perception']:>9.2f}")
    lines.append(f"{'Cognition':<24}{'':>16}{scores['cognition']:>9.2f}")
    if scores.get("missing"):
        lines.append(f"(no results for: {', '.join(scores['missing'])})")
    return "\n".join(lines)
