"""From samples to tensors: the one place that decides the LLM's input layout.

    [BOS] "Image: " <cls> "\n" prompt_1 target_1 [EOS] prompt_2 target_2 [EOS] ...   (with an image)
    [BOS] "Image: N/A"    "\n" prompt_1 target_1 [EOS] ...                           (without)

<cls> is a placeholder id (IMAGE_TOKEN_ID) that the model replaces with the projected [cls]
feature (ADEM-VL.md, step 5); the ablation of Table X (config.input_tokens = M) puts M more
placeholders after it, for M pooled visual tokens. The loss covers target tokens (and their EOS) only (step 7).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .config import AdemVLConfig
from .images import load_image
from .vision import Preprocess

IMAGE_TOKEN_ID = -200  # placeholder for the [cls] embedding; never looked up in the vocabulary
IGNORE_INDEX = -100  # label of positions without loss


@dataclass
class Sample:
    """One training or evaluation item of any task.

    turns: (prompt, target) pairs; the loss covers the targets. For generation the last target is
    what the model must produce (it may be empty).
    """

    id: str
    image: str | Path | Image.Image | None
    turns: list[tuple[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)


class AdemProcessor:
    """Tokenises samples and loads their images into the batch layout the model expects."""

    def __init__(self, tokenizer: Any, config: AdemVLConfig, preprocess: Preprocess | int) -> None:
        """preprocess: the tower's (`Tower.preprocess`); an int is a size with the config's mean/std."""
        self.tokenizer = tokenizer
        self.config = config
        if isinstance(preprocess, int):
            preprocess = Preprocess(preprocess, config.image_mean, config.image_std)
        self.preprocess = preprocess
        self.image_size = preprocess.size
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no EOS token; ADEM-VL needs one to end targets")
        self.eos = eos
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        slots = int(config.use_cls) + config.input_tokens  # [cls], then Table X's visual input tokens
        self._image_head = self._tok(config.image_prefix) + [IMAGE_TOKEN_ID] * slots + self._tok("\n")
        self._text_head = self._tok(config.no_image_prefix) + self._tok("\n")

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def encode(self, sample: Sample, train: bool = True) -> dict[str, Any]:
        """input_ids and labels of one sample; for generation (train=False) the last target is left out."""
        head = self.bos + (self._image_head if sample.image is not None else self._text_head)
        ids, labels = list(head), [IGNORE_INDEX] * len(head)
        turns = sample.turns
        for i, (prompt, target) in enumerate(turns):
            p = self._tok(prompt)
            ids += p
            labels += [IGNORE_INDEX] * len(p)
            if train or i < len(turns) - 1:
                t = self._tok(target) + [self.eos]
                ids += t
                labels += t
        ids, labels = self._truncate(sample, ids, labels, len(head))
        return {"id": sample.id, "input_ids": ids, "labels": labels, "image": sample.image}

    def _truncate(self, sample: Sample, ids: list[int], labels: list[int], head: int) -> tuple[list[int], list[int]]:
        """Cut the prompt from its start (the context goes first), never the head or the answer."""
        excess = len(ids) - self.config.max_length
        if excess <= 0:
            return ids, labels
        first_target = next((i for i, l in enumerate(labels) if l != IGNORE_INDEX), len(ids))
        cuttable = first_target - head
        if excess > cuttable:
            raise ValueError(
                f"sample {sample.id!r}: {len(ids)} tokens, and its answer alone does not fit in "
                f"max_length={self.config.max_length}; raise max_length"
            )
        warnings.warn(f"sample {sample.id!r}: {len(ids)} tokens > max_length={self.config.max_length}; "
                      f"the first {excess} prompt tokens are cut (the answer is kept)", stacklevel=3)
        return ids[:head] + ids[head + excess:], labels[:head] + labels[head + excess:]

    def image_tensor(self, image: str | Path | Image.Image) -> Tensor:
        img = image if isinstance(image, Image.Image) else load_image(image)
        return self.preprocess(img)

    def collate(self, encoded: list[dict[str, Any]], padding_side: str = "right") -> dict[str, Tensor]:
        """Pad to the longest sample of the batch (left for generation, right for training)."""
        longest = max(len(e["input_ids"]) for e in encoded)
        ids, labels, mask = [], [], []
        for e in encoded:
            n = longest - len(e["input_ids"])
            pad_ids, pad_lab, pad_mask = [self.pad] * n, [IGNORE_INDEX] * n, [0] * n
            one = [1] * len(e["input_ids"])
            if padding_side == "left":
                ids.append(pad_ids + e["input_ids"]); labels.append(pad_lab + e["labels"]); mask.append(pad_mask + one)
            else:
                ids.append(e["input_ids"] + pad_ids); labels.append(e["labels"] + pad_lab); mask.append(one + pad_mask)
        image_mask = torch.tensor([e["image"] is not None for e in encoded])
        pixel_values = torch.zeros(len(encoded), 3, self.image_size, self.image_size)
        for i, e in enumerate(encoded):
            if e["image"] is not None:
                pixel_values[i] = self.image_tensor(e["image"])
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(labels),
            "pixel_values": pixel_values,
            "image_mask": image_mask,
        }

    def __call__(self, samples: list[Sample], train: bool = True, padding_side: str | None = None) -> dict[str, Tensor]:
        side = padding_side or ("right" if train else "left")
        return self.collate([self.encode(s, train) for s in samples], side)
