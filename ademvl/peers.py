"""The methods ADEM-VL is measured against, in one framework: same LLM, same vision tower, same inputs.

    text-only           the frozen LLM reading the text alone (no image): the lower bound
    adem-vl             ours (ademvl.model.AdemVLModel, fast fusion path)
    adem-vl-reference   the same model on the released code's fusion path (keys re-activated in
                        every layer, threshold by a full sort of every row)
    memvp               MemVP-style: visual features as extra FFN memory at every layer,
                        out += alpha * silu(h_n @ K^T) @ V; one scale (the patch grid), nothing
                        dropped, no [cls] token (ADEM-VL.md, "The peers")
    llava               LLaVA-style input extension: the patch tokens of the same tower through
                        LLaVA-1.5's 2-layer MLP projector (C -> d -> d, GELU), prepended to the
                        LLM input after BOS, with LoRA (peft) on the attention projections

Every peer takes the same text batch (`make_batch`: token ids without any extra token, the
images beside them) and adds its own extra input tokens, so `extra_tokens` is what it costs.
A peer gives the benchmark `inputs(...)` (input embeddings, attention mask and labels, with
any visual memory set), `decoder` (the causal LM to call on them), and greedy generation with
the KV cache split into `prefill` and `decode_step`, so that the two can be timed apart.

All peers can share one copy of the frozen weights: `twin(module)` makes a second module object
over the same parameter tensors, so each method hangs its own hooks or LoRA layers on it while
a 7B LLM is held in memory once.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .config import AdemVLConfig
from .data import IGNORE_INDEX, IMAGE_TOKEN_ID
from .model import AdemVLModel
from .vision import has_cls_token, truncate_tower

METHODS = ("text-only", "adem-vl", "adem-vl-reference", "memvp", "llava")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


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
               labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(inputs_embeds, attention_mask, labels) with this method's extra tokens; sets its visual memory."""
        raise NotImplementedError

    def release(self) -> None:
        """Forget this batch's visual memory (after a forward, or after generation)."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_mask: Tensor,
                labels: Tensor | None = None, **kwargs: Any):
        """The LLM's CausalLMOutput on this method's inputs (loss with labels)."""
        embeds, mask, labels = self.inputs(input_ids, attention_mask, pixel_values, image_mask, labels)
        try:
            return self.decoder(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)
        finally:
            self.release()

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor,
                image_mask: Tensor) -> tuple[Tensor, Tensor, Any]:
        """Read the prompt (image included): the first new token (B, 1), the mask so far, the KV cache.

        The visual memory stays set for the decode steps; call `release()` when generation ends.
        Only the last position's logits are made, as transformers' generate() does.
        """
        embeds, mask, _ = self.inputs(input_ids, attention_mask, pixel_values, image_mask)
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True), mask, out.past_key_values  # (B, 1)

    @torch.no_grad()
    def decode_step(self, token: Tensor, attention_mask: Tensor, past: Any) -> tuple[Tensor, Tensor, Any]:
        """One cached greedy step: feed `token` (B, 1), return the next token, the grown mask, the cache."""
        mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)  # (B, L + 1)
        out = self.decoder(input_ids=token, attention_mask=mask, past_key_values=past, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True), mask, out.past_key_values

    def greedy(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_mask: Tensor,
               new_tokens: int) -> Tensor:
        """Greedy generation with the KV cache: (B, new_tokens) new token ids."""
        try:
            token, mask, past = self.prefill(input_ids, attention_mask, pixel_values, image_mask)
            tokens = [token]
            for _ in range(new_tokens - 1):
                token, mask, past = self.decode_step(token, mask, past)
                tokens.append(token)
            return torch.cat(tokens, dim=1)
        finally:
            self.release()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


class TextOnly(Peer):
    """(c) The frozen LLM on the text alone: the lower bound of every cost.

    Nothing trains, but the training step still runs the backward through every layer down to
    the input embeddings, as every peer must (each has something trainable at the input or in
    the first layer): it is the cost of teaching anything to a frozen LLM.
    """

    name = "text-only"

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm.requires_grad_(False)

    @property
    def decoder(self) -> nn.Module:
        return self.llm

    def inputs(self, input_ids, attention_mask, pixel_values=None, image_mask=None, labels=None):
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, d)
        if torch.is_grad_enabled():
            embeds.requires_grad_(True)  # backward reaches the bottom of the LLM, as for the peers
        return embeds, attention_mask, labels

    def train(self, mode: bool = True) -> "TextOnly":
        super().train(mode)
        self.llm.eval()  # frozen: no dropout, as in AdemVLModel
        return self


class AdemPeer(Peer):
    """(adem-vl, adem-vl-reference, memvp) An AdemVLModel; its [cls] placeholder goes after BOS."""

    def __init__(self, model: AdemVLModel, name: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.extra_tokens = int(model.config.use_cls)

    @property
    def decoder(self) -> nn.Module:
        return self.model.llm

    def inputs(self, input_ids, attention_mask, pixel_values, image_mask, labels=None):
        if self.extra_tokens:
            input_ids = insert_after_bos(input_ids, IMAGE_TOKEN_ID)  # [BOS] <cls> text
            input_ids[~image_mask.to(input_ids.device).bool(), 1] = 0  # no image, no [cls]: a plain token
            attention_mask = insert_after_bos(attention_mask, 1)
            labels = None if labels is None else insert_after_bos(labels, IGNORE_INDEX)
        return self.model.prepare(input_ids, pixel_values, image_mask), attention_mask, labels

    def release(self) -> None:
        self.model.memory.clear()

    def train(self, mode: bool = True) -> "AdemPeer":
        super().train(mode)
        self.model.train(mode)  # keeps the frozen base models in eval mode
        return self


def memvp_config(config: AdemVLConfig, patches: int) -> AdemVLConfig:
    """MemVP inside our framework: one scale (the whole patch grid), no drop, no [cls].

    qk_act "none": MemVP applies silu to the product h_n @ K^T, not to query and key
    (VisualMemory(form="memvp")).
    """
    return config.replace(scales=(patches,), drop_ratio=0.0, use_cls=False, qk_act="none", base={})


class LlavaPeer(Peer):
    """(a) LLaVA-style input extension: every patch token enters the LLM input (+ LoRA).

    The tower is read at the same layer as ADEM-VL's (hidden_states[-2], LLaVA's default too),
    patch tokens only, no final LayerNorm (as LLaVA); the projector is LLaVA-1.5's mlp2x_gelu.
    A sample without an image keeps its patch positions, masked out of attention.
    """

    name = "llava"

    def __init__(self, llm: nn.Module, vision: nn.Module, vision_layer: int = -2, lora_rank: int = 8,
                 lora_alpha: int = 16, lora_dropout: float = 0.05) -> None:
        from peft import LoraConfig, get_peft_model

        super().__init__()
        llm.requires_grad_(False)
        vision.requires_grad_(False)
        truncate_tower(vision, vision_layer)
        self.vision = vision
        self.extra_tokens = (vision.config.image_size // vision.config.patch_size) ** 2
        d, c = llm.config.hidden_size, vision.config.hidden_size
        dev = next(llm.parameters()).device
        with torch.device(dev):
            self.proj = nn.Sequential(nn.Linear(c, d), nn.GELU(), nn.Linear(d, d))  # LLaVA-1.5 mlp2x_gelu
        lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; nothing for us to fix
            warnings.simplefilter("ignore", FutureWarning)
            self.llm = get_peft_model(llm, lora)

    @property
    def decoder(self) -> nn.Module:
        return self.llm

    def inputs(self, input_ids, attention_mask, pixel_values, image_mask, labels=None):
        emb = self.llm.get_input_embeddings()(input_ids)  # (B, T, d)
        px = pixel_values.to(next(self.vision.parameters()).dtype)
        hidden = self.vision(pixel_values=px).last_hidden_state  # hidden_states[-2]: (B, 1 + P, C) or (B, P, C)
        patches = hidden[:, 1:] if has_cls_token(self.vision) else hidden  # (B, P, C)
        visual = self.proj(patches.to(self.proj[0].weight.dtype)).to(emb.dtype)  # (B, P, d)
        embeds = insert_after_bos(emb, visual)  # (B, 1 + P + T - 1, d)
        shown = image_mask.to(attention_mask.device).view(-1, 1).to(attention_mask.dtype)  # (B, 1)
        attention_mask = insert_after_bos(attention_mask, shown.expand(-1, self.extra_tokens))
        labels = None if labels is None else insert_after_bos(labels, IGNORE_INDEX, self.extra_tokens)
        return embeds, attention_mask, labels

    def train(self, mode: bool = True) -> "LlavaPeer":
        super().train(mode)
        self.vision.eval()  # frozen tower: never in training mode
        return self


def build_peer(method: str, llm: nn.Module, vision: nn.Module, config: AdemVLConfig, lora_rank: int = 8,
               seed: int = 0) -> Peer:
    """One method on (twins of) the given base models. `config` is ADEM-VL's (scales etc.).

    What trains is initialised from `seed`, so adem-vl and adem-vl-reference start from the very
    same weights and give the same outputs.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method == "text-only":
            return TextOnly(llm)
        if method in ("adem-vl", "adem-vl-reference"):
            model = AdemVLModel(llm, vision, config.replace(base={}))
            model.memory.reference = method == "adem-vl-reference"
            return AdemPeer(model, method)
        if method == "memvp":
            patches = (vision.config.image_size // vision.config.patch_size) ** 2
            model = AdemVLModel(llm, vision, memvp_config(config, patches))
            model.memory.form = "memvp"  # silu(h_n @ K^T) @ V, keys stored raw
            return AdemPeer(model, method)
        return LlavaPeer(llm, vision, config.vision_layer, lora_rank=lora_rank)


def build_peers(llm: nn.Module, vision: nn.Module, config: AdemVLConfig, methods: tuple[str, ...] = METHODS,
                lora_rank: int = 8, dtype: torch.dtype | None = None, seed: int = 0) -> dict[str, Peer]:
    """Every requested method on twins of one LLM and one tower (weights held once).

    The given `llm` and `vision` stay untouched (no hook, no LoRA layer, no block dropped).
    dtype: cast what trains to it too (pure bf16 on a GPU, as the frozen weights), so every
    matmul of a step runs in the same precision.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    peers: dict[str, Peer] = {}
    for m in methods:
        peer = build_peer(m, twin(llm), twin(vision), config, lora_rank, seed)
        if dtype is not None:
            for p in peer.trainable_parameters():
                p.data = p.data.to(dtype)
        peers[m] = peer
    return peers
