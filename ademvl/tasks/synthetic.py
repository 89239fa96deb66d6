"""Tiny captioning data made on the fly, for `ademvl/configs/tiny.yaml`: quick checks of the whole loop.

Each sample is one coloured shape drawn by `ademvl.tasks.shapes` (in memory, nothing on disk) and
the target names it ("a red circle."); a fraction has no image and asks a question the prompt
answers, so the "Image: N/A" path runs too. Deterministic in `seed`.
"""

from __future__ import annotations

import random

from ..data import Sample
from .shapes import COLORS, SHAPES, place_boxes, render


def load_samples(split: str = "train", n: int = 64, seed: int = 0, text_only_fraction: float = 0.25) -> list[Sample]:
    """`n` samples; the split only changes the seed, so train and test differ."""
    rng = random.Random(f"{seed}-{split}")
    samples = []
    for i in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        if rng.random() < text_only_fraction:
            prompt = f"The kite is {color}. What color is the kite?"
            samples.append(Sample(f"{split}-{i}", None, [(prompt, f" {color}.")], {"answer": color}))
            continue
        image = render([{"shape": shape, "color": color, "box": place_boxes(rng, 1)[0]}])
        samples.append(Sample(f"{split}-{i}", image, [("What is in the image?", f" a {color} {shape}.")],
                              {"answer": f"{color} {shape}"}))
    return samples
