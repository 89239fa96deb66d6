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

import json
from pathlib import Path
from typing import Any

from ..data import Sample

IMAGE_MARK = "<image>"


def prompt_of(text: str) -> str:
    return f"Instruction: {text.strip()}\nResponse:"


def _turns(rec: dict[str, Any], where: str) -> list[tuple[str, str]]:
    conv = [c for c in rec.get("conversations", []) if c.get("from") != "system"]
    if not conv or len(conv) % 2:
        raise ValueError(f"{where}: {len(conv)} turns; a conversation alternates human and gpt turns, ending with gpt")
    turns = []
    for k in range(0, len(conv), 2):
        h, g = conv[k], conv[k + 1]
        if h.get("from") != "human" or g.get("from") != "gpt":
            raise ValueError(f"{where}: turns {k}, {k + 1} are {h.get('from')!r}, {g.get('from')!r}; expected human, gpt")
        text = h["value"].replace(IMAGE_MARK, "").strip()
        turns.append((prompt_of(text), g["value"].strip()))
    return turns


def _check(image: Path, where: str, check: bool) -> None:
    if check and not image.exists():
        raise FileNotFoundError(f"{where}: image {image} not found; check image_root")


def load_samples(path: str, image_root: str | None = None, split: str = "train", limit: int | None = None,
                 check_images: bool = True) -> list[Sample]:
    """Samples of a LLaVA conversation file or the released all_data.json (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: instruction data not found")
    data = json.loads(path.read_text())
    root = Path(image_root) if image_root else path.parent
    samples = []
    if isinstance(data, dict):  # all_data.json: {split: [{qid, instruction, answer, image, image_source}]}
        if split not in data:
            raise ValueError(f"{path}: no split {split!r}; it has {', '.join(data)}")
        for i, rec in enumerate(data[split][:limit]):
            where = f"{path.name}[{split}][{i}]"
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
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a LLaVA list of conversations or all_data.json ({{split: [...]}})")
    for i, rec in enumerate(data[:limit]):
        where = f"{path.name}[{i}] (id {rec.get('id', '?')})"
        image = None
        if rec.get("image"):
            image = root / rec["image"]
            _check(image, where, check_images)
        samples.append(Sample(id=str(rec.get("id", i)), image=str(image) if image else None,
                              turns=_turns(rec, where), meta={}))
    return samples
