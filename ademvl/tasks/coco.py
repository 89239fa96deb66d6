"""COCO captions, Karpathy split, in the files BLIP/LAVIS distribute (and the released code reads).

    ann_root/coco_karpathy_train.json      [{image, caption, image_id}, ...]  one caption per entry
    ann_root/coco_karpathy_val.json        [{image, caption: [..5 captions..]}, ...]
    ann_root/coco_karpathy_test.json       same
    ann_root/coco_karpathy_{val,test}_gt.json   COCO-format ground truth for the scorer
    root/{image}                            e.g. root/val2014/COCO_val2014_000000391895.jpg

Options of `load_samples` (YAML keys under `data:` besides `task: coco`):

    root       the images root (the `image` paths of the annotations are relative to it)
    split      train | val | test (picks ann_root/coco_karpathy_{split}.json)
    ann_file   an annotation file to read instead of ann_root/coco_karpathy_{split}.json
    ann_root   the directory of the Karpathy files (default: root)
    max_words  captions are cut to this many words (released code: 30 for training)
    limit      keep the first N entries

Training prompt "a picture of " as in the released code: the prompt is "a picture of" and the
caption is the target (the processor joins them at a token boundary, which stands for the space).
Training captions are normalised as BLIP's pre_caption does (lower case, punctuation dropped).
Validation/test samples carry all reference captions in meta["captions"] and the COCO image id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..data import Sample

PROMPT = "a picture of"
SPLITS = ("train", "val", "test")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's caption normalisation (as in the released code's coco_karpathy_dataset)."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def image_id_of(entry: dict[str, Any], where: str) -> int:
    """The COCO image id: the entry's image_id, else the number that ends the file name."""
    if "image_id" in entry and str(entry["image_id"]).isdigit():
        return int(entry["image_id"])
    m = re.search(r"(\d+)\.\w+$", entry["image"])
    if not m:
        raise ValueError(f"{where}: cannot tell the COCO image id of {entry['image']!r} (no image_id, no number "
                         f"at the end of the file name)")
    return int(m.group(1))


def annotation_file(root: str | Path, split: str, ann_file: str | None = None, ann_root: str | None = None) -> Path:
    if ann_file:
        path = Path(ann_file)
    else:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)} (or give ann_file)")
        path = Path(ann_root or root) / f"coco_karpathy_{split}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: Karpathy annotation file not found; get coco_karpathy_{split}.json "
                                f"(BLIP/LAVIS release) into ann_root, or pass ann_file")
    return path


def gt_file(root: str | Path, split: str, ann_root: str | None = None) -> Path:
    """ann_root/coco_karpathy_{split}_gt.json (the scorer's ground truth)."""
    return Path(ann_root or root) / f"coco_karpathy_{split}_gt.json"


def load_samples(root: str, split: str = "train", ann_file: str | None = None, ann_root: str | None = None,
                 max_words: int = 30, limit: int | None = None, check_images: bool = True) -> list[Sample]:
    """Training: one sample per (image, caption). Val/test: one sample per image, the first caption
    as target and all of them in meta["captions"]."""
    path = annotation_file(root, split, ann_file, ann_root)
    entries = json.loads(path.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of {{image, caption}} entries (Karpathy split file)")
    if limit is not None:
        entries = entries[:limit]
    samples = []
    for i, e in enumerate(entries):
        where = f"{path.name}[{i}]"
        if not isinstance(e, dict) or "image" not in e or "caption" not in e:
            raise ValueError(f"{where}: expected {{image, caption}}, got {str(e)[:80]}")
        image = Path(root) / e["image"]
        if check_images and not image.exists():
            raise FileNotFoundError(f"{where}: image {image} not found; is root the COCO images root "
                                    f"(the one holding {Path(e['image']).parts[0]}/)?")
        captions = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        if not captions:
            raise ValueError(f"{where}: no caption")
        image_id = image_id_of(e, where)
        target = pre_caption(captions[0], max_words)
        samples.append(Sample(id=f"{image_id}" if isinstance(e["caption"], list) else f"{image_id}-{i}",
                              image=str(image), turns=[(PROMPT, target)],
                              meta={"image_id": image_id, "captions": captions}))
    return samples
