"""ScienceQA as released: problems, prompts in the ScienceQA/LaVIN templates, answer reading.

Two source layouts are read from local files (`root`):

    released     root/problems.json          {pid: {question, choices, answer, hint, image, subject,
                                               grade, split, lecture, solution, ...}}
                 root/pid_splits.json        {"train": [pid, ...], "val": [...], "test": [...], ...}
                 root/images/{split}/{pid}/image.png
                 root/captions.json          optional, {"captions": {pid: text}} (use_caption)
    Hugging Face root/[data/]{train,validation,test}-*.parquet, columns image ({bytes, path} or
                 null), question, choices, answer, hint, task, grade, subject, topic, category,
                 skill, lecture, solution. Problems get the ids "{split}-{row:05d}"; their images
                 are written once (the stored bytes, not re-encoded) under $ADEMVL_CACHE.

Options of `load_samples` (the YAML keys under `data:` besides `task: scienceqa`):

    root            dataset directory (either layout)
    split           train | val | test | trainval | minival | ... (a key of pid_splits.json)
    prompt_format   INPUT-OUTPUT, e.g. CQM-A (training default), QCM-A (the released eval),
                    CQM-LA, QCM-LEA, ... (see INPUT_FORMATS / OUTPUT_FORMATS)
    use_caption     append the caption from captions.json to the context
    caption_file    another captions file (default root/captions.json)
    skip_invalid    skip (with a warning) problems that break a rule below instead of stopping
    limit           keep the first N problems of the split

Rules checked for every problem: 2 to 5 choices (options A-E), an answer index among them, and
an image file where the problem names one. A break stops with a message naming the problem and
the rule, unless skip_invalid is set.

Prompt (after the model's "Image: <cls>\\n" head) and target, e.g. CQM-A:

    Context: N/A\\nQuestion: Which is a mammal?\\nOptions: (A) frog (B) horse\\nResponse:
    The answer is B.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data import Sample
from . import option
from ..files import InputError, InputNotFound, atomic_write_bytes, read_json, read_parquet

OPTIONS = ("A", "B", "C", "D", "E")
MIN_CHOICES, MAX_CHOICES = 2, len(OPTIONS)

# Input templates of the ScienceQA / LaVIN code (C = context, Q = question, M = options,
# L = lecture, E = explanation, i.e. the solution). Every prompt then ends with "Response:".
INPUT_FORMATS = {
    "Q": "Question: {question}\n",
    "QM": "Question: {question}\nOptions: {choices}\n",
    "CQM": "Context: {context}\nQuestion: {question}\nOptions: {choices}\n",
    "QCM": "Question: {question}\nContext: {context}\nOptions: {choices}\n",
    "QCML": "Question: {question}\nContext: {context}\nOptions: {choices}\nBECAUSE: {lecture}\n",
    "QCME": "Question: {question}\nContext: {context}\nOptions: {choices}\nBECAUSE: {solution}\n",
    "QCMLE": "Question: {question}\nContext: {context}\nOptions: {choices}\nBECAUSE: {lecture} {solution}\n",
    "QCLM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture}\nOptions: {choices}\n",
    "QCEM": "Question: {question}\nContext: {context}\nBECAUSE: {solution}\nOptions: {choices}\n",
    "QCLEM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture} {solution}\nOptions: {choices}\n",
}
# Output templates. The released code (and ScienceQA's) writes the solution for AL and the
# lecture for AE; here each letter means what it names (L = lecture, E = explanation).
OUTPUT_FORMATS = {
    "A": "The answer is {answer}.",
    "AL": "The answer is {answer}. BECAUSE: {lecture}",
    "AE": "The answer is {answer}. BECAUSE: {solution}",
    "ALE": "The answer is {answer}. BECAUSE: {lecture} {solution}",
    "AEL": "The answer is {answer}. BECAUSE: {solution} {lecture}",
    "LA": "{lecture} The answer is {answer}.",
    "EA": "{solution} The answer is {answer}.",
    "LEA": "{lecture} {solution} The answer is {answer}.",
    "ELA": "{solution} {lecture} The answer is {answer}.",
}
PROMPT_FORMATS = tuple(f"{i}-{o}" for i in INPUT_FORMATS for o in OUTPUT_FORMATS)
ANSWER_RE = re.compile(r"The answer is \(?([A-Z])\b")
GRADES_1_6 = tuple(f"grade{g}" for g in range(1, 7))
GRADES_7_12 = tuple(f"grade{g}" for g in range(7, 13))
HF_SPLITS = {"val": "validation", "minival": "validation"}


# ---- prompts --------------------------------------------------------------------------------
def split_format(prompt_format: str) -> tuple[str, str]:
    """("CQM", "A") from "CQM-A"; a clear error for a name the templates do not define."""
    inp, _, out = prompt_format.partition("-")
    if inp not in INPUT_FORMATS or out not in OUTPUT_FORMATS:
        raise ValueError(f"prompt_format={prompt_format!r}: use INPUT-OUTPUT with INPUT one of "
                         f"{', '.join(INPUT_FORMATS)} and OUTPUT one of {', '.join(OUTPUT_FORMATS)} (e.g. CQM-A)")
    return inp, out


def context_text(problem: dict[str, Any], use_caption: bool = False) -> str:
    """The hint, plus the caption with use_caption; "N/A" when both are empty."""
    caption = problem.get("caption", "") if use_caption else ""
    return " ".join([problem.get("hint") or "", caption or ""]).strip() or "N/A"


def choice_text(choices: list[str]) -> str:
    return " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(choices))


def build_prompt(problem: dict[str, Any], prompt_format: str = "CQM-A", use_caption: bool = False) -> tuple[str, str]:
    """(prompt, target) of one problem, as the released code builds them (create_training_example)."""
    inp, out = split_format(prompt_format)
    fields = {
        "question": problem["question"],
        "context": context_text(problem, use_caption),
        "choices": choice_text(problem["choices"]),
        "answer": OPTIONS[problem["answer"]],
        # The templates write newlines of lectures/solutions as a literal "\n" (GPT-3 era habit kept
        # by LaVIN and the released code), so the prompt's own line structure stays intact.
        "lecture": (problem.get("lecture") or "").replace("\n", "\\n"),
        "solution": (problem.get("solution") or "").replace("\n", "\\n"),
    }
    prompt = (INPUT_FORMATS[inp].format(**fields) + "Response:").replace("  ", " ").strip()
    target = OUTPUT_FORMATS[out].format(**fields).replace("  ", " ").strip()
    if target.endswith("BECAUSE:"):  # an empty lecture/solution leaves a dangling marker
        target = target[: -len("BECAUSE:")].strip()
    return prompt, target


def parse_answer(text: str, num_choices: int) -> int:
    """Choice index of the letter after the last "The answer is" in `text`; -1 if there is none or
    it names no choice (such an answer counts as wrong)."""
    found = ANSWER_RE.findall(text)
    if not found:
        return -1
    idx = ord(found[-1]) - ord("A")
    return idx if 0 <= idx < num_choices else -1


# ---- reading the data -----------------------------------------------------------------------
def check_problem(pid: str, problem: dict[str, Any]) -> str | None:
    """Why this problem cannot be used (None when it can), naming the file it came from."""
    where = f"{problem['source']}: " if problem.get("source") else ""
    if not isinstance(problem.get("question"), str):
        return f"{where}problem {pid}: question is {problem.get('question')!r}; expected text"
    choices = problem.get("choices")
    if not isinstance(choices, list) or not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        n = len(choices) if isinstance(choices, list) else "no"
        return f"{where}problem {pid}: {n} choices; ScienceQA problems have {MIN_CHOICES} to {MAX_CHOICES} (options A-E)"
    if not all(isinstance(c, str) for c in choices):
        return f"{where}problem {pid}: choices {choices!r}; expected a list of texts"
    answer = problem.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        return f"{where}problem {pid}: answer index {answer!r} is not one of its {len(choices)} choices (0..{len(choices) - 1})"
    path = problem.get("image_path")
    if path is not None and not Path(path).exists():
        return f"{where}problem {pid}: image file {path} not found (the problem names image {problem.get('image')!r})"
    return None


def read_problems(root: str | Path, split: str = "test", use_caption: bool = False,
                  caption_file: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """pid -> problem of one split, in the split's order, with `image_path` (a file or None) and
    `caption` added. Reads the released layout or the Hugging Face parquet files."""
    root = Path(root)
    if (root / "problems.json").exists():
        problems = _read_released(root, split)
    elif _parquet_files(root, split):
        problems = _read_parquet(root, split)
    else:
        raise InputNotFound(
            root, f"no ScienceQA data here; expected problems.json + pid_splits.json + images/ (released "
                  f"layout) or {HF_SPLITS.get(split, split)}-*.parquet (Hugging Face release)")
    captions: dict[str, str] = {}
    if use_caption:
        path = Path(caption_file) if caption_file else root / "captions.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: captions file not found; use_caption needs ScienceQA's captions.json "
                                    f"({{\"captions\": {{pid: text}}}}) or set caption_file")
        captions = read_json(path, "captions {\"captions\": {pid: text}}", form=dict).get("captions")
        if not isinstance(captions, dict):
            raise InputError(path, "no \"captions\" object; expected {\"captions\": {pid: text}} (ScienceQA's captions.json)")
    for pid, p in problems.items():
        p["caption"] = captions.get(pid, "")
    return problems


def _read_released(root: Path, split: str) -> dict[str, dict[str, Any]]:
    problems = read_json(root / "problems.json", "ScienceQA problems.json {pid: problem}", form=dict)
    splits_file = root / "pid_splits.json"
    pids = _split_pids(problems, splits_file, split)
    missing = [pid for pid in pids if pid not in problems]
    if missing:
        raise InputError(splits_file, f"{len(missing)} {split} ids are not in problems.json (e.g. {missing[:3]})",
                         "use the pid_splits.json released with that problems.json")
    out = {}
    for pid in pids:
        if not isinstance(problems[pid], dict):
            raise InputError(root / "problems.json", f"problem {pid} is a {type(problems[pid]).__name__}; "
                                                     "expected {question, choices, answer, hint, image, ...}")
        p = dict(problems[pid], source=str(root / "problems.json"))
        # Images live under the split the problem belongs to (trainval/minival name no folder).
        folder = p.get("split") or split
        p["image_path"] = str(root / "images" / folder / pid / p["image"]) if p.get("image") else None
        out[pid] = p
    return out


def _parquet_files(root: Path, split: str) -> list[Path]:
    name = HF_SPLITS.get(split, split)
    if root.is_file() and root.suffix == ".parquet":
        return [root]
    return sorted(root.glob(f"{name}-*.parquet")) + sorted(root.glob(f"data/{name}-*.parquet"))


def _read_parquet(root: Path, split: str) -> dict[str, dict[str, Any]]:
    """The Hugging Face release; image bytes go to files once so that samples carry paths."""
    from ..hub import cache_dir

    out: dict[str, dict[str, Any]] = {}
    row = 0
    for f in _parquet_files(root, split):
        table = read_parquet(f, "the ScienceQA parquet release")
        need = {"image", "question", "choices", "answer"}
        if not need <= set(table.column_names):
            raise InputError(f, f"columns {sorted(need - set(table.column_names))} missing; "
                                f"expected the ScienceQA parquet release ({', '.join(sorted(need))}, hint, subject, grade, ...)")
        stat = f.stat()
        image_dir = cache_dir() / "scienceqa-parquet" / f"{f.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        for rec in tqdm(table.to_pylist(), desc=f"read {f.name}", unit="problem", mininterval=1.0):
            pid = f"{split}-{row:05d}"
            row += 1
            image = rec.pop("image", None)
            rec = {k: ("" if v is None and k in ("hint", "lecture", "solution") else v) for k, v in rec.items()}
            rec["split"], rec["source"] = split, str(f)
            rec["image"] = "image.png" if image and image.get("bytes") else None
            rec["image_path"] = None
            if rec["image"]:
                path = image_dir / f"{pid}{Path(image.get('path') or 'image.png').suffix or '.png'}"
                if not path.exists():
                    atomic_write_bytes(path, image["bytes"])
                rec["image_path"] = str(path)
            out[pid] = rec
    return out


def to_sample(pid: str, problem: dict[str, Any], prompt_format: str = "CQM-A", use_caption: bool = False,
              blank_image: bool = False) -> Sample:
    """One problem as a Sample; meta carries what scoring needs. blank_image: the no-image path."""
    prompt, target = build_prompt(problem, prompt_format, use_caption)
    meta = {k: problem.get(k) for k in ("choices", "answer", "hint", "image", "subject", "grade", "split")}
    meta["pid"] = pid
    image = None if blank_image else problem.get("image_path")
    return Sample(id=pid, image=image, turns=[(prompt, target)], meta=meta)


def valid_problems(problems: dict[str, dict[str, Any]], skip_invalid: bool = False) -> dict[str, dict[str, Any]]:
    """The problems that pass check_problem; otherwise stop (or warn and skip with skip_invalid)."""
    bad = [reason for pid, p in problems.items() if (reason := check_problem(pid, p))]
    if bad and not skip_invalid:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise InputError("; ".join(bad[:3]) + more + ". Fix the data, or set skip_invalid (--skip-invalid) "
                         "to leave such problems out (they are then scored as wrong by evaluation)")
    if bad:
        warnings.warn(f"skipping {len(bad)} problems that break a rule, e.g. {bad[0]}", stacklevel=2)
    return {pid: p for pid, p in problems.items() if check_problem(pid, p) is None}


def load_samples(root: str, split: str = "train", prompt_format: str = "CQM-A", use_caption: bool = False,
                 caption_file: str | None = None, skip_invalid: bool = False, limit: int | None = None) -> list[Sample]:
    """Samples of one split (see the module docstring for the options)."""
    split_format(prompt_format)
    problems = read_problems(root, split, use_caption, caption_file)
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    problems = valid_problems(problems, skip_invalid)
    return [to_sample(pid, p, prompt_format, use_caption) for pid, p in problems.items()]


# ---- evaluation (the task interface: ademvl/tasks/__init__.py) --------------------------------
@dataclass
class EvalOptions:
    """`ademvl eval scienceqa`: generate, read the letter after "The answer is", score the split."""

    data_root: str = option(help="ScienceQA directory (problems.json, pid_splits.json, images/; or the parquet files)")
    split: str = option("test", "the split to evaluate (a key of pid_splits.json)")
    prompt_format: str = option("CQM-A", "INPUT-OUTPUT template, e.g. CQM-A, QCM-A, QCM-LEA")
    use_caption: bool = option(False, "add captions.json's caption to the context")
    caption_file: str | None = option(None, "another captions file (default DATA_ROOT/captions.json)")
    blank_images: bool = option(False, "evaluate every problem without its image (indicator 0)")
    skip_invalid: bool = option(False, "score problems that break a rule (choices, answer, image) as wrong instead of stopping")
    limit: int | None = option(None, "only the first N problems (quick checks; not comparable)")
    max_new_tokens: int | None = option(None, "default: enough to reach the letter (8, or 512 after a lecture)")
    protocol: str = option("ademvl", "ademvl (ours) | released: the authors' input layout and eval script, for "
                                     "imported checkpoints (docs/released.md)")


def _problems(o: EvalOptions) -> dict[str, dict[str, Any]]:
    use_caption = o.use_caption or o.protocol == "released"  # eval_sqa.py reads the captions
    problems = read_problems(o.data_root, o.split, use_caption, o.caption_file)
    return dict(list(problems.items())[: o.limit]) if o.limit is not None else problems


def eval_samples(o: EvalOptions) -> list[Sample]:
    """Every usable problem of the split; those that break a rule stay out (and score as wrong)."""
    split_format(o.prompt_format)
    usable = valid_problems(_problems(o), o.skip_invalid)
    if o.protocol == "released":
        from ..released_protocol import scienceqa_prompt

        return [Sample(pid, None if o.blank_images else p.get("image_path"), [(scienceqa_prompt(p), "")],
                       {"choices": p["choices"]}) for pid, p in usable.items()]
    return [to_sample(pid, p, o.prompt_format, o.use_caption, blank_image=o.blank_images) for pid, p in usable.items()]


def generation(o: EvalOptions) -> dict[str, Any]:
    """Enough tokens to reach the letter: "The answer is X." comes first for A, AL, AE, ... (8
    tokens); after a lecture/solution for LA, EA, LEA, ELA (up to the released max length, 512)."""
    if o.protocol == "released":
        from ..released_protocol import SQA_NEW_TOKENS

        return {"max_new_tokens": SQA_NEW_TOKENS}
    return {"max_new_tokens": o.max_new_tokens or (8 if split_format(o.prompt_format)[1].startswith("A") else 512)}


def predict(samples: list[Sample], texts: list[str], o: EvalOptions) -> dict[str, Any]:
    """preds.json {pid: choice index, -1 = unreadable or skipped} and generations.json {pid: text}."""
    preds = {pid: -1 for pid in _problems(o)}  # skipped problems stay -1: wrong, never dropped
    generations = {}
    from ..released_protocol import read_letter

    read = read_letter if o.protocol == "released" else parse_answer
    for s, text in zip(samples, texts):
        preds[s.id] = read(text, len(s.meta["choices"]))
        generations[s.id] = text
    return {"preds.json": preds, "generations.json": generations}


def score_outputs(outputs: dict[str, Any], o: EvalOptions) -> dict[str, Any]:
    problems = _problems(o)
    return score_scienceqa(problems, outputs["preds.json"], list(problems))


def summary(outputs: dict[str, Any], samples: list[Sample], o: EvalOptions) -> str:
    unreadable = sum(1 for s in samples if outputs["preds.json"][s.id] == -1)
    note = ("; released protocol (eval_sqa.py: QCM-A with captions, 'The answer is' + 1 greedy token)"
            if o.protocol == "released" else "")
    return f"{len(outputs['preds.json'])} problems, {unreadable} answers unreadable (counted wrong){note}"


@dataclass
class ScoreOptions:
    """`ademvl score scienceqa`: accuracy by subject, context and grade of predictions made elsewhere."""

    problems: str = option(help="problems.json of the released dataset")
    preds: str = option(help="preds.json: {pid: choice index}, -1 = unreadable")
    split: str | None = option(None, "score every problem of this split (pid_splits.json beside problems.json); default: the predicted ones")


def score_files(o: ScoreOptions) -> dict[str, Any]:
    problems = read_json(o.problems, "ScienceQA problems.json {pid: problem}", form=dict)
    preds = read_json(o.preds, "predictions {pid: choice index} (as ademvl eval scienceqa --out writes)", form=dict)
    pids = split_pids_of(o.problems, o.split) if o.split else list(preds)
    if not preds:
        raise InputError(o.preds, "no predictions (an empty object); expected {pid: choice index}")
    unknown = [p for p in preds if p not in problems]
    if unknown:
        raise InputError(o.preds, f"{len(unknown)} predicted ids are not in {o.problems} (e.g. {unknown[:3]})",
                         "score against the problems.json the predictions were made for")
    missing = [p for p in pids if p not in preds]
    if missing:
        raise InputError(o.preds, f"{len(missing)} of the {len(pids)} problems of split {o.split!r} have no prediction "
                                  f"(e.g. {missing[:3]})", "predict all of them, or leave out --split to score only the predicted ones")
    for pid in pids:
        v = preds[pid]
        if isinstance(v, bool) or not isinstance(v, int) or not -1 <= v < MAX_CHOICES:
            hint = " (a letter: write its index, A = 0)" if isinstance(v, str) and v in OPTIONS else ""
            raise InputError(o.preds, f"prediction for {pid} is {v!r}{hint}; expected a choice index 0-{MAX_CHOICES - 1}, "
                                      "-1 = unreadable")
        p = problems[pid]
        if not isinstance(p, dict) or isinstance(p.get("answer"), bool) or not isinstance(p.get("answer"), int):
            raise InputError(o.problems, f"problem {pid} has no answer index; expected {{question, choices, answer: "
                                         "index, ...}")
    return score_scienceqa(problems, preds, pids if o.split else None)


# ---- forced choice: what the model prefers, whatever the answer's form ---------------------
ANSWER_PREFIX, LETTERS = "The answer is", "ABCDE"


@torch.no_grad()
def letter_logits(model: Any, samples: list, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Logits of " A" .. " E" right after "The answer is", for each sample: {id: (5,)}.

    One forward pass with "The answer is A." appended. Left padding puts the answer slot at the
    same place from the end in every row, so the LM head runs on the last few positions only.
    """
    tok = model.tokenizer
    prefix = len(tok.encode(ANSWER_PREFIX, add_special_tokens=False))
    target = len(tok.encode(f"{ANSWER_PREFIX} A.", add_special_tokens=False)) + 1  # + EOS
    letters = [tok.encode(f" {c}", add_special_tokens=False)[-1] for c in LETTERS]
    was_training = model.training
    model.eval()
    out: dict[str, torch.Tensor] = {}
    for i in tqdm(range(0, len(samples), batch_size), desc="forced choice", unit="batch", mininterval=1.0):
        chunk = [Sample(s.id, s.image, [(s.turns[-1][0], f"{ANSWER_PREFIX} A.")], s.meta) for s in samples[i : i + batch_size]]
        batch = {k: v.to(model.pos_k.device) for k, v in model.processor(chunk, train=True, padding_side="left").items()}
        batch.pop("labels")
        # the last `target - prefix + 1` positions; the first of them predicts the letter
        slot = model(**batch, logits_to_keep=target - prefix + 1).logits[:, 0]  # (B, V)
        out.update({s.id: row[letters].float().cpu() for s, row in zip(chunk, slot)})
    model.train(was_training)
    return out


def forced_choice(model: Any, samples: list, batch_size: int = 16) -> dict[str, int]:
    """The option whose letter is most likely right after "The answer is", for each sample.

    The ScienceQA protocol counts an answer that does not follow the format as wrong, so a model
    that never learned the format scores 0 whatever it knows. This reads what the model prefers
    among the options (samples' meta["choices"]) regardless of format.
    """
    logits = letter_logits(model, samples, batch_size)
    return {s.id: int(logits[s.id][: len(s.meta["choices"])].argmax()) for s in samples}


# ---- the scorer -----------------------------------------------------------------------------
KEYS = ("acc_natural", "acc_social", "acc_language", "acc_has_text", "acc_has_image",
        "acc_no_context", "acc_grade_1_6", "acc_grade_7_12", "acc_average")
# Column titles of the paper's Table I, in its order (the same order as the keys).
TITLES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")


def _groups(p: dict[str, Any]) -> dict[str, bool]:
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
    right = {k: 0 for k in KEYS}
    total = {k: 0 for k in KEYS}
    for pid in pids:
        p = problems[pid]
        try:
            ok = int(preds[pid]) == int(p["answer"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"problem {pid}: prediction {preds[pid]!r} is not a choice index (0-4, -1 = unreadable)") from e
        for key, member in _groups(p).items():
            if member:
                total[key] += 1
                right[key] += ok
    return {k: (round(100.0 * right[k] / total[k], 2) if total[k] else None) for k in KEYS}


def format_scores(scores: dict[str, float | None], name: str = "") -> str:
    """The Table I row: NAT SOC LAN | TXT IMG NO | G1-6 G7-12 | Avg."""
    head = f"{'':<12}" + "".join(f"{t:>8}" for t in TITLES)
    row = f"{name[:12]:<12}" + "".join(f"{'-' if scores[k] is None else format(scores[k], '.2f'):>8}" for k in KEYS)
    return head + "\n" + row


def split_pids_of(problems_file: str | Path, split: str) -> list[str]:
    """The ids of a split: pid_splits.json beside problems.json, else the problems' `split` field."""
    problems_file = Path(problems_file)
    problems = read_json(problems_file, "ScienceQA problems.json {pid: problem}", form=dict)
    return _split_pids(problems, problems_file.with_name("pid_splits.json"), split)


def _split_pids(problems: dict[str, Any], splits_file: Path, split: str) -> list[str]:
    if splits_file.exists():
        splits = read_json(splits_file, "ScienceQA pid_splits.json {split: [pid, ...]}", form=dict)
        if split not in splits:
            raise InputError(splits_file, f"no split {split!r}; it has {', '.join(splits)}")
        if not isinstance(splits[split], list):
            raise InputError(splits_file, f"split {split!r} is a {type(splits[split]).__name__}; expected a list of pids")
        return [str(p) for p in splits[split]]
    pids = [pid for pid, p in problems.items() if isinstance(p, dict) and p.get("split") == split]  # each problem's own `split` field
    if not pids:
        raise InputError(splits_file.parent / "problems.json", f"no problem has split {split!r} "
                         "and there is no pid_splits.json beside it")
    return pids
