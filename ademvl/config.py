"""Every setting in typed dataclasses: the method (AdemVLConfig, the paper's defaults), how to
train (TrainConfig), and a run (RunConfig = model + data + train sections of a YAML file).

AdemVLConfig is saved as `ademvl_config.json` next to the trainable weights, so a checkpoint says
exactly which method variant and which base models it belongs to.

Loading goes through OmegaConf structured configs: the dataclasses are the schema, so a YAML file,
a checkpoint's JSON and `section.key=value` overrides are all checked the same way (unknown keys
and wrong types are errors that name the key), with no hand-written parser. OmegaConf (the engine
under Hydra) was chosen over jsonargparse and tyro because it merges files and dotlist overrides
onto plain dataclasses without owning the CLI, and reads 9e-3 as a float (PyYAML does not).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from . import precision
from .files import InputError, InputNotFound, read_json, read_yaml

CONFIG_NAME = "ademvl_config.json"
QK_ACTIVATIONS = ("silu", "none", "relu", "elu", "softmax", "silu_positive")
POOLINGS = ("avg", "max")
FUSION_FORMS = ("cross_attention", "memvp")
# Table VII: where a decoder layer's fusion reads its query and adds its term, (query_from, add_to).
# "mhsa_input" is the attention's input (the normed h), "mlp_input" ffn_norm(h), "*_output" the module's output.
FUSION_POSITIONS = (("mhsa_input", "mhsa_input"), ("mhsa_input", "mhsa_output"), ("mhsa_output", "mhsa_output"),
                    ("mlp_input", "mlp_input"), ("mlp_input", "mlp_output"), ("mlp_output", "mlp_output"))
CONFIGS_DIR = Path(__file__).parent / "configs"  # shipped in the package: found by a non-editable install too
T = TypeVar("T")


def _dotted(e: OmegaConfBaseException) -> str:
    return getattr(e, "full_key", None) or getattr(e, "key", None) or "?"


def structured(cls: type[T], *sources: Any, what: str | None = None, where: str = "") -> T:
    """`cls` built from mappings / DictConfigs merged in order onto its defaults, type-checked.

    Unknown keys and values of the wrong type are a ValueError naming the key and listing the
    valid ones (a typo must not pass silently).
    """
    what = what or cls.__name__
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), *sources))
    except ConfigKeyError as e:
        key = _dotted(e)
        section, _, _ = key.rpartition(".")
        schema = _schema_at(cls, section)
        valid = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
        unknown = sorted({key.rpartition(".")[2]})
        raise InputError(f"{where}unknown {what} key(s) {unknown}{f' in {section}' if section else ''}; "
                         f"valid keys: {', '.join(valid)}") from None
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise InputError(f"{where}{what} {_dotted(e)}: {msg}") from None


def _schema_at(cls: type, dotted: str) -> type:
    """The dataclass of a dotted section ("train" -> TrainConfig); NoneType where there is none."""
    for part in filter(None, dotted.split(".")):
        f = {f.name: f for f in dataclasses.fields(cls)}.get(part)
        factory = f.default_factory if f is not None else dataclasses.MISSING
        if not dataclasses.is_dataclass(factory):
            return type(None)
        cls = factory
    return cls


@dataclass
class AdemVLConfig:
    """Settings of the method. Defaults are the released code's (ADEM-VL.md, "Training settings")."""

    # Base models: a Hugging Face id, a local directory, or an embedded default
    # ("embedded:smollm2-135m-instruct", "embedded:demo-clip"; see ademvl/hub.py).
    llm: str = "embedded:smollm2-135m-instruct"
    vision: str = "embedded:demo-clip"
    # Step 1: which hidden state of the vision tower to read; -2 = second to last block.
    # Blocks after it never run and are not built.
    vision_layer: int = -2
    # Step 1: bottleneck adapters beside every vision block's MLP that runs.
    adapter_dim: int = 12
    adapter_scale: float = 0.1
    adapter_dropout: float = 0.1
    # Step 2: multiscale visual prompt: number of tokens per scale (each a square grid size).
    scales: tuple[int, ...] = (256, 64)
    pooling: str = "avg"
    # Step 3: low-rank projector V -> Xv, scaled by beta.
    hidden_proj: int = 128
    beta: float = 0.01
    # Zero-initialise the projectors' last layer (not the paper's setting: the demo uses it so the
    # frozen LLM is undisturbed at step 0 even with a larger beta).
    proj_zero_init: bool = False
    # Step 5: one [cls] embedding after the image prefix.
    use_cls: bool = True
    image_prefix: str = "Image: "
    no_image_prefix: str = "Image: N/A"
    # Step 6: parameter-free cross-attention at every decoder layer's MLP.
    alpha: float = 0.1
    drop_ratio: float = 0.1
    qk_act: str = "silu"
    # The paper's ablations (docs/ablations.md); the defaults are ADEM-VL's own choices.
    # Table VI: "memvp" = alpha * act(h_n @ K^T) @ V, the nonlinearity on the scores (the build-up's baseline).
    fusion_form: str = "cross_attention"
    # Table VII: the query read at, and the fusion term added to, a module's input or output (FUSION_POSITIONS).
    query_from: str = "mlp_input"
    add_to: str = "mlp_output"
    # Table X: visual tokens also fed to the LLM as input tokens after the image prefix (LLaVA-style):
    # the patch grid pooled to this many (a square number; 0 = none), through a projector of their own.
    input_tokens: int = 0
    # Image preprocessing of the released code: bicubic resize, ImageNet mean/std.
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Longest tokenised sample; longer prompts are cut from the left, never the answer.
    max_length: int = 512
    # What the base models looked like when the checkpoint was made, filled in by the model
    # (used to refuse loading onto another base model with a clear message).
    base: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scales = tuple(int(s) for s in self.scales)
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        self.validate()

    def validate(self) -> None:
        """Fail early, naming the field and the allowed values."""
        if self.qk_act not in QK_ACTIVATIONS:
            raise ValueError(f"qk_act={self.qk_act!r}: choose one of {', '.join(QK_ACTIVATIONS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: choose one of {', '.join(POOLINGS)}")
        if self.fusion_form not in FUSION_FORMS:
            raise ValueError(f"fusion_form={self.fusion_form!r}: choose one of {', '.join(FUSION_FORMS)}")
        if (self.query_from, self.add_to) not in FUSION_POSITIONS:
            pairs = ", ".join(f"{q}/{a}" for q, a in FUSION_POSITIONS)
            raise ValueError(f"query_from={self.query_from!r}, add_to={self.add_to!r}: choose a pair of {pairs}")
        if self.input_tokens < 0 or math.isqrt(self.input_tokens) ** 2 != self.input_tokens:
            raise ValueError(f"input_tokens={self.input_tokens}: a square number of tokens (0, 16, 64, 256, ...)")
        if not self.scales:
            raise ValueError("scales must name at least one scale, e.g. (256, 64)")
        for s in self.scales:
            side = math.isqrt(s)
            if s <= 0 or side * side != s:
                raise ValueError(f"scales: {s} is not a square number of tokens (e.g. 256 = 16x16, 64 = 8x8)")
        if not 0.0 <= self.drop_ratio < 1.0:
            raise ValueError(f"drop_ratio={self.drop_ratio}: must be in [0, 1)")
        if self.vision_layer >= 0:
            raise ValueError(f"vision_layer={self.vision_layer}: use a negative index as in hidden_states (-2 = second to last)")
        if self.adapter_dim < 0 or self.hidden_proj <= 0:
            raise ValueError("adapter_dim must be >= 0 and hidden_proj > 0")

    @property
    def num_visual_tokens(self) -> int:
        return sum(self.scales)

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("scales", "image_mean", "image_std"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdemVLConfig":
        return structured(cls, d)

    def replace(self, **changes: Any) -> "AdemVLConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "AdemVLConfig":
        path = Path(directory)
        if not path.exists():
            raise InputNotFound(path, "checkpoint not found", f"pass a directory holding {CONFIG_NAME} and adapter.safetensors")
        if path.is_file() and path.suffix != ".json":  # e.g. adapter.safetensors itself
            raise InputError(path, "is a file; a checkpoint is the directory holding it",
                             f"pass its directory, {path.parent}")
        path = path / CONFIG_NAME if path.is_dir() else path
        d = read_json(path, f"the checkpoint's ADEM-VL config {{field: value}}", form=dict,
                      fix=f"a checkpoint directory holds {CONFIG_NAME} and adapter.safetensors (ademvl train writes both)")
        if not isinstance(d.get("base", {}), dict):
            raise InputError(path, f"base is a {type(d['base']).__name__}; expected the base models' description {{field: value}}")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise InputError(path, f"bad ADEM-VL config: {e}") from None


SHARDINGS = ("none", "fsdp", "deepspeed-zero2", "deepspeed-zero3")  # train.sharding (ademvl/sharding.py)


@dataclass
class TrainConfig:
    """How to train. lr = blr x total batch / 256 (the released code's rule) unless `lr` is set."""

    output_dir: str = "runs/train"
    batch_size: int = 8  # per process, per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    epochs: float = 20
    max_steps: int | None = None  # overrides epochs
    blr: float = 9e-3
    lr: float | None = None
    # Multiply the lr of a parameter group (vision_adapters, proj, cls_proj, pos_k, pos_v).
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.02  # on matrices; biases and other 1-d parameters get none (timm's rule, as released)
    # AdamW's (beta1, beta2). The paper configs set the released (0.9, 0.95); torch's default stays
    # for the rest, because the demo's measured results were made with it.
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 2
    warmup_steps: int | None = None  # overrides warmup_epochs
    min_lr: float = 0.0
    clip_grad: float | None = 1.0
    # auto | fp32 (= no) | bf16 | fp16. auto: bf16 on a GPU that supports it (else fp16), bf16 on a CPU
    # that computes in it (AVX512-BF16 / AMX / Arm BF16), fp32 on any other CPU (ademvl/precision.py)
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    # none (data parallel) | fsdp | deepspeed-zero2 | deepspeed-zero3: split the model over the
    # processes when it does not fit one device (ademvl/sharding.py, docs/training.md)
    sharding: str = "none"
    # Batches of like-length samples (sorted within runs of 50 batches, then shuffled): less padding
    # where the lengths differ a lot (the emoji demo: naming ~26 tokens, multiple choice ~50)
    group_by_length: bool = False
    num_workers: int = 2  # DataLoader processes that decode images and collate, beside the training loop
    seed: int = 0
    save_every: int = 500  # steps; the final checkpoint is always written
    keep_last: int = 3
    log_every: int = 1

    def __post_init__(self) -> None:
        try:
            self.mixed_precision = precision.normalize(self.mixed_precision)  # fp32 and a YAML `no` -> "no"
        except ValueError as e:
            raise ValueError(f"train.{e}") from None
        if self.sharding not in SHARDINGS:
            raise ValueError(f"train.sharding={self.sharding!r}: choose one of {', '.join(SHARDINGS)}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("train.batch_size and train.grad_accum must be >= 1")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas={list(self.betas)}: two numbers in [0, 1), e.g. [0.9, 0.95]")
        if self.num_workers < 0:
            raise ValueError(f"train.num_workers={self.num_workers}: must be >= 0 (0 = decode in the training loop)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return structured(cls, d, what="train setting")


@dataclass
class RunConfig:
    """A run: `model:` (AdemVLConfig), `data:` (task: NAME + that task's load_samples options), `train:`."""

    model: AdemVLConfig = field(default_factory=AdemVLConfig)
    data: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "data": dict(self.data), "train": dataclasses.asdict(self.train)}


def config_path(name: str | Path) -> Path:
    """A config file: a path, or the name of one shipped in the package (demo, tiny, scienceqa_llama7b, ...)."""
    path = Path(name)
    if path.exists():
        return path
    shipped = CONFIGS_DIR / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml") and len(path.parts) == 1 and shipped.exists():
        return shipped
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
    raise InputNotFound(path, "config file not found", f"a path, or a shipped config: {', '.join(names)}")


def overrides_to_dotlist(overrides: Iterable[str]) -> list[str]:
    """`--section.key value`, `--section.key=value` and `section.key=value` as OmegaConf dotlist items."""
    items, rest = [], list(overrides)
    while rest:
        arg = rest.pop(0)
        key = arg[2:] if arg.startswith("--") else arg
        if "=" not in key:
            if not arg.startswith("--") or not rest:
                raise InputError(f"override {arg!r}: write --section.key value or section.key=value, "
                                 "e.g. --train.batch_size 4")
            key = f"{key}={rest.pop(0)}"
        name = key.split("=", 1)[0]
        if name.split(".")[0] not in ("model", "data", "train") or "." not in name:
            raise InputError(f"override {arg!r}: the key must be model.X, data.X or train.X")
        items.append(key)
    return items


def load_run_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a YAML run config (path or shipped name) and apply overrides; everything type-checked."""
    path = config_path(path)
    raw = read_yaml(path, "a YAML run config with sections model:, data:, train:")
    if not isinstance(raw, DictConfig):
        raise InputError(path, "holds a list; expected sections model:, data:, train: (a mapping)")
    unknown = sorted(set(raw) - {"model", "data", "train"})
    if unknown:
        raise InputError(path, f"unknown section(s) {', '.join(unknown)}; valid: model, data, train")
    for section in ("model", "data", "train"):
        if section in raw and raw[section] is not None and not isinstance(raw[section], DictConfig):
            raise InputError(path, f"section {section}: is a {type(raw[section]).__name__}; expected a mapping of "
                                   f"keys under it ({section}: {{key: value}})")
    try:
        cli = OmegaConf.from_dotlist(overrides_to_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise InputError("overrides", str(e).splitlines()[0]) from None
    return structured(RunConfig, raw, cli, what="run config", where=f"{path}: ")
