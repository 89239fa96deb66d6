"""The config object, `ademvl params` at the paper's shapes, and gradient checkpointing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ademvl import AdemVLConfig
from ademvl.cli import main
from ademvl.model import decoder_layers

from .conftest import perturb, samples, tiny_model


def test_defaults_are_the_papers() -> None:
    c = AdemVLConfig()
    assert (c.scales, c.pooling, c.hidden_proj, c.alpha, c.beta, c.drop_ratio, c.qk_act) == ((256, 64), "avg", 128, 0.1, 0.01, 0.1, "silu")
    assert (c.adapter_dim, c.adapter_scale, c.use_cls, c.vision_layer) == (12, 0.1, True, -2)
    assert (c.image_prefix, c.no_image_prefix, c.num_visual_tokens) == ("Image: ", "Image: N/A", 320)


def test_json_roundtrip_and_unknown_keys(tmp_path) -> None:
    c = AdemVLConfig(scales=(256,), pooling="max", qk_act="elu")
    c.save(tmp_path)
    assert AdemVLConfig.load(tmp_path) == c
    with pytest.raises(ValueError, match=r"unknown AdemVLConfig key\(s\) \['alpah'\]; valid keys: llm, vision"):
        AdemVLConfig.from_dict({"alpah": 0.2})
    (tmp_path / "ademvl_config.json").write_text(json.dumps({"drop_ratio": 1.5}))
    with pytest.raises(ValueError, match=r"ademvl_config.json: bad ADEM-VL config: drop_ratio=1.5"):
        AdemVLConfig.load(tmp_path)


@pytest.mark.parametrize("bad,match", [({"qk_act": "tanh"}, "choose one of silu, none"), ({"scales": (50,)}, "not a square"),
                                       ({"pooling": "sum"}, "avg, max"), ({"vision_layer": 3}, "negative index")])
def test_bad_values_are_named(bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        AdemVLConfig(**bad)


@pytest.mark.parametrize("llm,total,released", [("llama-7b", 4505856, 4530432), ("llama-13b", 5425408, 5449984),
                                                ("llama2-7b", 4505856, 4530432)])
def test_params_command_prints_the_papers_counts(capsys, llm: str, total: int, released: int) -> None:
    assert main(["params", "--llm-config", llm, "--vision-config", "clip-vit-large-patch14"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"trainable: {total}"
    assert any(line.startswith(f"released code: {released} ") for line in lines)
    assert any(line.split() == ["vision_adapters", "565,248"] for line in lines)


def test_params_reads_config_json(tmp_path, capsys) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                                "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000}))
    assert main(["params", "--llm-config", str(path), "--vision-config", "clip-vit-large-patch14"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "trainable: 4505856"


def test_console_script_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "ademvl", "params", "--llm-config", "llama-13b",
                          "--vision-config", "clip-vit-large-patch14"], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "trainable: 5425408"


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for ckpt in (False, True):
        model = tiny_model()
        perturb(model)
        model.train()
        for m in model.vision_adapters:
            m.dropout.p = 0.0
        if ckpt:
            model.gradient_checkpointing_enable()
        calls = []  # forward runs of layer 0's input norm: a recomputation in backward runs it again
        decoder_layers(model.llm)[0].input_layernorm.register_forward_hook(lambda m, a, o: calls.append(1))
        model(**model.processor(samples())).loss.backward()
        assert len(calls) == (2 if ckpt else 1)
        grads.append({k: p.grad.clone() for k, p in model.trainable_state_dict().items()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


def test_generate_command_answers_about_an_image_file(tmp_path, capsys) -> None:
    from PIL import Image

    model = tiny_model()
    perturb(model)
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    Image.new("RGB", (80, 60), (0, 128, 0)).save(tmp_path / "green.png")
    expected = model.answer([Image.open(tmp_path / "green.png")], ["What color?"], max_new_tokens=5, do_sample=False)[0]
    args = ["generate", "--checkpoint", str(ckpt), "--prompt", "What color?", "--max-new-tokens", "5"]
    assert main(args + ["--image", str(tmp_path / "green.png")]) == 0
    assert capsys.readouterr().out.strip() == expected
    assert main(args + ["--image", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert "missing.png: image file not found; check the --image path" in err and "Traceback" not in err
