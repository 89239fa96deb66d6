"""Emoji: name the emoji and answer multiple-choice questions about it, in any vendor's art style.

The corpus (`ademvl data emoji`, ademvl/emoji.py) is written by `write_layouts` in the layouts the
other tasks read, so the paper's protocols run on it as they are:

    coco_karpathy_{train,val,test}.json (+ _gt)   naming as captioning: the CLDR name is the caption
    problems.json + pid_splits.json + images/      ScienceQA multiple choice: qtype name | group | subgroup
    llava_{train,val,test}.json                    LLaVA conversations, naming and multiple choice mixed
                                                   (the instruction path; the demo trains on it)
    index.json                                     every image: vendor, concept key, split

Splits by vendor family: test = Twemoji, val = EmojiOne, train = the rest. Concepts held out of
training in every vendor (20% of each subgroup, `ademvl.emoji.unseen_concepts`) make the split
"unseen": the test family's images of them, asked for their group and subgroup only.

`ademvl eval emoji --images FOLDER` scores a checkpoint on any folder of emoji images named by
their code points (lower-case hex joined by "-", fe0f or not: "1f34e.png", "2764-fe0f.png"),
looking up names and groups itself: naming exact match (case-insensitive), token F1, BLEU-4 and
CIDEr (the COCO scorer), and accuracy on each multiple-choice type (4 options; chance 25%).
The questions are the ones the LLaVA layout trains, in the instruction prompt
("Instruction: ...\\nResponse:").
"""

from __future__ import annotations

import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import Sample
from ..files import InputError, InputNotFound, read_json, write_json
from . import option
from .instruct import prompt_of

if TYPE_CHECKING:
    from ..emoji import Concept, Corpus

NAME_QUESTION = "What is this emoji? Answer with its name."
MC_QUESTIONS = {"name": "Which emoji is this?", "group": "Which group of emoji is this one in?",
                "subgroup": "Which subgroup of emoji is this one in?"}
QTYPES = ("name", "group", "subgroup")  # multiple choice, 4 options each
ALL_QUESTIONS = ("naming", *QTYPES)  # naming: free text
N_OPTIONS = 4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
ANSWER_RE = re.compile(r"The answer is \(?([A-D])\b")


# ---- questions ---------------------------------------------------------------------------------
def _pick(rng: random.Random, truth: str, *pools: list[str]) -> tuple[list[str], int]:
    """N_OPTIONS choices: the truth and distractors from the first pools that have enough; the
    truth at a random place."""
    others: list[str] = []
    for pool in pools:
        extra = sorted({p for p in pool if p != truth and p not in others})
        need = N_OPTIONS - 1 - len(others)
        others += rng.sample(extra, min(need, len(extra)))
        if len(others) == N_OPTIONS - 1:
            break
    choices = [*others]
    answer = rng.randrange(len(choices) + 1)
    choices.insert(answer, truth)
    return choices, answer


def choices_for(qtype: str, c: Concept, concepts: dict[str, Concept], rng: random.Random) -> tuple[list[str], int]:
    """(choices, answer index): names of the same subgroup (then group); groups; subgroups of the
    same group (then any): distractors near the truth, so the image has to be read."""
    if qtype == "name":
        same_sub = [o.name for o in concepts.values() if o.subgroup == c.subgroup]
        same_group = [o.name for o in concepts.values() if o.group == c.group]
        return _pick(rng, c.name, same_sub, same_group, [o.name for o in concepts.values()])
    if qtype == "group":
        return _pick(rng, c.group, [o.group for o in concepts.values()])
    if qtype == "subgroup":
        return _pick(rng, c.subgroup, [o.subgroup for o in concepts.values() if o.group == c.group],
                     [o.subgroup for o in concepts.values()])
    raise ValueError(f"qtype {qtype!r}: choose one of {', '.join(QTYPES)}")


def options_text(choices: list[str]) -> str:
    return " ".join(f"({'ABCD'[i]}) {ch}" for i, ch in enumerate(choices))


def mc_question(qtype: str, choices: list[str]) -> str:
    return f"{MC_QUESTIONS[qtype]}\nOptions: {options_text(choices)}"


def answer_text(index: int) -> str:
    return f"The answer is {'ABCD'[index]}."


def questions(c: Concept, concepts: dict[str, Concept], seed: str, qtypes: tuple[str, ...] = ALL_QUESTIONS) -> list[dict[str, Any]]:
    """The naming question and the multiple-choice ones of one image, their options fixed by `seed`
    (the image's name: the same image always gets the same options)."""
    rng = random.Random(seed)
    out = [{"qtype": "naming", "question": NAME_QUESTION, "answer": c.name, "truth": c.name}] if "naming" in qtypes else []
    for q in (q for q in qtypes if q != "naming"):
        choices, answer = choices_for(q, c, concepts, rng)
        out.append({"qtype": q, "question": mc_question(q, choices), "choices": choices, "answer": answer_text(answer),
                    "truth": answer})
    return out


# ---- the layouts (written by `ademvl data emoji`) ----------------------------------------------
def layout_splits(corpus: Corpus) -> dict[str, list[Any]]:
    """train / val / test items (val and test: concepts that training has), and unseen (the test
    family's images of concepts training never shows)."""
    trained = {i.key for i in corpus.items if i.split == "train"}
    out: dict[str, list[Any]] = {"train": [i for i in corpus.items if i.split == "train"]}
    for name in ("val", "test"):
        out[name] = [i for i in corpus.items if i.split == name and i.key in trained]
    out["unseen"] = [i for i in corpus.items if i.split == "test" and i.key not in trained]
    return out


def write_layouts(out: Path, corpus: Corpus, seed: int = 0) -> dict[str, int]:
    """index.json, the COCO Karpathy files, ScienceQA problems.json and the LLaVA conversations."""
    concepts, splits = corpus.concepts, layout_splits(corpus)
    image_id = {id(it): n for n, it in enumerate(corpus.items)}
    write_json(out / "index.json", {"concepts": {k: vars(c) | {"keywords": list(c.keywords)} for k, c in concepts.items()},
                                    "unseen_concepts": sorted(corpus.unseen),
                                    "images": [vars(it) | {"family": it.family, "image_id": image_id[id(it)]} for it in corpus.items]})
    # COCO Karpathy: one caption (the CLDR name) per image
    for name in ("train", "val", "test"):
        items = splits[name]
        if name == "train":
            ann = [{"image": it.image, "caption": concepts[it.key].name, "image_id": image_id[id(it)]} for it in items]
        else:
            ann = [{"image": it.image, "caption": [concepts[it.key].name], "image_id": image_id[id(it)]} for it in items]
            write_json(out / f"coco_karpathy_{name}_gt.json", {
                "images": [{"id": image_id[id(it)]} for it in items],
                "annotations": [{"image_id": image_id[id(it)], "id": image_id[id(it)], "caption": concepts[it.key].name}
                                for it in items]})
        write_json(out / f"coco_karpathy_{name}.json", ann)
    # ScienceQA multiple choice and LLaVA conversations
    problems: dict[str, dict[str, Any]] = {}
    pid_splits: dict[str, list[str]] = {}
    for name, items in splits.items():
        qtypes = ("group", "subgroup") if name == "unseen" else ALL_QUESTIONS
        llava = []
        pid_splits[name] = []
        for it in items:
            qs = questions(concepts[it.key], concepts, f"{seed}/{it.vendor}/{it.key}", qtypes)
            for q in qs:
                llava.append({"id": f"{it.vendor}/{it.key}/{q['qtype']}", "image": it.image,
                              "conversations": [{"from": "human", "value": f"<image>\n{q['question']}"},
                                                {"from": "gpt", "value": q["answer"]}]})
                if q["qtype"] == "naming":
                    continue
                pid = f"{name}-{len(pid_splits[name]):06d}"
                pid_splits[name].append(pid)
                problems[pid] = {"question": MC_QUESTIONS[q["qtype"]], "choices": q["choices"], "answer": q["truth"],
                                 "hint": "", "image": "image.png", "task": "closed choice", "grade": "grade1",
                                 "subject": "language science", "topic": "emoji", "category": q["qtype"],
                                 "skill": q["qtype"], "qtype": q["qtype"], "lecture": "", "solution": "",
                                 "split": name, "vendor": it.vendor, "key": it.key}
                link = out / "images" / name / pid / "image.png"
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to(Path("../../..") / it.image)  # images/{split}/{pid}/ -> the corpus image
        if name != "unseen":
            write_json(out / f"llava_{name}.json", llava)
    write_json(out / "problems.json", problems)
    write_json(out / "pid_splits.json", pid_splits)
    return {name: len(items) for name, items in splits.items()}


# ---- evaluation on any folder of emoji images (the task interface) -----------------------------
@dataclass
class EvalOptions:
    """`ademvl eval emoji`: name emoji and answer multiple choice about them, any folder of images."""

    images: str = option(help="a folder of emoji images named by code points (1f34e.png, 2764-fe0f.png, ...)")
    emojibase: str | None = option(None, "emojibase-data tarball with the names and groups (default: the pinned "
                                         "one, fetched once with npm into $ADEMVL_CACHE/emoji)")
    qtypes: list[str] = option(list(ALL_QUESTIONS), "questions to ask: naming (free text) and the multiple-choice "
                                                    "name, group, subgroup")
    limit: int | None = option(None, "only the first N images (sorted by name)")
    seed: int = option(0, "seed of the options' order and distractors")
    max_new_tokens: int = option(16, "answer length limit")
    blank_images: bool = option(False, "ask without the image (indicator 0): the text-only control")
    mc: str = option("choice", "how a multiple-choice answer is read: choice (the option letter the model scores "
                               "highest right after 'The answer is': one forward, always an answer) or generate "
                               "(the generated text; a reply without a readable letter counts as wrong)")


def choice_by_logits(o: EvalOptions) -> bool:
    """Whether the multiple-choice questions are answered by forced choice (the evaluation loop asks)."""
    if o.mc not in ("choice", "generate"):
        raise ValueError(f"--mc {o.mc}: choose choice or generate")
    return o.mc == "choice"


def key_of(path: Path) -> str:
    """The concept key of a file named by code points ("2764-FE0F.png" -> "2764")."""
    from ..emoji import norm_key

    return norm_key(path.stem)


def eval_samples(o: EvalOptions) -> list[Sample]:
    """One sample per question per known image; files whose name is no emoji concept are skipped
    (with a warning that counts them)."""
    from ..emoji import load_concepts

    bad = set(o.qtypes) - set(ALL_QUESTIONS)
    if bad:
        raise ValueError(f"--qtypes {' '.join(sorted(bad))}: choose among {', '.join(ALL_QUESTIONS)}")
    folder = Path(o.images)
    if not folder.is_dir():
        raise InputNotFound(folder, "no such folder", "give --images a folder of emoji images named by code points")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    concepts = load_concepts(Path(o.emojibase) if o.emojibase else None)
    known = [p for p in files if key_of(p) in concepts]
    if len(known) < len(files):
        warnings.warn(f"{folder}: {len(files) - len(known)} of {len(files)} images are not named by the code points "
                      f"of an emoji concept (skin tones, flags and components are not concepts): skipped", stacklevel=2)
    if not known:
        raise InputError(folder, f"none of its {len(files)} image files is named by an emoji's code points",
                         "name them like 1f34e.png or 2764-fe0f.png (the Twemoji / OpenMoji PNG folders' naming)")
    return samples_for(known[: o.limit], concepts, tuple(o.qtypes), o.seed, o.blank_images)


def samples_for(files: list[Path], concepts: dict[str, Concept], qtypes: tuple[str, ...] = ALL_QUESTIONS, seed: int = 0,
                blank: bool = False) -> list[Sample]:
    """The questions about each image file (named by its concept's code points), as samples."""
    samples = []
    for p in files:
        c = concepts[key_of(p)]
        for q in questions(c, concepts, f"{seed}/{p.name}", qtypes):
            samples.append(Sample(f"{p.name}:{q['qtype']}", None if blank else str(p), [(prompt_of(q["question"]), q["answer"])],
                                  meta={"file": p.name, "key": c.key, "qtype": q["qtype"], "truth": q["truth"],
                                        "choices": q.get("choices")}))
    return samples


def generation(o: EvalOptions) -> dict[str, Any]:
    return {"max_new_tokens": o.max_new_tokens}


def read_letter(text: str, choices: list[str]) -> int:
    """The option index of an answer: "The answer is B." (or the option's text itself); -1 = unreadable."""
    m = ANSWER_RE.search(text)
    if m:
        return "ABCD".index(m.group(1))
    t = clean_name(text)
    return next((i for i, ch in enumerate(choices) if clean_name(ch) == t), -1)


def clean_name(text: str) -> str:
    """Lower case, outer spaces and a final full stop dropped: what exact match compares."""
    return " ".join(text.strip().lower().rstrip(".").split())


def predict(samples: list[Sample], texts: list[str], o: EvalOptions) -> dict[str, Any]:
    """preds.json: one row per question with the model's text, what was read from it and the truth."""
    rows = []
    for s, t in zip(samples, texts):
        m = s.meta
        read = clean_name(t) if m["qtype"] == "naming" else read_letter(t, m["choices"])
        rows.append({"file": m["file"], "key": m["key"], "qtype": m["qtype"], "output": t.strip(), "answer": read,
                     "truth": m["truth"], **({"choices": m["choices"]} if m["choices"] else {})})
    return {"preds.json": rows}


def token_f1(pred: str, truth: str) -> float:
    """SQuAD's token F1 of two names (bags of lower-case words)."""
    p, t = clean_name(pred).split(), clean_name(truth).split()
    common = sum((Counter(p) & Counter(t)).values())
    if not p or not t or not common:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def scores_of(rows: list[dict[str, Any]], caption_metrics: bool = True) -> dict[str, Any]:
    """Percentages: naming exact match, token F1, BLEU-4 and CIDEr (x100, the COCO scorer's); each
    multiple-choice type's accuracy and how many answers were unreadable."""
    out: dict[str, Any] = {}
    naming = [r for r in rows if r["qtype"] == "naming"]
    if naming:
        out["naming_exact"] = 100 * sum(r["answer"] == clean_name(r["truth"]) for r in naming) / len(naming)
        out["naming_token_f1"] = 100 * sum(token_f1(r["answer"], r["truth"]) for r in naming) / len(naming)
        out["naming_n"] = len(naming)
        if caption_metrics:
            from ..metrics.captions import caption_scores

            refs = {i: [r["truth"]] for i, r in enumerate(naming)}
            hyps = {i: r["answer"] or "<empty>" for i, r in enumerate(naming)}
            for k, v in caption_scores(refs, hyps, ("Bleu_4", "CIDEr")).items():
                out[f"naming_{k.lower()}"] = 100 * v
    for q in QTYPES:
        qs = [r for r in rows if r["qtype"] == q]
        if qs:
            out[f"mc_{q}"] = 100 * sum(r["answer"] == r["truth"] for r in qs) / len(qs)
            out[f"mc_{q}_unreadable"] = sum(r["answer"] == -1 for r in qs)
            out[f"mc_{q}_n"] = len(qs)
    return out


def score_outputs(outputs: dict[str, Any], o: EvalOptions) -> dict[str, Any]:
    return scores_of(outputs["preds.json"])


def summary(outputs: dict[str, Any], samples: list[Sample], o: EvalOptions) -> str:
    return f"{len({s.meta['file'] for s in samples})} images, {len(samples)} questions"


@dataclass
class ScoreOptions:
    """`ademvl score emoji`: the scores of a preds.json that `ademvl eval emoji` wrote."""

    preds: str = option(help="preds.json of `ademvl eval emoji`")


def score_files(o: ScoreOptions) -> dict[str, Any]:
    rows = read_json(o.preds, "preds.json of `ademvl eval emoji` ([{qtype, answer, truth, ...}])", form=list)
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not {"qtype", "answer", "truth"} <= set(r):
            raise InputError(o.preds, f"row {i} is {str(r)[:80]}; expected {{qtype, answer, truth, ...}}")
    return scores_of(rows)


def format_scores(scores: dict[str, Any], name: str = "") -> str:
    """One line per measure, in percent."""
    lines = [f"emoji {name}".strip()]
    for k, v in scores.items():
        if not k.endswith(("_n", "_unreadable")):
            lines.append(f"  {k:<20} {v:6.1f}")
    return "\n".join(lines)
