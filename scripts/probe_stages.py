"""Which MobileNetV2 stage should ADEM-VL read for the demo? How prominent each answer is, per block.

A pretrained CNN's last stage is built to tell ImageNet classes apart, not colours: a linear
probe still reads colour from it (NOTES.md), but colour is a small part of its variance, and a
fusion trained for a few hundred steps from random projections picks up the large parts first.
This measures, for the output map of every block of the embedded MobileNetV2 (the demo's images,
--n train problems per question type, 224 px), the share of the [cls] feature's variance (the
map's global average; for left/right, the means of the left and right halves) that the answer
explains: between-class variance / total variance, over all channels.

    python scripts/probe_stages.py [--data runs/demo/data] [--n 120]

Prints a markdown table; docs/demo.md quotes it (why the demo reads block 6, vision_layer -12).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from ademvl import hub
from ademvl.tasks import shapes
from ademvl.vision import make_tower

QTYPES = ("color", "shape", "count", "position")


def explained(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Between-class variance / total variance, summed over channels: (n, C), (n,) -> [0, 1]."""
    mu = features.mean(0)
    total = ((features - mu) ** 2).sum()
    between = sum(((features[labels == c].mean(0) - mu) ** 2).sum() * (labels == c).sum() for c in labels.unique())
    return float(between / total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("runs/demo/data"))
    ap.add_argument("--n", type=int, default=120, help="train problems per question type")
    ap.add_argument("--vision", default=hub.EMBEDDED_CNN)
    args = ap.parse_args()
    if not (args.data / "problems.json").exists():
        shapes.write_dataset(args.data, 4000, 0)
    problems = json.loads((args.data / "problems.json").read_text())
    chosen: dict[str, list[tuple[str, dict]]] = {q: [] for q in QTYPES}
    for pid, p in problems.items():
        if p["split"] == "train" and p["qtype"] in chosen and len(chosen[p["qtype"]]) < args.n:
            chosen[p["qtype"]].append((pid, p))

    from ademvl.config import AdemVLConfig

    tower = make_tower(hub.load_vision(args.vision).eval())
    pre = tower.preprocess(AdemVLConfig())
    x = {q: torch.stack([pre(Image.open(args.data / "images" / "train" / pid / p["image"])) for pid, p in v])
         for q, v in chosen.items()}
    y = {q: torch.tensor([p["answer"] for _, p in v]) for q, v in chosen.items()}
    print("| block | vision_layer | width | grid | " + " | ".join(QTYPES) + " |")
    print("|---:|---:|---:|---|" + "---:|" * len(QTYPES))
    n_blocks = len(tower.blocks())
    with torch.no_grad():
        for i, block in enumerate(tower.blocks()):
            x = {q: block(a) for q, a in x.items()}  # (n, C, H, W)
            cells = []
            for q in QTYPES:
                a = x[q]
                if q == "position":
                    half = a.shape[3] // 2
                    cls = torch.cat([a[..., :half].mean(dim=(2, 3)), a[..., -half:].mean(dim=(2, 3))], 1)
                else:
                    cls = a.mean(dim=(2, 3))
                cells.append(f"{100 * explained(cls, y[q]):.1f}")
            a = x[QTYPES[0]]
            print(f"| {i} | {i - n_blocks} | {a.shape[1]} | {a.shape[2]}x{a.shape[3]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
