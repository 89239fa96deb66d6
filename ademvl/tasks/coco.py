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

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import Sample
from . import option
from ..files import InputError, InputNotFound, read_json
from ..metrics.captions import KEYS, caption_scores

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
        raise InputError(where, f"cannot tell the COCO image id of {entry['image']!r} (no image_id, no number "
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
        raise InputNotFound(path, "Karpathy annotation file not found", f"get coco_karpathy_{split}.json "
                                  "(BLIP/LAVIS release) into ann_root, or pass ann_file")
    return path


def gt_file(root: str | Path, split: str, ann_root: str | None = None) -> Path:
    """ann_root/coco_karpathy_{split}_gt.json (the scorer's ground truth)."""
    return Path(ann_root or root) / f"coco_karpathy_{split}_gt.json"


def load_samples(root: str, split: str = "train", ann_file: str | None = None, ann_root: str | None = None,
                 max_words: int = 30, limit: int | None = None, check_images: bool = True) -> list[Sample]:
    """Training: one sample per (image, caption). Val/test: one sample per image, the first caption
    as target and all of them in meta["captions"]."""
    path = annotation_file(root, split, ann_file, ann_root)
    entries = read_json(path, "a Karpathy split file [{image, caption}, ...]", form=list)
    if limit is not None:
        entries = entries[:limit]
    samples = []
    for i, e in enumerate(entries):
        where = f"{path.name}[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) or "caption" not in e:
            raise InputError(where, f"expected {{image: path, caption}}, got {str(e)[:80]}")
        image = Path(root) / e["image"]
        if check_images and not image.exists():
            raise InputNotFound(where, f"image {image} not found", "is root the COCO images root "
                                       f"(the one holding {Path(e['image']).parts[0]}/)?")
        captions = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
        if not captions or not all(isinstance(c, str) for c in captions):
            raise InputError(where, f"caption {e['caption']!r}; expected a text or a list of texts")
        image_id = image_id_of(e, where)
        target = pre_caption(captions[0], max_words)
        samples.append(Sample(id=f"{image_id}" if isinstance(e["caption"], list) else f"{image_id}-{i}",
                              image=str(image), turns=[(PROMPT, target)],
                              meta={"image_id": image_id, "captions": captions}))
    return samples


# ---- evaluation (the task interface: ademvl/tasks/__init__.py) --------------------------------
@dataclass
class EvalOptions:
    """`ademvl eval coco`: caption every image of the split; score when the ground truth is there."""

    data_root: str = option(help="COCO images root (the Karpathy files' image paths are relative to it)")
    split: str = option("test", "val | test")
    ann_root: str | None = option(None, "directory of coco_karpathy_*.json (default: data_root)")
    ann_file: str | None = option(None, "an annotation file to read instead")
    gt: str | None = option(None, "ground truth (default: ANN_ROOT/coco_karpathy_{split}_gt.json)")
    num_beams: int = option(1, "1 = greedy")
    max_new_tokens: int = option(20, "caption length limit (the released eval: 20)")
    limit: int | None = option(None, "only the first N images (quick checks; not comparable)")
    metrics: list[str] | None = option(None, "only these metrics (default: BLEU-1..4, METEOR, ROUGE-L, CIDEr)")
    protocol: str = option("ademvl", "ademvl (ours) | released: the authors' input layout and eval script, for "
                                     "imported checkpoints (docs/released.md)")


def eval_samples(o: EvalOptions) -> list[Sample]:
    """One sample per image; the prompt is "a picture of" in both protocols."""
    if o.protocol == "released" and o.split != "val":
        warnings.warn(f"the released eval_caption.py scores the Karpathy val split; this is {o.split}", stacklevel=2)
    return load_samples(o.data_root, o.split, ann_file=o.ann_file, ann_root=o.ann_root, limit=o.limit)


def generation(o: EvalOptions) -> dict[str, Any]:
    if o.protocol == "released":
        from ..released_protocol import COCO_NEW_TOKENS

        return {"max_new_tokens": COCO_NEW_TOKENS}  # greedy
    return {"num_beams": o.num_beams, "max_new_tokens": o.max_new_tokens}


def clean_caption(text: str) -> str:
    """The caption after the prompt (the released eval keeps what follows "picture of")."""
    text = text.strip()
    head = "picture of"
    return text.split(head, 1)[1].strip() if head in text else text


def predict(samples: list[Sample], texts: list[str], o: EvalOptions) -> dict[str, Any]:
    """preds.json in the COCO results format [{image_id, caption}]."""
    from ..released_protocol import read_caption

    read = read_caption if o.protocol == "released" else clean_caption
    return {"preds.json": [{"image_id": s.meta["image_id"], "caption": read(t)} for s, t in zip(samples, texts)]}


def score_outputs(outputs: dict[str, Any], o: EvalOptions) -> dict[str, float] | None:
    gt = Path(o.gt) if o.gt else gt_file(o.data_root, o.split, o.ann_root)
    if not gt.exists():
        warnings.warn(f"{gt}: no ground truth, captions written but not scored (pass --gt)", stacklevel=2)
        return None
    return score_coco(gt, outputs["preds.json"], tuple(o.metrics or KEYS))


def summary(outputs: dict[str, Any], samples: list[Sample], o: EvalOptions) -> str:
    return f"{len(outputs['preds.json'])} captions"


@dataclass
class ScoreOptions:
    """`ademvl score coco`: caption metrics of predictions made elsewhere (pycocoevalcap; needs Java)."""

    gt: str = option(help="COCO-format ground truth, e.g. coco_karpathy_test_gt.json")
    preds: str = option(help="predictions in the COCO results format [{image_id, caption}]")


def score_files(o: ScoreOptions) -> dict[str, float]:
    return score_coco(o.gt, o.preds)


def score_coco(gt_file: str | Path, preds: str | Path | list[dict[str, Any]], metrics: tuple[str, ...] = KEYS) -> dict[str, float]:
    """pycocoevalcap's scores of predictions in the COCO results format ([{image_id, caption}]).

    Scores the predicted images (as COCOEvalCap does with params['image_id'] set to the result's
    images), each against all its ground-truth captions; warns when they are fewer than the
    ground truth's images.
    """
    gt = read_json(gt_file, "COCO-format ground truth ({images, annotations: [{image_id, caption}]})", form=dict)
    if not isinstance(gt.get("annotations"), list):
        raise InputError(gt_file, "no 'annotations' list; expected COCO-format ground truth "
                                  "(e.g. coco_karpathy_test_gt.json)")
    results = preds if isinstance(preds, list) else read_json(
        preds, "predictions in the COCO results format [{image_id, caption}]", form=list)
    where = "predictions" if isinstance(preds, list) else str(preds)
    refs: dict[Any, list[str]] = {}
    for i, a in enumerate(gt["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise InputError(gt_file, f"annotations[{i}] is {str(a)[:80]}; expected {{image_id, caption: text}}")
        refs.setdefault(a["image_id"], []).append(a["caption"])
    hyps: dict[Any, str] = {}
    for i, r in enumerate(results):
        if not isinstance(r, dict) or "image_id" not in r or not isinstance(r.get("caption"), str):
            raise InputError(where, f"prediction {i}: {str(r)[:80]} is not {{image_id, caption: text}} (the COCO results format)")
        if r["image_id"] not in refs:
            raise InputError(where, f"prediction {i}: image_id {r['image_id']!r} is not in {gt_file}",
                             "score against the ground truth of the split the captions were made for")
        if r["image_id"] in hyps:
            raise InputError(where, f"prediction {i}: a second caption for image_id {r['image_id']!r}; give one per image")
        hyps[r["image_id"]] = r["caption"]
    if not hyps:
        raise InputError(where, "nothing to score: no predictions")
    if len(hyps) < len(refs):
        warnings.warn(f"scoring {len(hyps)} predicted images of the {len(refs)} in {gt_file}: "
                      f"not comparable with published numbers", stacklevel=2)
    return caption_scores(refs, hyps, metrics)


def format_scores(scores: dict[str, float], name: str = "") -> str:
    """In percent, as papers print them (B@4 38.5, CIDEr 133.2)."""
    head = "".join(f"{k:>9}" for k in scores)
    row = "".join(f"{100 * v:>9.2f}" for v in scores.values())
    return head + "\n" + row
