"""The vision side of ADEM-VL (ADEM-VL.md, steps 1-2): towers, adapters, multiscale pooling.

ADEM-VL reads a [cls] feature and a square patch grid from a frozen backbone. What a backbone has
to say for that is one small interface, `Tower` (what runs, where adapters hook, which tokens come
out, how images are preprocessed); the model and the fusion see nothing else:

  * `ViTTower`: an unmodified Hugging Face CLIPVisionModel or SiglipVisionModel (embeddings /
    pre_layrnorm / encoder.layers / post_layernorm). We read hidden state `vision_layer` (second
    to last by default): blocks after it never influence the output, so they are dropped from the
    module list and never run (and never carry dead adapter parameters). Adapters sit beside each
    block's MLP.
  * `GridTower`: a CNN with a spatial feature map (transformers' MobileNetV2Model). The chosen
    stage's map (B, C, H, W) flattened to (B, H*W, C) is the patch grid, its global average the
    [cls] feature; one adapter per position on the output of each block that runs; the blocks
    after the read stage are dropped.

`make_tower(module)` picks the implementation by the module's config type.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

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

    def map_hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """forward hook on a CNN block: the adapter reads the block's output map per position and adds to it.

        Beside the block, not beside its input: a downsampling block's input and output differ in
        size and width, so the output is the one place where every block has the same rule.
        """
        x = output.permute(0, 2, 3, 1)  # (B, H, W, C): channels last, one token per position
        return output + self(x).permute(0, 3, 1, 2).to(output.dtype)  # (B, C, H, W)


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


def check_scales(scales: tuple[int, ...], side: int, vision: str) -> None:
    """Every scale must be a square grid no larger than the tower's (side x side); say which fit."""
    for s in scales:
        s_side = math.isqrt(s)
        if s_side * s_side != s or s_side > side:
            fits = ", ".join(str(k * k) for k in range(side, 0, -1)[:6])
            raise ValueError(f"scales: {s} asks for a {s_side}x{s_side} grid, but the tower {vision} gives a {side}x{side} "
                             f"grid ({side * side} patch tokens); choose square sizes up to {side * side} "
                             f"(e.g. {fits}): the config key model.scales")


def make_adapters(tower: "Tower | nn.Module", config: AdemVLConfig) -> nn.ModuleList:
    """One adapter per block that runs (call after truncating the tower), as wide as that block."""
    tower = tower if isinstance(tower, Tower) else make_tower(tower)
    if config.adapter_dim == 0:
        return nn.ModuleList()
    return nn.ModuleList(VisionAdapter(width, config.adapter_dim, config.adapter_scale, config.adapter_dropout)
                         for width in tower.block_widths())


# ---- the tower interface ---------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the tower's input: RGB, bicubic resize to size x size, (x - mean) / std.

    Recorded in the checkpoint's config (base["preprocess"]), so evaluation and generation on
    another day feed the tower exactly the pixels it was trained on.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> Tensor:
        return image_to_tensor(image, self.size, self.mean, self.std)  # (3, size, size)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "resize": "bicubic"}


class Tower:
    """What ADEM-VL needs from a frozen vision backbone, over one unmodified Hugging Face module.

    Subclasses say: which blocks run (and get one adapter each, of the block's width), where an
    adapter hooks in, which tokens come out ((B, 1 + P, C): [cls], then the P = side x side patch
    grid, row by row) and how an image is preprocessed. Nothing else of the backbone is used.
    """

    kind = "tower"

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.total_blocks = len(self.blocks())  # before truncation: the depth of the whole backbone

    def blocks(self) -> list[nn.Module]:
        """The blocks that run, in order."""
        raise NotImplementedError

    def truncate(self, vision_layer: int) -> int:
        """Drop the blocks after the one we read (they never run). Returns the number kept."""
        raise NotImplementedError

    def block_widths(self) -> list[int]:
        """The width an adapter beside each block that runs works at."""
        raise NotImplementedError

    def hook_adapter(self, block: nn.Module, adapter: VisionAdapter) -> None:
        raise NotImplementedError

    @property
    def width(self) -> int:
        """C, the width of the tokens."""
        raise NotImplementedError

    @property
    def side(self) -> int:
        """The patch grid is side x side."""
        raise NotImplementedError

    def preprocess(self, config: AdemVLConfig) -> Preprocess:
        raise NotImplementedError

    def features(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, S, S) pixels -> (B, 1 + P, C) tokens: [cls], then the patch grid."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records about the tower (see AdemVLModel's `base`)."""
        return {"vision_kind": self.kind, "vision_width": self.width, "vision_blocks": self.total_blocks,
                "image_size": self.module.config.image_size, "patches": self.side ** 2}


class ViTTower(Tower):
    """A CLIP or SigLIP ViT: [cls] (or SigLIP's patch mean) + patch tokens of hidden state `vision_layer`."""

    kind = "vit"

    def blocks(self) -> list[nn.Module]:
        return list(self.module.encoder.layers)

    def truncate(self, vision_layer: int) -> int:
        return truncate_tower(self.module, vision_layer)

    def block_widths(self) -> list[int]:
        return [self.module.config.hidden_size] * len(self.blocks())

    def hook_adapter(self, block: nn.Module, adapter: VisionAdapter) -> None:
        block.mlp.register_forward_hook(adapter.mlp_hook)  # beside the block's MLP, as the released code

    @property
    def width(self) -> int:
        return self.module.config.hidden_size

    @property
    def side(self) -> int:
        return self.module.config.image_size // self.module.config.patch_size

    def preprocess(self, config: AdemVLConfig) -> Preprocess:
        """The released code's: the tower's image size, the config's mean/std (ImageNet by default)."""
        return Preprocess(self.module.config.image_size, config.image_mean, config.image_std)

    def features(self, pixel_values: Tensor) -> Tensor:
        return tower_features(self.module, pixel_values)


class GridTower(Tower):
    """A CNN with a spatial feature map (transformers' MobileNetV2Model).

    Blocks, in the order they run: the stem, the 16 inverted-residual blocks, the final 1x1 conv
    (18 in all; `vision_layer` counts from the end as for a ViT, -1 = the 1280-wide last map).
    The read block's map (B, C, H, W) flattened row by row is the patch grid (B, H*W, C), its
    global average the [cls] feature. The blocks after the read one are dropped and never run.
    """

    kind = "grid"

    def blocks(self) -> list[nn.Module]:
        m = self.module
        return [m.conv_stem, *m.layer] + ([m.conv_1x1] if m.conv_1x1 is not None else [])

    def truncate(self, vision_layer: int) -> int:
        m, total = self.module, len(self.blocks())
        n = blocks_to_run(total, vision_layer)
        m.layer = nn.ModuleList(list(m.layer)[: n - 1])  # block 0 is the stem
        if n < total and m.conv_1x1 is not None:
            m.conv_1x1 = None  # the last block (1x1 conv to 1280): not read, never runs
        m.pooler = None  # the global average is taken by features(), of the read map
        return n

    @staticmethod
    def _convs(block: nn.Module) -> list[nn.Conv2d]:
        return [c for c in block.modules() if isinstance(c, nn.Conv2d)]  # registered in the order they run

    def block_widths(self) -> list[int]:
        return [self._convs(b)[-1].out_channels for b in self.blocks()]

    def hook_adapter(self, block: nn.Module, adapter: VisionAdapter) -> None:
        block.register_forward_hook(adapter.map_hook)

    @property
    def width(self) -> int:
        return self.block_widths()[-1]

    @property
    def side(self) -> int:
        """The read map's side: every conv's output size, from the input size (square inputs)."""
        side = self.module.config.image_size
        for block in self.blocks():
            for conv in self._convs(block):
                if getattr(self.module.config, "tf_padding", False):  # TF "same" padding
                    side = math.ceil(side / conv.stride[0])
                else:
                    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
                    side = (side + 2 * p - d * (k - 1) - 1) // s + 1
        return side

    def preprocess(self, config: AdemVLConfig) -> Preprocess:
        """The backbone's own normalisation (its config's image_mean / image_std) where it names one."""
        cfg = self.module.config
        mean = tuple(getattr(cfg, "image_mean", None) or config.image_mean)
        std = tuple(getattr(cfg, "image_std", None) or config.image_std)
        return Preprocess(cfg.image_size, mean, std)

    def features(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values
        for block in self.blocks():
            x = block(x)  # (B, C_i, H_i, W_i); adapters act through their hooks
        grid = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1)  # (B, 1 + P, C)


def make_tower(module: nn.Module) -> Tower:
    """The Tower implementation for a Hugging Face vision module, by its config type."""
    model_type = getattr(getattr(module, "config", None), "model_type", "")
    if "clip" in model_type or "siglip" in model_type:
        return ViTTower(module)
    if model_type == "mobilenet_v2":
        return GridTower(module)
    raise ValueError(f"vision tower of type {model_type!r} is not supported; use a CLIP or SigLIP vision model "
                     "or a MobileNetV2 (transformers' MobileNetV2Model)")
