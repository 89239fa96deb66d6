"""How much of each demo question can be read from the demo's random vision tower at all?

`ademvl demo` trains ADEM-VL to answer questions about coloured shapes through a randomly
initialised CLIP tower. This script asks the question apart from the LLM: it trains classifiers
directly on the answer, from the same features the fusion reads (vision layer -2, final
LayerNorm), with the demo's training images, and scores them on its val + test images.

- linear [cls] / linear mean: a linear probe on the [cls] token / on the mean of the patch tokens;
- bag MLP: a per-token MLP (width 128, SiLU) with a learned position table over the 320 visual
  tokens at scales (256, 64), logits averaged over tokens: a stronger form of what one fusion
  layer can compute (a weighted sum over the visual tokens, no interaction between them);
- bag MLP, pixels: the same on the raw 14x14 patches instead of the tower's tokens.

    python scripts/probe_tower.py [--data runs/demo/data] [--n 4000]   # generates the data if missing

Prints how uniform the tower's attention is, then a markdown table (accuracy, %). docs/demo.md
quotes both, for the demo's data and for five times as much (--data runs/probe-20k --n 20000).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ademvl import hub
from ademvl.config import AdemVLConfig
from ademvl.tasks import shapes
from ademvl.vision import image_to_tensor, multiscale, tower_features, truncate_tower


def linear_probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, steps: int = 300) -> torch.Tensor:
    """Standardised features, full-batch Adam on a weight matrix with a small L2 penalty."""
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-5)
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(x[train] @ w, y[train]) + 1e-3 * w.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (x @ w).argmax(1).detach()


def bag_probe(tokens: torch.Tensor, y: torch.Tensor, train: torch.Tensor, steps: int = 1000) -> torch.Tensor:
    """Per-token MLP + position table, logits averaged over the tokens; Adam, batch 32."""
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(tokens.shape[-1], 128), torch.nn.Linear(128, int(y.max()) + 1)
    pos = torch.nn.Parameter(torch.zeros(tokens.shape[1], 128))
    opt = torch.optim.Adam([*fc1.parameters(), *fc2.parameters(), pos], lr=3e-3)
    idx = train.nonzero().squeeze(1)

    def logits(t: torch.Tensor) -> torch.Tensor:
        return fc2(F.silu(fc1(t) + pos)).mean(1)

    for _ in range(steps):
        b = idx[torch.randint(0, len(idx), (32,))]
        loss = F.cross_entropy(logits(tokens[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return logits(tokens).argmax(1)


def attention_uniformity(tower: torch.nn.Module, data: Path, problems: dict, cfg: AdemVLConfig, n: int = 32) -> None:
    """Entropy of every block's attention rows on n images, against a uniform row's log(L).

    A random tower's queries and keys are small random projections, so each block's attention is
    close to a plain average over all tokens: a token then holds its own patch plus the image's
    mean, and nothing about its neighbours.
    """
    items = [(pid, p) for pid, p in problems.items() if p.get("image")][:n]
    px = torch.stack([image_to_tensor(Image.open(data / "images" / p["split"] / pid / p["image"]),
                                      tower.config.image_size, cfg.image_mean, cfg.image_std) for pid, p in items])
    tower.set_attn_implementation("eager")  # the attention weights are returned by the eager path only
    with torch.no_grad():
        attentions = tower(pixel_values=px, output_attentions=True).attentions  # (B, heads, L, L) per block
    tower.set_attn_implementation("sdpa")
    length = attentions[0].shape[-1]
    for i, a in enumerate(attentions):
        entropy = float(-(a * a.clamp_min(1e-12).log()).sum(-1).mean())
        print(f"block {i}: attention entropy {entropy:.4f} (uniform: {math.log(length):.4f}), "
              f"largest weight {float(a.max(-1).values.mean()):.4f} on average (uniform: {1 / length:.4f})")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("runs/demo/data"))
    ap.add_argument("--vision", default=hub.EMBEDDED_VISION)
    ap.add_argument("--vision-layer", type=int, default=-2)
    ap.add_argument("--n", type=int, default=4000, help="problems to generate when --data has none (4000: the demo's)")
    args = ap.parse_args()
    if not (args.data / "problems.json").exists():
        shapes.write_dataset(args.data, args.n, seed=0)
    problems = json.loads((args.data / "problems.json").read_text())
    cfg = AdemVLConfig()
    tower = hub.load_vision(args.vision)
    truncate_tower(tower, args.vision_layer)
    tower.eval()
    attention_uniformity(tower, args.data, problems, cfg)

    print("| question (train / scored) | linear [cls] | linear mean | bag MLP | bag MLP, pixels | chance |")
    print("|---|---:|---:|---:|---:|---:|")
    for qtype in shapes.IMAGE_QTYPES:
        items = [(pid, p) for pid, p in problems.items() if p["qtype"] == qtype]
        pixels = torch.stack([image_to_tensor(Image.open(args.data / "images" / p["split"] / pid / p["image"]),
                                              tower.config.image_size, cfg.image_mean, cfg.image_std) for pid, p in items])
        with torch.no_grad():
            feats = torch.cat([tower_features(tower, pixels[i:i + 64]) for i in range(0, len(pixels), 64)])
        y = torch.tensor([p["answer"] for _, p in items])
        train = torch.tensor([p["split"] == "train" for _, p in items])
        patch = tower.config.patch_size
        raw = pixels.unfold(2, patch, patch).unfold(3, patch, patch).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        preds = [linear_probe(feats[:, 0], y, train), linear_probe(feats[:, 1:].mean(1), y, train),
                 bag_probe(multiscale(feats[:, 1:], (256, 64), "avg"), y, train),
                 bag_probe(multiscale(raw, (256, 64), "avg"), y, train)]
        accs = [f"{100 * float((p[~train] == y[~train]).float().mean()):.1f}" for p in preds]
        n_choices = len(items[0][1]["choices"])
        print(f"| {qtype} ({int(train.sum())} / {int((~train).sum())}) | " + " | ".join(accs) + f" | {100 / n_choices:.1f} |", flush=True)


if __name__ == "__main__":
    main()
