"""The tower interface with a CNN grid tower (a tiny random MobileNetV2): tokens, adapters, scales, preprocessing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ademvl import AdemVLConfig, AdemVLModel, CheckpointMismatch
from ademvl.cli import main
from ademvl.hub import load_vision
from ademvl.vision import GridTower, ViTTower, make_tower

from .conftest import perturb, samples

GRID = dict(llm="random:tiny-llama", vision="random:tiny-mobilenet", scales=(16, 4))  # 128 px -> a 4x4 last map
# tiny-mobilenet's block widths (stem, 16 inverted residuals, last 1x1 conv), widths x 0.25
WIDTHS = [8, 8, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 40, 40, 40, 80, 320]


def grid_model(**overrides) -> AdemVLModel:
    torch.manual_seed(0)
    return AdemVLModel.build(AdemVLConfig(**{**GRID, **overrides}))


def test_make_tower_picks_the_implementation_by_config_type() -> None:
    assert isinstance(make_tower(load_vision("random:tiny-clip")), ViTTower)
    assert isinstance(make_tower(load_vision("random:tiny-siglip")), ViTTower)
    assert isinstance(make_tower(load_vision("random:tiny-mobilenet")), GridTower)


def test_grid_tower_runs_the_blocks_up_to_the_read_one_only() -> None:
    model = grid_model()  # vision_layer -2: the 16th inverted residual (80 wide), the last 1x1 conv dropped
    tower = model.tower
    assert tower.block_widths() == WIDTHS[:17] and tower.total_blocks == 18
    assert len(model.vision.layer) == 16 and model.vision.conv_1x1 is None
    assert (tower.width, tower.side) == (80, 4)
    assert model.parameter_groups()["vision_adapters"] == sum(2 * w * 12 for w in WIDTHS[:17])


def test_grid_tokens_are_the_flattened_map_and_its_mean() -> None:
    """[cls] = global average, patches = the read map row by row, from an untouched full backbone."""
    model = grid_model()
    px = model.processor(samples())["pixel_values"][[0, 2]]
    full = load_vision("random:tiny-mobilenet").eval()  # same seed, all 18 blocks; BatchNorm on its statistics
    with torch.no_grad():
        fmap = full(pixel_values=px, output_hidden_states=True).hidden_states[-1]  # (2, 80, 4, 4): 16th block
        feats = model.tower.features(px)  # (2, 1 + 16, 80)
    assert feats.shape == (2, 17, 80)
    torch.testing.assert_close(feats[:, 1:], fmap.permute(0, 2, 3, 1).reshape(2, 16, 80))
    torch.testing.assert_close(feats[:, 0], fmap.mean(dim=(2, 3)))


def test_grid_adapter_adds_a_per_position_bottleneck_to_each_block_output() -> None:
    model = grid_model(vision_layer=-17)  # stem + first inverted residual: 2 blocks, 2 adapters
    perturb(model)
    model.eval()
    px = model.processor(samples())["pixel_values"][:1]
    full = load_vision("random:tiny-mobilenet").eval()  # the same blocks, without hooks

    def adapted(y: torch.Tensor, adapter) -> torch.Tensor:  # y + 0.1 * up(gelu(down(y))) at every position
        y = y.permute(0, 2, 3, 1)  # (1, H, W, C)
        return (y + 0.1 * adapter.up(F.gelu(adapter.down(y)))).permute(0, 3, 1, 2)

    with torch.no_grad():
        y = adapted(full.conv_stem(px), model.vision_adapters[0])
        y = adapted(full.layer[0](y), model.vision_adapters[1])  # (1, 8, 32, 32)
        torch.testing.assert_close(model.tower.features(px)[:, 1:], y.flatten(2).transpose(1, 2))


def test_grid_adapters_start_as_identity() -> None:
    model = grid_model()
    px = model.processor(samples())["pixel_values"][:1]
    full = load_vision("random:tiny-mobilenet").eval()
    with torch.no_grad():
        fmap = full(pixel_values=px, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(model.tower.features(px)[:, 1:], fmap.flatten(2).transpose(1, 2))


def test_grid_tower_trains_its_adapters_and_nothing_of_the_backbone() -> None:
    model = grid_model()
    perturb(model)
    model.train()
    model(**model.processor(samples())).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision_adapters.parameters())
    assert all(p.grad is None for p in model.vision.parameters())


def test_scales_must_fit_the_grid_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match=r"scales: 64 asks for a 8x8 grid, but the tower random:tiny-mobilenet gives "
                                         r"a 4x4 grid \(16 patch tokens\); choose square sizes up to 16 \(e.g. 16, 9, 4, 1\)"):
        grid_model(scales=(64,))


def test_any_square_scale_the_grid_allows() -> None:
    model = grid_model(scales=(16, 9, 1))  # 4x4, an adaptive 3x3 pooling, the global mean
    batch = model.processor(samples())
    keys, _, _ = model.encode_images(batch["pixel_values"], batch["image_mask"])
    assert keys.shape == (3, 26, 64)


def test_preprocessing_is_the_towers_own_and_recorded_in_the_checkpoint(tmp_path) -> None:
    model = grid_model()
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((ckpt / "ademvl_config.json").read_text())["base"]
    assert saved["preprocess"] == {"size": 128, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                   "resize": "bicubic"}
    assert (saved["vision_kind"], saved["patches"]) == ("grid", 16)
    assert model.processor(samples())["pixel_values"].shape == (3, 3, 128, 128)


def test_checkpoint_refuses_other_preprocessing(tmp_path) -> None:
    ckpt = grid_model().save_pretrained(tmp_path / "ckpt")
    path = ckpt / "ademvl_config.json"
    cfg = json.loads(path.read_text())
    cfg["base"]["preprocess"]["size"] = 224
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatch, match="the image preprocessing differs"):
        AdemVLModel.from_pretrained(ckpt)


def test_params_command_counts_the_mobilenet_tower(capsys) -> None:
    assert main(["params", "--llm-config", "smollm2-135m-instruct", "--vision-config", "mobilenet-v2",
                 "--vision-layer", "-6", "--scales", "196", "49"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    widths = [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96]  # the 13 blocks up to the stride-16 stage
    d, c, n = 576, 96, 196 + 49
    expected = sum(2 * w * 12 for w in widths) + 2 * ((c * 128 + 128) + (128 * d + d)) + 2 * n * d
    assert "13 of 18 blocks run (frozen), a 14x14 grid at 224 px" in lines[0]
    assert lines[-1] == f"trainable: {expected}" and not any(line.startswith("released code") for line in lines)


def test_params_command_counts_the_demo_without_vision_adapters(capsys) -> None:
    """The demo's setting (block 6, adapter_dim 0): projectors and position tables only."""
    assert main(["params", "--vision-config", "mobilenet-v2", "--vision-layer", "-12", "--scales", "196", "49",
                 "--adapter-dim", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    d, c, n = 576, 64, 196 + 49
    assert lines[-1] == f"trainable: {2 * ((c * 128 + 128) + (128 * d + d)) + 2 * n * d}" == "trainable: 447488"
    assert not any("vision_adapters" in line for line in lines)
