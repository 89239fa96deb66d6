"""Where the model looked: the adaptive fusion's attention over the image, token by token.

At every decoder layer the fusion scores each text position against every visual token,
A = act(h_n) @ act(K)^T, and drops the floor(gamma N) weakest entries of the row (ADEM-VL.md,
step 6). This module re-runs the model on a prompt (and an answer, teacher-forced), catches h_n
at the layers asked for and the visual keys, and applies the fusion's own rule (`fusion.drop_mask`)
to the rows it wants. The demo's drop figure (Fig. 3) and the `ademvl serve` page both read the model through here, so they show one computation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .fusion import drop_mask, qk_activation
from .model import AdemVLModel, decoder_layers


def visual_keys(model: AdemVLModel) -> Tensor:
    """act(K) (B, N, d) of the batch being run, read where the fusion keeps it.

    The one place that knows where the keys live, called from inside the forward pass.
    """
    return model.memory.keys.clone()


@contextmanager
def caught(model: AdemVLModel, layers: list[int]) -> Iterator[tuple[dict[int, Tensor], list[Tensor]]]:
    """During one forward of the model: h_n = ffn_norm(h) (B, T, d) at each layer's MLP, and act(K)."""
    h_n: dict[int, Tensor] = {}
    keys: list[Tensor] = []
    mods = decoder_layers(model.llm)
    hooks = [mods[i].mlp.register_forward_hook(lambda m, a, o, i=i: h_n.__setitem__(i, a[0].detach().clone()))
             for i in layers]
    hooks.append(mods[0].mlp.register_forward_hook(lambda m, a, o: keys.append(visual_keys(model))))
    try:
        yield h_n, keys
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def fusion_scores(model: AdemVLModel, batch: dict[str, Tensor], layers: list[int]) -> dict[int, Tensor]:
    """The fusion's scores act(h_n) @ act(K)^T (B, T, N) at each given layer, before the drop."""
    was_training = model.training
    model.eval()
    dev = model.pos_k.device
    try:
        with caught(model, layers) as (h_n, keys):
            model(**{k: v.to(dev) for k, v in batch.items() if k != "labels"}, logits_to_keep=1)
    finally:
        model.train(was_training)
    k_act = keys[0]
    return {i: qk_activation(h_n[i].to(k_act.dtype), model.config.qk_act) @ k_act.transpose(1, 2) for i in layers}


@torch.no_grad()
def drop_decisions(model: AdemVLModel, samples: list, layers: list[int]) -> list[dict[int, Tensor]]:
    """For each sample, which visual tokens the last prompt token drops at the given layers.

    The prompts are left-padded, so the last position of every row is its last prompt token (the
    one that predicts the first answer token). Returns per sample {layer: (N,) bool}.
    """
    scores = fusion_scores(model, model.processor(samples, train=False), layers)
    masks = {i: drop_mask(s[:, -1].float().cpu(), model.config.drop_ratio) for i, s in scores.items()}  # (B, N)
    return [{i: masks[i][b] for i in layers} for b in range(len(samples))]


# ---- the answer's tokens ---------------------------------------------------------------------
@dataclass
class Looked:
    """Where each answer token looked: one row per generated token, at every layer.

    Row j is the position that produced answer token j (the last prompt token for j = 0).
    weights[layer]: (L, N) the fusion's attention weights A after the drop (dropped entries 0);
    dropped[layer]: (L, N) True where the fusion dropped that visual token for that row.
    """

    tokens: list[str]
    scales: tuple[int, ...]
    weights: dict[int, Tensor]
    dropped: dict[int, Tensor]

    @property
    def layers(self) -> list[int]:
        return sorted(self.weights)

    def maps(self, layer: int, token: int | None = None) -> list[tuple[Tensor, Tensor]]:
        """Per scale, (mean weight, fraction dropped) as (side, side) grids, over all answer tokens
        or the one asked for."""
        rows = slice(None) if token is None else slice(token, token + 1)
        weight = self.weights[layer][rows].mean(0)
        drop = self.dropped[layer][rows].float().mean(0)
        return list(zip(scale_maps(weight, self.scales), scale_maps(drop, self.scales)))


@torch.no_grad()
def where_it_looked(model: AdemVLModel, image: Any, prompt: str, answer_ids: list[int],
                    layers: list[int] | None = None) -> Looked:
    """Re-run prompt + answer (teacher-forced) and read the fusion's rows for the answer's tokens.

    answer_ids: the generated ids (EOS included if generation stopped there). Every layer by default.
    """
    from .data import Sample

    if not answer_ids:
        raise ValueError("no answer tokens to look at: generate at least one token")
    layers = list(range(len(decoder_layers(model.llm)))) if layers is None else layers
    batch = model.processor([Sample("looked", image, [(prompt, "")])], train=False)
    extra = torch.tensor([answer_ids[:-1]], dtype=batch["input_ids"].dtype)  # the last token produced nothing yet
    batch["input_ids"] = torch.cat([batch["input_ids"], extra], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(extra)], dim=1)
    scores = fusion_scores(model, batch, layers)
    n = len(answer_ids)
    rows = {i: s[0, -n:].float().cpu() for i, s in scores.items()}  # (L, N)
    ratio = model.config.drop_ratio
    return Looked(tokens=[model.tokenizer.decode([t]) for t in answer_ids], scales=model.config.scales,
                  weights={i: r.masked_fill(drop_mask(r, ratio), 0.0) for i, r in rows.items()},
                  dropped={i: drop_mask(r, ratio) for i, r in rows.items()})


# ---- pictures --------------------------------------------------------------------------------
def scale_maps(values: Tensor, scales: tuple[int, ...]) -> list[Tensor]:
    """Split one value per visual token (N,) into the scales' square grids, row-major as pooled."""
    out, start = [], 0
    for s in scales:
        side = int(round(s ** 0.5))
        out.append(values[start : start + s].reshape(side, side))
        start += s
    return out


def overlay(ax: Any, img: Image.Image, grid: Tensor, **imshow_kwargs: Any) -> None:
    """The image with a grid of visual-token values stretched over it (nearest, one cell per token)."""
    ax.imshow(img)
    ax.imshow(grid.float().numpy(), extent=(0, img.width, img.height, 0), interpolation="nearest", **imshow_kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


DROP_STYLE = dict(cmap="Reds", alpha=0.55, vmin=0, vmax=1)  # the demo's Fig. 3 colours


def render(img: Image.Image, looked: Looked, layer: int, token: int | None = None) -> Image.Image:
    """The page's picture: the image, then per scale the attention weight and the dropped tokens."""
    import io

    from matplotlib.figure import Figure  # no pyplot: the server renders from several threads

    maps = looked.maps(layer, token)
    fig = Figure(figsize=(2.3 * (1 + 2 * len(maps)), 2.7))
    axes = fig.subplots(1, 1 + 2 * len(maps), squeeze=False)[0]
    axes[0].imshow(img)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    what = "all answer tokens" if token is None else f"token {token} {looked.tokens[token]!r}"
    axes[0].set_title(f"layer {layer}, {what}", fontsize=8)
    for j, (weight, drop) in enumerate(maps):
        side = weight.shape[0]
        lim = float(weight.abs().max()) or 1.0
        overlay(axes[1 + 2 * j], img, weight, cmap="RdBu_r", alpha=0.6, vmin=-lim, vmax=lim)
        axes[1 + 2 * j].set_title(f"{side}x{side}: attention weight", fontsize=8)
        overlay(axes[2 + 2 * j], img, drop, **DROP_STYLE)
        axes[2 + 2 * j].set_title(f"{side}x{side}: dropped", fontsize=8)
    fig.suptitle("Adaptive fusion: attention weight (red +, blue -) and visual tokens dropped (red)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return Image.open(buf).convert("RGB")
