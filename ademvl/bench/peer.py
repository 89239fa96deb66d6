"""One method under benchmark (`Peer`), its inputs, and the shared batch and weights.

A peer gives the benchmark `inputs(...)` (input embeddings, attention mask, labels, and the
visual memory to hold around the LLM calls), `decoder` (the causal LM to call on them), and
greedy generation with the KV cache split into `prefill` and `decode_step`, so that the two can
be timed apart:

    x = peer.inputs(**batch)
    with x.memory:
        token, mask, past = peer.prefill(x)
        token, mask, past = peer.decode_step(token, mask, past)

All peers can share one copy of the frozen weights: `twin(module)` makes a second module object
over the same parameter tensors, so each method hangs its own hooks or LoRA layers on it while
a 7B LLM is held in memory once.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


def twin(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters are the very same tensors (buffers are copied).

    Make twins before any hook or LoRA layer is attached: those belong to one twin only.
    """
    return copy.deepcopy(module, memo={id(p): p for p in module.parameters()})


def make_batch(vocab_size: int, batch: int, text_len: int, image_size: int, bos_id: int | None = 1,
               seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Random text of exactly `text_len` tokens (BOS first) and one random image per sample.

    Timings do not depend on token or pixel values; the fixed seed makes every run see the same.
    Labels are the ids themselves: the loss covers every text token, for every method alike.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, text_len), generator=g)  # (B, T); 0-2 are special in SmolLM2
    if bos_id is not None:
        ids[:, 0] = bos_id
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch, text_len, dtype=torch.long, device=device),
        "labels": ids.clone().to(device),
        "pixel_values": torch.randn(batch, 3, image_size, image_size, generator=g).to(device, dtype),
        "image_mask": torch.ones(batch, dtype=torch.bool, device=device),
    }


@dataclass
class Inputs:
    """What a method feeds its LLM: embeddings (B, L, d), mask (B, L), labels, and its visual memory."""

    embeds: Tensor
    mask: Tensor
    labels: Tensor | None = None
    memory: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)


def insert_after_bos(x: Tensor, value: Tensor | int, width: int = 1) -> Tensor:
    """x (B, T, ...) with `width` positions filled by `value` inserted at position 1 (after BOS)."""
    fill = value if isinstance(value, Tensor) else torch.full((x.shape[0], width, *x.shape[2:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x[:, :1], fill.to(x.dtype), x[:, 1:]], dim=1)


class Peer(nn.Module):
    """One method under benchmark. Subclasses set `name`, `extra_tokens`, `decoder` and `inputs`."""

    name = ""
    extra_tokens = 0

    @property
    def decoder(self) -> nn.Module:
        """The causal LM the input embeddings go to (with past_key_values for decoding)."""
        raise NotImplementedError

    def inputs(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_mask: Tensor,
               labels: Tensor | None = None) -> Inputs:
        """This method's inputs with its extra tokens, and its visual memory (a context to hold)."""
        raise NotImplementedError

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_mask: Tensor,
                labels: Tensor | None = None, **kwargs: Any):
        """The LLM's CausalLMOutput on this method's inputs (loss with labels)."""
        x = self.inputs(input_ids, attention_mask, pixel_values, image_mask, labels)
        with x.memory:
            return self.decoder(inputs_embeds=x.embeds, attention_mask=x.mask, labels=x.labels, **kwargs)

    @torch.no_grad()
    def prefill(self, x: Inputs) -> tuple[Tensor, Tensor, Any]:
        """Read the prompt (inside `with x.memory`): the first new token (B, 1), the mask, the KV cache.

        Only the last position's logits are made, as transformers' generate() does.
        """
        out = self.decoder(inputs_embeds=x.embeds, attention_mask=x.mask, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True), x.mask, out.past_key_values  # (B, 1)

    @torch.no_grad()
    def decode_step(self, token: Tensor, attention_mask: Tensor, past: Any) -> tuple[Tensor, Tensor, Any]:
        """One cached greedy step: feed `token` (B, 1), return the next token, the grown mask, the cache."""
        mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)  # (B, L + 1)
        out = self.decoder(input_ids=token, attention_mask=mask, past_key_values=past, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True), mask, out.past_key_values

    def greedy(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_mask: Tensor,
               new_tokens: int) -> Tensor:
        """Greedy generation with the KV cache: (B, new_tokens) new token ids."""
        with torch.no_grad():
            x = self.inputs(input_ids, attention_mask, pixel_values, image_mask)
        with x.memory:
            token, mask, past = self.prefill(x)
            tokens = [token]
            for _ in range(new_tokens - 1):
                token, mask, past = self.decode_step(token, mask, past)
                tokens.append(token)
        return torch.cat(tokens, dim=1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())
