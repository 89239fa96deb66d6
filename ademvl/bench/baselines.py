"""The methods ADEM-VL is measured against, in one framework: same LLM, same vision tower, same inputs.

    text-only           the frozen LLM reading the text alone (no image): the lower bound
    adem-vl             ours (ademvl.model.AdemVLModel, its own fusion `ademvl.fusion.fuse`)
    adem-vl-reference   the same model with the released code's fusion (`fuse_released`: keys
                        re-activated in every layer, threshold by a full sort of every row)
    memvp               MemVP-style (`fusion.fuse_memvp_form`): visual features as extra FFN memory at every
                        layer, out += alpha * silu(h_n @ K^T) @ V; one scale (the patch grid),
                        nothing dropped, no [cls] token (ADEM-VL.md, "The peers")
    llava               LLaVA-style input extension: the patch tokens of the same tower through
                        LLaVA-1.5's 2-layer MLP projector (C -> d -> d, GELU), prepended to the
                        LLM input after BOS, with LoRA (peft) on the attention projections

Every peer takes the same text batch (`make_batch`: token ids without any extra token, the
images beside them) and adds its own extra input tokens, so `extra_tokens` is what it costs.
The peers' interface, the shared batch and `twin` are in `ademvl.bench.peer`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..config import AdemVLConfig
from ..data import IGNORE_INDEX, IMAGE_TOKEN_ID
from ..fusion import num_dropped, qk_activation
from ..model import AdemVLModel
from ..vision import has_cls_token, truncate_tower
from .peer import Inputs, Peer, insert_after_bos, twin

METHODS = ("text-only", "adem-vl", "adem-vl-reference", "memvp", "llava")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


# ---- the peers' fusions (ademvl.fusion.Fusion: raw K, in every layer) ----------------------------
def released_drop_mask(scores: Tensor, n_drop: int) -> Tensor:
    """The released code's rule: below the row's (n_drop+1)-th smallest value, found by a full sort."""
    thresh = torch.sort(scores, dim=-1).values[..., n_drop : n_drop + 1]  # (B, T, 1)
    return scores < thresh


def fuse_released(h_n: Tensor, k: Tensor, v: Tensor, alpha: float, drop_ratio: float, qk_act: str) -> Tensor:
    """The released code's fusion: activate the raw keys here (every layer), threshold by sorting."""
    scores = qk_activation(h_n, qk_act) @ qk_activation(k, qk_act).transpose(1, 2)  # (B, T, N)
    n_drop = num_dropped(scores.shape[-1], drop_ratio)
    if n_drop > 0:
        scores = scores * (~released_drop_mask(scores, n_drop)).to(scores.dtype)
    return alpha * (scores @ v)  # (B, T, d)


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
        return Inputs(embeds, attention_mask, labels)

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
        embeds, keys, values = self.model.prepare(input_ids, pixel_values, image_mask)
        memory = self.model.memory.holding(keys, values, value_span=self.model.value_span())
        return Inputs(embeds, attention_mask, labels, memory)

    def train(self, mode: bool = True) -> "AdemPeer":
        super().train(mode)
        self.model.train(mode)  # keeps the frozen base models in eval mode
        return self


def memvp_config(config: AdemVLConfig, patches: int) -> AdemVLConfig:
    """MemVP inside our framework: one scale (the whole patch grid), no drop, no [cls], and its form
    alpha * silu(h_n @ K^T) @ V: silu on the product, not on query and key (Table VI's baseline row,
    `fusion.fuse_memvp_form`, which the model picks for fusion_form "memvp")."""
    return config.replace(scales=(patches,), drop_ratio=0.0, use_cls=False, fusion_form="memvp", qk_act="silu", base={})


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
        return Inputs(embeds, attention_mask, labels)

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
        if method == "adem-vl":
            return AdemPeer(AdemVLModel(llm, vision, config.replace(base={})), method)
        if method == "adem-vl-reference":
            return AdemPeer(AdemVLModel(llm, vision, config.replace(base={}), fusion=fuse_released), method)
        if method == "memvp":
            patches = (vision.config.image_size // vision.config.patch_size) ** 2
            return AdemPeer(AdemVLModel(llm, vision, memvp_config(config, patches)), method)
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
