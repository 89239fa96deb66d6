"""The demo on the pretrained CNN tower: the report says which tower ran; another tower drops its read settings."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from ademvl.cli import main
from ademvl.recipes.demo import REPO_CONFIG, tower_settings

TINY_LLM = ["--model.llm", "random:tiny-llama", "--train.max_steps", "2", "--train.batch_size", "4",
            "--train.save_every", "2"]


def test_demo_report_names_the_pretrained_cnn_tower(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--task", "shapes", "--out", str(out), "--n", "50", "--batch-size", "8", *TINY_LLM]) == 0  # demo.yaml's tower
    assert "vision tower: embedded:mobilenet-v2 (ImageNet-1k pretrained CNN (MobileNetV2), frozen; not CLIP)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["vision"] == "embedded:mobilenet-v2"
    saved = json.loads((out / "checkpoint" / "ademvl_config.json").read_text())
    assert (saved["vision_layer"], saved["scales"], saved["base"]["patches"]) == (-12, [196, 49], 196)
    weights = load_file(out / "checkpoint" / "adapter.safetensors")
    assert saved["adapter_dim"] == 0 and not any(k.startswith("vision_adapters.") for k in weights)  # none for the CNN
    md = (out / "report.md").read_text()
    assert "ImageNet-1k MobileNetV2, a CNN** (pretrained, frozen" in md and "**not CLIP**" in md


def test_another_tower_falls_back_to_the_papers_read_settings() -> None:
    cfg = tower_settings(REPO_CONFIG, ["--model.vision", "embedded:demo-clip"])
    assert cfg.model.vision == "embedded:demo-clip"
    assert (cfg.model.vision_layer, cfg.model.scales, cfg.model.adapter_dim) == (-2, (256, 64), 12)  # the paper's
    cnn = tower_settings(REPO_CONFIG, [])
    assert (cnn.model.vision_layer, cnn.model.scales, cnn.model.adapter_dim) == (-12, (196, 49), 0)  # demo.yaml's


def test_tower_settings_given_on_the_command_line_are_kept() -> None:
    cfg = tower_settings(REPO_CONFIG, ["--model.vision", "random:tiny-clip", "--model.scales", "[16, 4]"])
    assert cfg.model.scales == (16, 4) and cfg.model.vision_layer == -2
