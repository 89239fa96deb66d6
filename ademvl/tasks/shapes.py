"""Synthetic ScienceQA: coloured shapes in ScienceQA's released layout (`ademvl data synth-shapes`).

The demo needs a task that a 2-core CPU can learn in minutes, scored by the *real* ScienceQA
loader, prompts and scorer. So this writes exactly what ScienceQA releases:

    OUT/problems.json                 {pid: {question, choices, answer, hint, image, subject, grade, ...}}
    OUT/pid_splits.json               {"train": [...], "val": [...], "test": [...]}
    OUT/images/{split}/{pid}/image.png

Images are 224x224, white, with filled circles/squares/triangles in five CSS named colours, each
20-35% of the image side, never overlapping. Question types (stored per problem as `qtype`):

    color     "What color is the shape?"                 red, green, blue, yellow, purple
    shape     "Which shape is in the image?"             circle, square, triangle
    count     "How many shapes are in the image?"        1, 2, 3, 4
    position  "Is the shape on the left or the right?"   left, right
    text      no image; the answer is stated in the text (the no-image path: "Image: N/A")

Options are always listed in that fixed order: the embedded 135M LLM picks letters at chance
even when the text states the answer (NOTES.md), so shuffled lists would measure its reading of
option lists rather than the visual fusion. `--shuffle-choices` makes that harder variant.

ScienceQA's breakdown columns are all defined: subjects (natural: color/shape, social:
count/position, language: text), context (TXT: text problems with a hint; IMG: image problems;
NO: text problems stating the fact in the question itself, with no hint), grades 1-12.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageColor, ImageDraw
from tqdm import tqdm

IMAGE_SIZE = 224
MIN_FRAC, MAX_FRAC = 0.20, 0.35  # side of a shape's bounding box, as a fraction of the image side
GAP = 4  # pixels kept free between the bounding boxes of two shapes
COLORS = ("red", "green", "blue", "yellow", "purple")
RGB = {c: ImageColor.getrgb(c) for c in COLORS}  # CSS named values: green is (0, 128, 0), purple (128, 0, 128)
SHAPES = ("circle", "square", "triangle")
COUNTS = ("1", "2", "3", "4")
SIDES = ("left", "right")

TEMPLATES = {
    "color": ("What color is the shape?", COLORS),
    "shape": ("Which shape is in the image?", SHAPES),
    "count": ("How many shapes are in the image?", COUNTS),
    "position": ("Is the shape on the left or the right?", SIDES),
}
IMAGE_QTYPES = tuple(TEMPLATES)
QTYPES = IMAGE_QTYPES + ("text",)
# Share of each question type among all problems (text = the no-image path).
MIX = {"color": 0.2, "shape": 0.2, "count": 0.2, "position": 0.2, "text": 0.2}
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}

SUBJECT = {"color": "natural science", "shape": "natural science", "count": "social science",
           "position": "social science", "text": "language science"}
TOPIC = {"color": "physics", "shape": "geometry", "count": "arithmetic", "position": "geography",
         "text": "reading-comprehension"}
OBJECTS = ("kite", "ball", "car", "hat", "cup", "book", "bird", "boat", "chair", "flower")
# Text problems: the fact is in the hint (TXT context) or in the question itself (NO context).
TEXT_TEMPLATES = {
    "color": ("The {obj} is {ans}.", "What color is the {obj}?", COLORS),
    "shape": ("The {obj} is shaped like a {ans}.", "Which shape is the {obj}?", SHAPES),
}


# ---- drawing --------------------------------------------------------------------------------
def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, box: tuple[int, int, int, int]) -> None:
    """Fill `shape` inside the square box (x0, y0, x1, y1), edges inclusive, without anti-aliasing
    (so every shape pixel has exactly the named RGB value)."""
    x0, y0, x1, y1 = box
    fill = RGB[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":  # pointing up, base along the bottom of the box
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def place_boxes(rng: random.Random, n: int, side: str | None = None, tries: int = 200) -> list[tuple[int, int, int, int]]:
    """n non-overlapping square boxes, each 20-35% of the image side.

    side="left"/"right": one box whose centre lies in that third of the image.
    """
    lo, hi = round(MIN_FRAC * IMAGE_SIZE + 0.5), int(MAX_FRAC * IMAGE_SIZE)  # 45 .. 78 px
    for _ in range(tries):
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(n):
            for _ in range(tries):
                s = rng.randint(lo, hi)
                if side is None:
                    x0 = rng.randint(0, IMAGE_SIZE - s)
                else:  # centre x0 + s/2 strictly inside the left or right third
                    third = IMAGE_SIZE / 3
                    cmin, cmax = (s / 2, third - 1) if side == "left" else (2 * third + 1, IMAGE_SIZE - s / 2)
                    x0 = rng.randint(int(cmin - s / 2 + 0.999), int(cmax - s / 2))
                y0 = rng.randint(0, IMAGE_SIZE - s)
                box = (x0, y0, x0 + s - 1, y0 + s - 1)
                if all(_apart(box, b) for b in boxes):
                    boxes.append(box)
                    break
            else:
                break  # this layout got stuck: start over
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {n} shapes without overlap")  # never happens for n <= 4


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[2] + GAP < b[0] or b[2] + GAP < a[0] or a[3] + GAP < b[1] or b[3] + GAP < a[1]


def render(objects: list[dict[str, Any]]) -> Image.Image:
    """A white 224x224 RGB image with the given objects ({shape, color, box})."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for o in objects:
        draw_shape(draw, o["shape"], o["color"], tuple(o["box"]))
    return img


# ---- problems -------------------------------------------------------------------------------
def _scene(rng: random.Random, qtype: str, answer: str) -> list[dict[str, Any]]:
    """The objects of an image whose correct answer to `qtype` is `answer`."""
    n = int(answer) if qtype == "count" else 1
    boxes = place_boxes(rng, n, side=answer if qtype == "position" else None)
    objs = [{"shape": rng.choice(SHAPES), "color": rng.choice(COLORS), "box": list(b)} for b in boxes]
    if qtype == "color":
        objs[0]["color"] = answer
    elif qtype == "shape":
        objs[0]["shape"] = answer
    return objs


def _balanced(rng: random.Random, options: tuple[str, ...], n: int) -> list[str]:
    """n answers, each option equally often (up to one), in random order."""
    answers = [options[i % len(options)] for i in range(n)]
    rng.shuffle(answers)
    return answers


def _ordered(rng: random.Random, options: tuple[str, ...], shuffle: bool) -> list[str]:
    choices = list(options)
    if shuffle:
        rng.shuffle(choices)
    return choices


def make_problems(n: int, seed: int = 0, shuffle_choices: bool = False) -> dict[str, dict[str, Any]]:
    """n problems (pid -> ScienceQA record, plus `qtype` and private `objects` for drawing).

    Each split gets its own balanced share of every type and answer, so the test split is balanced
    by itself. Deterministic for (n, seed, shuffle_choices).
    """
    if n < 10:
        raise ValueError(f"--n {n}: need at least 10 problems (train/val/test of every type)")
    rng = random.Random(seed)
    sizes = {s: int(round(f * n)) for s, f in SPLIT_FRACTIONS.items() if s != "train"}
    sizes["train"] = n - sum(sizes.values())
    problems: dict[str, dict[str, Any]] = {}
    pid = 0
    for split in ("train", "val", "test"):
        per_type = {t: int(MIX[t] * sizes[split]) for t in QTYPES}
        per_type["text"] += sizes[split] - sum(per_type.values())
        plan: list[tuple[str, str, str | None]] = []  # (qtype, answer, text sub-template)
        for qtype in IMAGE_QTYPES:
            plan += [(qtype, a, None) for a in _balanced(rng, TEMPLATES[qtype][1], per_type[qtype])]
        n_text = per_type["text"]
        n_color = (n_text + 1) // 2
        plan += [("text", a, "color") for a in _balanced(rng, COLORS, n_color)]
        plan += [("text", a, "shape") for a in _balanced(rng, SHAPES, n_text - n_color)]
        rng.shuffle(plan)
        for i, (qtype, answer, sub) in enumerate(plan):
            key = str(pid)
            pid += 1
            rec: dict[str, Any] = {
                "question": "", "choices": [], "answer": 0, "hint": "", "image": None,
                "task": "closed choice", "grade": f"grade{rng.randint(1, 12)}",
                "subject": SUBJECT[qtype], "topic": TOPIC[qtype], "category": qtype,
                "skill": qtype, "qtype": qtype, "lecture": "", "solution": "", "split": split,
            }
            if qtype == "text":
                fact, question, options = TEXT_TEMPLATES[sub]
                obj = rng.choice(OBJECTS)
                fact = fact.format(obj=obj, ans=answer)
                question = question.format(obj=obj)
                if i % 2 == 0:  # TXT context: the fact is the hint
                    rec["hint"] = fact
                else:  # NO context: the fact is part of the question
                    question = f"{fact} {question}"
                rec["skill"] = f"text-{sub}"
            else:
                question, options = TEMPLATES[qtype]
                rec["image"] = "image.png"
                rec["objects"] = _scene(rng, qtype, answer)
            choices = _ordered(rng, options, shuffle_choices)
            rec.update(question=question, choices=choices, answer=choices.index(answer),
                       solution=f"The answer is {answer}.")
            problems[key] = rec
    return problems


def write_dataset(out: str | Path, n: int, seed: int = 0, shuffle_choices: bool = False) -> Path:
    """Write problems.json, pid_splits.json and the images under `out`. Returns `out`."""
    out = Path(out)
    problems = make_problems(n, seed, shuffle_choices)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for pid, rec in tqdm(problems.items(), desc="synth-shapes", unit="problem", mininterval=1.0):
        splits[rec["split"]].append(pid)
        objects = rec.pop("objects", None)
        if objects is not None:
            d = out / "images" / rec["split"] / pid
            d.mkdir(parents=True, exist_ok=True)
            render(objects).save(d / "image.png")
            rec["objects"] = objects  # kept in problems.json: lets tests and figures check the image
    out.mkdir(parents=True, exist_ok=True)
    (out / "problems.json").write_text(json.dumps(problems, indent=1) + "\n")
    (out / "pid_splits.json").write_text(json.dumps(splits) + "\n")
    return out


# ---- CLI ------------------------------------------------------------------------------------


def per_type(problems: dict[str, dict[str, Any]], preds: dict[str, int], pids: list[str]) -> dict[str, float]:
    """Accuracy (%) per question type (`qtype`; "all" for problems without one, as ScienceQA's own),
    and over the image questions (None when there are none of the shapes kinds)."""
    right: dict[str, list[bool]] = {}
    for pid in pids:
        right.setdefault(problems[pid].get("qtype", "all"), []).append(preds.get(pid, -1) == problems[pid]["answer"])
    acc = {q: round(100 * sum(v) / len(v), 2) for q, v in sorted(right.items())}
    image = [x for q, v in right.items() if q in IMAGE_QTYPES for x in v]
    acc["image_questions"] = round(100 * sum(image) / len(image), 2) if image else None
    return acc
