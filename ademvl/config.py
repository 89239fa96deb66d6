"""Every setting of ADEM-VL in one dataclass, with the paper's defaults (ADEM-VL.md).

Saved as `ademvl_config.json` next to the trainable weights, so a checkpoint says exactly which
method variant and which base models it belongs to.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "ademvl_config.json"
QK_ACTIVATIONS = ("silu", "none", "relu", "elu", "softmax", "silu_positive")
POOLINGS = ("avg", "max")


def check_keys(cls: type, d: dict[str, Any], what: str) -> None:
    """Unknown keys are an error that lists the valid ones (a typo must not pass silently)."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; valid keys: {', '.join(valid)}")


@dataclass
class AdemVLConfig:
    """Settings of the method. Defaults are the released code's (ADEM-VL.md, "Training settings")."""

    # Base models: a Hugging Face id, a local directory, or an embedded default
    # ("embedded:smollm2-135m-instruct", "embedded:demo-clip"; see ademvl/hub.py).
    llm: str = "embedded:smollm2-135m-instruct"
    vision: str = "embedded:demo-clip"
    # Step 1: which hidden state of the vision tower to read; -2 = second to last block.
    # Blocks after it never run and are not built.
    vision_layer: int = -2
    # Step 1: bottleneck adapters beside every vision block's MLP that runs.
    adapter_dim: int = 12
    adapter_scale: float = 0.1
    adapter_dropout: float = 0.1
    # Step 2: multiscale visual prompt: number of tokens per scale (each a square grid size).
    scales: tuple[int, ...] = (256, 64)
    pooling: str = "avg"
    # Step 3: low-rank projector V -> Xv, scaled by beta.
    hidden_proj: int = 128
    beta: float = 0.01
    # Zero-initialise the projectors' last layer (not the paper's setting: the demo uses it so the
    # frozen LLM is undisturbed at step 0 even with a larger beta).
    proj_zero_init: bool = False
    # Step 5: one [cls] embedding after the image prefix.
    use_cls: bool = True
    image_prefix: str = "Image: "
    no_image_prefix: str = "Image: N/A"
    # Step 6: parameter-free cross-attention at every decoder layer's MLP.
    alpha: float = 0.1
    drop_ratio: float = 0.1
    qk_act: str = "silu"
    # Image preprocessing of the released code: bicubic resize, ImageNet mean/std.
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Longest tokenised sample; longer prompts are cut from the left, never the answer.
    max_length: int = 512
    # What the base models looked like when the checkpoint was made, filled in by the model
    # (used to refuse loading onto another base model with a clear message).
    base: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scales = tuple(int(s) for s in self.scales)
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        self.validate()

    def validate(self) -> None:
        """Fail early, naming the field and the allowed values."""
        if self.qk_act not in QK_ACTIVATIONS:
            raise ValueError(f"qk_act={self.qk_act!r}: choose one of {', '.join(QK_ACTIVATIONS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: choose one of {', '.join(POOLINGS)}")
        if not self.scales:
            raise ValueError("scales must name at least one scale, e.g. (256, 64)")
        for s in self.scales:
            side = math.isqrt(s)
            if s <= 0 or side * side != s:
                raise ValueError(f"scales: {s} is not a square number of tokens (e.g. 256 = 16x16, 64 = 8x8)")
        if not 0.0 <= self.drop_ratio < 1.0:
            raise ValueError(f"drop_ratio={self.drop_ratio}: must be in [0, 1)")
        if self.vision_layer >= 0:
            raise ValueError(f"vision_layer={self.vision_layer}: use a negative index as in hidden_states (-2 = second to last)")
        if self.adapter_dim < 0 or self.hidden_proj <= 0:
            raise ValueError("adapter_dim must be >= 0 and hidden_proj > 0")

    @property
    def num_visual_tokens(self) -> int:
        return sum(self.scales)

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("scales", "image_mean", "image_std"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdemVLConfig":
        check_keys(cls, d, "AdemVLConfig key")
        return cls(**d)

    def replace(self, **changes: Any) -> "AdemVLConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "AdemVLConfig":
        path = Path(directory)
        path = path / CONFIG_NAME if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"{path}: no ADEM-VL config here; a checkpoint directory holds {CONFIG_NAME} and adapter.safetensors")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad ADEM-VL config: {e}") from e
