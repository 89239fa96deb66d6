"""Instruction following: LLaVA conversations and the released code's all_data.json.

    LLaVA    path = a JSON list  [{id, image?, conversations: [{from: human|gpt, value}, ...]}]
             image relative to image_root; "<image>" marks the image in the first human turn
             (it is removed from the text: the image enters through the [cls] token and the fusion)
    ADEM/LaVIN  path = all_data.json  {split: [{qid, instruction, answer, image, image_source}]}
             image_source "sqa": image_root/images/train/{qid}/image.png; otherwise
             image_root/cocoimages/train/COCO_train2014_{image} (the released code's layout)

Options of `load_samples` (YAML keys under `data:` besides `task: instruct`):

    path         the JSON file
    image_root   where images are (default: the JSON file's directory)
    split        the key of all_data.json to read (ignored for a LLaVA list)
    limit        keep the first N records
    check_images stop at a missing image file (default true)

Each human turn becomes "Instruction: {text}\\nResponse:" (the prompt of the released MME eval),
each gpt turn its target; the loss covers the gpt turns only. A record must alternate human, gpt
(a leading system turn is dropped); otherwise it stops with a message naming the record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import Sample
from ..files import InputError, InputNotFound, read_json

IMAGE_MARK = "<image>"


def prompt_of(text: str) -> str:
    return f"Instruction: {text.strip()}\nResponse:"


def _turns(rec: dict[str, Any], where: str) -> list[tuple[str, str]]:
    conv = rec.get("conversations", [])
    if not isinstance(conv, list) or not all(isinstance(c, dict) and isinstance(c.get("value"), str) for c in conv):
        raise InputError(where, "conversations must be a list of {from: human|gpt, value: text}")
    conv = [c for c in conv if c.get("from") != "system"]
    if not conv or len(conv) % 2:
        raise InputError(where, f"{len(conv)} turns; a conversation alternates human and gpt turns, ending with gpt")
    turns = []
    for k in range(0, len(conv), 2):
        h, g = conv[k], conv[k + 1]
        if h.get("from") != "human" or g.get("from") != "gpt":
            raise InputError(where, f"turns {k}, {k + 1} are {h.get('from')!r}, {g.get('from')!r}; expected human, gpt")
        text = h["value"].replace(IMAGE_MARK, "").strip()
        turns.append((prompt_of(text), g["value"].strip()))
    return turns


def _check(image: Path, where: str, check: bool) -> None:
    if check and not image.exists():
        raise InputNotFound(where, f"image {image} not found", "check image_root")


def load_samples(path: str, image_root: str | None = None, split: str = "train", limit: int | None = None,
                 check_images: bool = True) -> list[Sample]:
    """Samples of a LLaVA conversation file or the released all_data.json (see the module docstring)."""
    path = Path(path)
    data = read_json(path, "instruction data: a LLaVA list of conversations or all_data.json ({split: [...]})",
                     form=(dict, list))
    root = Path(image_root) if image_root else path.parent
    samples = []
    if isinstance(data, dict):  # all_data.json: {split: [{qid, instruction, answer, image, image_source}]}
        if split not in data or not isinstance(data[split], list):
            raise InputError(path, f"no split {split!r} (a list of records); it has {', '.join(data)}")
        for i, rec in enumerate(data[split][:limit]):
            where = f"{path.name}[{split}][{i}]"
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("instruction", "answer")):
                raise InputError(where, f"expected {{qid, instruction: text, answer: text, image, image_source}}, got {str(rec)[:80]}")
            image = None
            if rec.get("image"):
                if rec.get("image_source") == "sqa":
                    image = root / "images" / "train" / str(rec["qid"]) / "image.png"
                else:
                    image = root / "cocoimages" / "train" / f"COCO_train2014_{rec['image']}"
                _check(image, where, check_images)
            samples.append(Sample(id=str(rec.get("qid", i)), image=str(image) if image else None,
                                  turns=[(rec["instruction"], rec["answer"])], meta={"source": rec.get("image_source")}))
        return samples
    for i, rec in enumerate(data[:limit]):
        if not isinstance(rec, dict):
            raise InputError(f"{path.name}[{i}]", f"expected {{id, image, conversations}}, got {str(rec)[:80]}")
        where = f"{path.name}[{i}] (id {rec.get('id', '?')})"
        image = None
        if rec.get("image") and not isinstance(rec["image"], str):
            raise InputError(where, f"image {rec['image']!r}; expected a path relative to image_root")
        if rec.get("image"):
            image = root / rec["image"]
            _check(image, where, check_images)
        samples.append(Sample(id=str(rec.get("id", i)), image=str(image) if image else None,
                              turns=_turns(rec, where), meta={}))
    return samples
