"""The vision side of ADEM-VL (ADEM-VL.md, steps 1-2): adapters, truncated tower, multiscale pooling.

The tower is an unmodified Hugging Face CLIPVisionModel (or any model with the same
embeddings / pre_layrnorm / encoder.layers / post_layernorm layout). We read hidden state
`vision_layer` (second to last by default): blocks after it never influence the output, so they
are dropped from the module list and never run (and never carry dead adapter parameters).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .config import AdemVLConfig
from .images import to_rgb


class VisionAdapter(nn.Module):
    """Bottleneck adapter beside a vision block's MLP: scale * up(dropout(gelu(down(x)))).

    No biases (the paper's count: 1024x12 + 12x1024 per block); up starts at zero so the frozen
    tower's features are unchanged at step 0.
    """

    def __init__(self, width: int, dim: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(width, dim, bias=False)
        self.up = nn.Linear(dim, width, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.up(self.dropout(F.gelu(self.down(x))))  # (B, L, width)

    def mlp_hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """forward hook on the block's MLP: the adapter sees the MLP's input, adds to its output."""
        return output + self(args[0]).to(output.dtype)


def blocks_to_run(num_layers: int, vision_layer: int) -> int:
    """hidden_states[vision_layer] is the output of this many blocks (hidden_states has L+1 entries)."""
    n = num_layers + 1 + vision_layer
    if not 1 <= n <= num_layers:
        raise ValueError(f"vision_layer={vision_layer} is out of range for a tower of {num_layers} blocks")
    return n


def truncate_tower(tower: nn.Module, vision_layer: int) -> int:
    """Drop the blocks after the one we read (they never run). Returns the number kept."""
    layers = tower.encoder.layers
    n = blocks_to_run(len(layers), vision_layer)
    tower.encoder.layers = nn.ModuleList(list(layers)[:n])
    tower.config.num_hidden_layers = n
    if getattr(tower, "use_head", False):  # SigLIP's pooling head reads the last block: never used here
        tower.use_head = False
        del tower.head
    return n


def has_cls_token(tower: nn.Module) -> bool:
    """CLIP prepends a [cls] token; SigLIP has none (its pooling is an attention head)."""
    return "siglip" not in tower.config.model_type


def tower_features(tower: nn.Module, pixel_values: Tensor) -> Tensor:
    """Run the (truncated) tower and apply its final LayerNorm to every token, as the released code.

    Returns (B, 1 + P, C): token 0 is [cls], tokens 1..P the patch grid. CLIP's output projection
    is not applied. SigLIP already normalises its last hidden state and has no [cls]: the mean of
    the patch tokens stands in for it.
    """
    hidden = tower(pixel_values=pixel_values).last_hidden_state  # (B, 1 + P, C) or (B, P, C)
    if has_cls_token(tower):
        return tower.post_layernorm(hidden)
    return torch.cat([hidden.mean(dim=1, keepdim=True), hidden], dim=1)  # (B, 1 + P, C)


def multiscale(patches: Tensor, scales: tuple[int, ...], pooling: str) -> Tensor:
    """Pool the patch grid to every requested size and concatenate (step 2).

    patches: (B, P, C) with P a square (16x16 = 256 for ViT-L/14 at 224 px). Scale 256 is the grid
    itself, 64 is an 8x8 pooling of it. Returns (B, sum(scales), C).
    """
    b, p, c = patches.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"the vision tower gives {p} patch tokens, not a square grid")
    grid = patches.transpose(1, 2).reshape(b, c, side, side)  # (B, C, S, S)
    pool = F.adaptive_avg_pool2d if pooling == "avg" else F.adaptive_max_pool2d
    out = []
    for s in scales:
        s_side = math.isqrt(s)
        if s_side > side:
            raise ValueError(f"scale {s} asks for a {s_side}x{s_side} grid, but the tower's grid is {side}x{side}")
        pooled = grid if s_side == side else pool(grid, s_side)  # (B, C, s_side, s_side)
        out.append(pooled.flatten(2).transpose(1, 2))  # (B, s, C)
    return torch.cat(out, dim=1)  # (B, N, C)


def image_to_tensor(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """The released code's preprocessing: RGB, bicubic resize to size x size, ImageNet mean/std."""
    image = to_rgb(image)  # the same mode rules as for files (alpha on white, 16-bit scaled)
    image = image.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def make_adapters(tower: nn.Module, config: AdemVLConfig) -> nn.ModuleList:
    """One adapter per block that runs (call after truncate_tower)."""
    width = tower.config.hidden_size
    if config.adapter_dim == 0:
        return nn.ModuleList()
    return nn.ModuleList(
        VisionAdapter(width, config.adapter_dim, config.adapter_scale, config.adapter_dropout)
        for _ in tower.encoder.layers
    )
