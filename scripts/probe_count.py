"""Is count in the demo tower's features, and can a sum over the grid read it? (docs/demo.md)

ADEM-VL's fusion adds, at every position of the LLM, sum_n A[t, n] V[n]: a sum over the visual
tokens of per-token features (no softmax). Count is the demo's weakest type, and its errors are
off by one (2 read as 3), the mistake of a model that reads the *area* covered by shapes. This
asks whether the frozen MobileNetV2's grid holds the count at all, with two probes on the count
problems (train split: fit; val + test: score), features per channel standardised:

    mean   a linear classifier on the grid's global average (what the [cls] token carries)
    bag    a per-position MLP (C -> 32 -> 16), summed over the grid, then linear: the shape of
           the fusion's sum over visual tokens

    python scripts/probe_count.py [--data runs/demo/data] [--blocks 6,7,12,13,16]

Images get the tower's own preprocessing (224 px, ImageNet mean/std), as in the demo. Prints one
line per block. Full-batch Adam, 300 epochs, seed 0 (a few minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from ademvl import hub
from ademvl.config import AdemVLConfig
from ademvl.tasks import shapes
from ademvl.vision import make_tower


def block_outputs(tower, images: Tensor, wanted: list[int]) -> dict[int, Tensor]:
    """The output maps (n, C, H, W) of the wanted blocks."""
    out, x = {}, images
    with torch.no_grad():
        for i, block in enumerate(tower.blocks()):
            x = block(x)
            if i in wanted:
                out[i] = x.clone()
            if i >= max(wanted):
                break
    return out


def fit(train: Tensor, y_train: Tensor, test: Tensor, y_test: Tensor, bag: bool, epochs: int = 300) -> tuple[float, float]:
    """(test accuracy, train accuracy) in % of one probe on (n, C, H, W) maps."""
    torch.manual_seed(0)
    c = train.shape[1]
    mu, sd = train.mean((0, 2, 3), keepdim=True), train.std((0, 2, 3), keepdim=True) + 1e-5
    tokens = lambda a: ((a - mu) / sd).flatten(2).transpose(1, 2)  # (n, H*W, C)
    x_train, x_test = tokens(train), tokens(test)
    n_classes = len(shapes.COUNTS)
    if bag:
        mlp, head = nn.Sequential(nn.Linear(c, 32), nn.GELU(), nn.Linear(32, 16)), nn.Linear(16, n_classes)
        forward = lambda x: head(mlp(x).sum(1) / 20)
        params = [*mlp.parameters(), *head.parameters()]
    else:
        head = nn.Linear(c, n_classes)
        forward = lambda x: head(x.mean(1))
        params = list(head.parameters())
    opt = torch.optim.Adam(params, 3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(forward(x_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = lambda x, y: 100 * (forward(x).argmax(1) == y).float().mean().item()
        return acc(x_test, y_test), acc(x_train, y_train)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("runs/demo/data"))
    ap.add_argument("--blocks", default="6,7,12,13,16", help="MobileNetV2 blocks (0 = stem; the demo reads 6)")
    args = ap.parse_args()
    if not (args.data / "problems.json").exists():
        shapes.write_dataset(args.data, 4000, 0)
    problems = json.loads((args.data / "problems.json").read_text())
    wanted = [int(b) for b in args.blocks.split(",")]
    tower = make_tower(hub.load_vision(hub.EMBEDDED_CNN).eval())
    pre = tower.preprocess(AdemVLConfig())  # what the demo feeds the tower
    maps, labels = {}, {}
    for split in ("train", "val", "test"):
        chosen = [(pid, p) for pid, p in problems.items() if p["qtype"] == "count" and p["split"] == split]
        images = torch.stack([pre(Image.open(args.data / "images" / split / pid / p["image"])) for pid, p in chosen])
        maps[split], labels[split] = block_outputs(tower, images, wanted), torch.tensor([p["answer"] for _, p in chosen])
    y_test = torch.cat([labels["val"], labels["test"]])
    for b in wanted:
        train, test = maps["train"][b], torch.cat([maps["val"][b], maps["test"][b]])
        mean, bag = fit(train, labels["train"], test, y_test, False), fit(train, labels["train"], test, y_test, True)
        print(f"block {b} ({train.shape[1]} wide, {train.shape[2]}x{train.shape[3]} grid at {pre.size} px): "
              f"mean probe {mean[0]:.1f}% (train {mean[1]:.0f}%), bag probe {bag[0]:.1f}% (train {bag[1]:.0f}%)")


if __name__ == "__main__":
    main()
