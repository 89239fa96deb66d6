"""Shared fixtures: tiny random models (LLaMA and Qwen2 text models, a tiny CLIP) built in ~1 s."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest
import torch
from PIL import Image

from ademvl import AdemVLConfig, AdemVLModel, Sample

TINY = dict(vision="random:tiny-clip", scales=(16, 4))  # tiny-clip: 224 px, patch 56 -> 4x4 grid


def tiny_model(llm: str = "random:tiny-llama", **overrides) -> AdemVLModel:
    torch.manual_seed(0)
    return AdemVLModel.build(AdemVLConfig(llm=llm, **{**TINY, **overrides}))


def perturb(model: AdemVLModel, seed: int = 1) -> None:
    """Give every trainable tensor random values, so zero-initialised parts take part in a test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_state_dict().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def samples() -> list[Sample]:
    """Two image samples of different lengths and one text-only sample."""
    return [
        Sample("red", Image.new("RGB", (64, 48), (255, 0, 0)), [("What color is the image?", "red")]),
        Sample("text", None, [("Context: The kite is blue.\nWhat color is the kite?", "blue")]),
        Sample("split", _two_colour(), [("Which side is green?", "The left side")]),
    ]


def _two_colour() -> Image.Image:
    img = Image.new("RGB", (224, 224), (0, 0, 255))
    img.paste((0, 255, 0), (0, 0, 112, 224))
    return img


@pytest.fixture(params=["random:tiny-llama", "random:tiny-qwen2"], ids=["llama", "qwen2"])
def llm_name(request) -> str:
    return request.param
