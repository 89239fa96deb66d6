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

import json
import re
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..data import Sample

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
    """Why this problem cannot be used (None when it can)."""
    choices = problem.get("choices")
    if not isinstance(choices, list) or not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        n = len(choices) if isinstance(choices, list) else "no"
        return f"problem {pid}: {n} choices; ScienceQA problems have {MIN_CHOICES} to {MAX_CHOICES} (options A-E)"
    answer = problem.get("answer")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        return f"problem {pid}: answer index {answer!r} is not one of its {len(choices)} choices (0..{len(choices) - 1})"
    path = problem.get("image_path")
    if path is not None and not Path(path).exists():
        return f"problem {pid}: image file {path} not found (the problem names image {problem.get('image')!r})"
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
        raise FileNotFoundError(
            f"{root}: no ScienceQA data here; expected problems.json + pid_splits.json + images/ (released "
            f"layout) or {HF_SPLITS.get(split, split)}-*.parquet (Hugging Face release)")
    captions: dict[str, str] = {}
    if use_caption:
        path = Path(caption_file) if caption_file else root / "captions.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: captions file not found; use_caption needs ScienceQA's captions.json "
                                    f"({{\"captions\": {{pid: text}}}}) or set caption_file")
        captions = json.loads(path.read_text())["captions"]
    for pid, p in problems.items():
        p["caption"] = captions.get(pid, "")
    return problems


def _read_released(root: Path, split: str) -> dict[str, dict[str, Any]]:
    problems = json.loads((root / "problems.json").read_text())
    splits_file = root / "pid_splits.json"
    if splits_file.exists():
        splits = json.loads(splits_file.read_text())
        if split not in splits:
            raise ValueError(f"{splits_file}: no split {split!r}; it has {', '.join(splits)}")
        pids = [str(p) for p in splits[split]]
    else:  # no pid_splits.json: each problem's own `split` field
        pids = [pid for pid, p in problems.items() if p.get("split") == split]
    missing = [pid for pid in pids if pid not in problems]
    if missing:
        raise ValueError(f"{splits_file}: {len(missing)} {split} ids are not in problems.json (e.g. {missing[:3]})")
    out = {}
    for pid in pids:
        p = dict(problems[pid])
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
    import pyarrow.parquet as pq

    from ..hub import cache_dir

    out: dict[str, dict[str, Any]] = {}
    row = 0
    for f in _parquet_files(root, split):
        table = pq.read_table(f)
        need = {"image", "question", "choices", "answer"}
        if not need <= set(table.column_names):
            raise ValueError(f"{f}: columns {sorted(need - set(table.column_names))} missing; "
                             f"expected the ScienceQA parquet release ({', '.join(sorted(need))}, hint, subject, grade, ...)")
        stat = f.stat()
        image_dir = cache_dir() / "scienceqa-parquet" / f"{f.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        for rec in tqdm(table.to_pylist(), desc=f"read {f.name}", unit="problem", mininterval=1.0):
            pid = f"{split}-{row:05d}"
            row += 1
            image = rec.pop("image", None)
            rec = {k: ("" if v is None and k in ("hint", "lecture", "solution") else v) for k, v in rec.items()}
            rec["split"] = split
            rec["image"] = "image.png" if image and image.get("bytes") else None
            rec["image_path"] = None
            if rec["image"]:
                path = image_dir / f"{pid}{Path(image.get('path') or 'image.png').suffix or '.png'}"
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(path.suffix + ".tmp")
                    tmp.write_bytes(image["bytes"])
                    tmp.rename(path)
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
        raise ValueError("; ".join(bad[:3]) + more + ". Fix the data, or set skip_invalid (--skip-invalid) "
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
