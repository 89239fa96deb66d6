"""ADEM-VL around an unmodified Hugging Face causal LM and vision tower (ADEM-VL.md, steps 1-7).

The base models are frozen and untouched: the method enters through forward hooks on each
vision block (adapters, where the tower interface says: beside a ViT block's MLP, on a CNN
block's output) and each decoder layer's MLP (fusion), and through the input embeddings (one
[cls] token). The vision side is reached only through `ademvl.vision.Tower`, so a new kind of
backbone is a new Tower, not a change here. Everything trainable lives in this module:

    vision_adapters   step 1   one bottleneck per vision block that runs
    proj              step 3   V (C) -> Xv (d), low rank
    pos_k, pos_v      step 4   position tables shared by all layers
    cls_proj          step 5   [cls] (C) -> one input embedding
    input_proj        Table X  (ablation only) pooled patches (C) -> input embeddings, LLaVA-style
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from . import hub
from .config import AdemVLConfig
from .data import IMAGE_TOKEN_ID, AdemProcessor
from .files import InputError, atomic_directory, first_line, read_safetensors
from .fusion import Fusion, VisualMemory, fuse_memvp_form
from .sharding import is_sharded
from .vision import Tower, check_scales, make_adapters, make_tower, multiscale

WEIGHTS_NAME = "adapter.safetensors"


class CheckpointMismatch(InputError):
    """The checkpoint was made for other base models."""


class Projector(nn.Module):
    """fc2(silu(fc1(x))): C -> hidden_proj -> d; Xavier weights, zero biases (step 3)."""

    def __init__(self, c: int, hidden: int, d: int, zero_out: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, d)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        if zero_out:
            nn.init.zeros_(self.fc2.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nn.functional.silu(self.fc1(x)))


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a LLaMA/Mistral/Qwen2-style model (each with an `.mlp`)."""
    layers = getattr(llm.get_decoder(), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise TypeError(f"{type(llm).__name__}: expected decoder layers with an `.mlp` (LLaMA, Mistral, Qwen2 layout)")
    return layers


class AdemVLModel(nn.Module):
    """A frozen LLM that sees through ADEM-VL. Use `from_pretrained` / `build` to make one."""

    def __init__(self, llm: nn.Module, vision: nn.Module, config: AdemVLConfig, tokenizer: Any = None,
                 fusion: Fusion | None = None) -> None:
        """fusion: None for ADEM-VL's own; a baseline's (ademvl.bench.baselines) for benchmarks."""
        super().__init__()
        # Our own copy: the base description filled in below belongs to this model, not the caller.
        self.config = config = dataclasses.replace(config)
        self.llm, self.vision, self.tokenizer = llm, vision, tokenizer
        llm.requires_grad_(False)
        vision.requires_grad_(False)
        self.tower: Tower = make_tower(vision)  # what runs, where adapters hook, which tokens come out
        self.tower.truncate(config.vision_layer)  # the blocks after the one we read never run
        check_scales(config.scales + ((config.input_tokens,) if config.input_tokens else ()), self.tower.side, config.vision)

        d, c = llm.config.hidden_size, self.tower.width
        n = config.num_visual_tokens
        dev = next(llm.parameters()).device
        with torch.device(dev):
            self.vision_adapters = make_adapters(self.tower, config)
            self.proj = Projector(c, config.hidden_proj, d, config.proj_zero_init)
            self.cls_proj = Projector(c, config.hidden_proj, d, config.proj_zero_init) if config.use_cls else None
            self.input_proj = Projector(c, config.hidden_proj, d, config.proj_zero_init) if config.input_tokens else None
            self.pos_k = nn.Parameter(torch.randn(n, d) * 0.02)  # (N, d), E_k
            self.pos_v = nn.Parameter(torch.zeros(n, d))  # (N, d), E_v
        if fusion is None and config.fusion_form == "memvp":
            fusion = fuse_memvp_form  # Table VI's baseline: the nonlinearity on the scores
        self.memory = VisualMemory(config.alpha, config.drop_ratio, config.qk_act, fusion)

        for block, adapter in zip(self.tower.blocks(), self.vision_adapters):
            self.tower.hook_adapter(block, adapter)
        for layer in decoder_layers(llm):
            self.memory.attach(layer, config.query_from, config.add_to)

        self.preprocess = self.tower.preprocess(config)  # the pixels the tower sees, recorded below
        config.base = {
            "llm": config.llm, "llm_type": llm.config.model_type, "hidden_size": d,
            "num_layers": len(decoder_layers(llm)), "vocab_size": llm.config.vocab_size,
            "vision": config.vision, **self.tower.describe(), "preprocess": self.preprocess.to_dict(),
        }
        if dev.type != "meta" and (config.vision == hub.EMBEDDED_VISION or config.vision.startswith("random:")):
            config.base["vision_fingerprint"] = hub.fingerprint(vision)
        self.train(False)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def build(cls, config: AdemVLConfig | None = None, dtype: torch.dtype = torch.float32) -> "AdemVLModel":
        """Load config.llm and config.vision (names as in ademvl.hub) and wrap them."""
        config = config or AdemVLConfig()
        llm = hub.load_llm(config.llm, dtype=dtype)
        vision = hub.load_vision(config.vision, dtype=dtype)
        return cls(llm, vision, config, hub.load_tokenizer(config.llm))

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, llm: str | None = None, vision: str | None = None,
                        dtype: torch.dtype = torch.float32) -> "AdemVLModel":
        """Rebuild the base models named in the checkpoint (or `llm`/`vision`) and load the weights."""
        config = AdemVLConfig.load(checkpoint)
        saved = dict(config.base)
        config = config.replace(llm=llm or config.llm, vision=vision or config.vision, base={})
        try:
            model = cls.build(config, dtype=dtype)
        except OSError as e:  # transformers: not a local directory, not on the hub (or no network)
            if isinstance(e, InputError):
                raise
            raise InputError(checkpoint, f"its base models {config.llm} + {config.vision} cannot be loaded "
                                         f"({first_line(e)})",
                             "make them available locally, or pass --llm / --vision") from None
        model.load_adapter(checkpoint, expected_base=saved)
        return model

    @property
    def processor(self) -> AdemProcessor:
        if self.tokenizer is None:
            raise ValueError("this model was built without a tokenizer; pass one to AdemVLModel(...)")
        if getattr(self, "_processor", None) is None:
            self._processor = AdemProcessor(self.tokenizer, self.config, self.preprocess)
        return self._processor

    # ---- what trains ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "AdemVLModel":
        super().train(mode)
        self.llm.eval()  # frozen: no dropout in the base models, ever
        self.vision.eval()
        if mode and self._checkpointing:
            # transformers recomputes a layer in backward only while that layer is in training mode;
            # flag the decoder layers alone (not their submodules), so no dropout switches on.
            for layer in decoder_layers(self.llm):
                layer.training = True
        return self

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: p for k, p in self.named_parameters() if p.requires_grad}

    def parameter_groups(self) -> dict[str, int]:
        """Trainable parameter counts by group (the paper's "What trains")."""
        groups: dict[str, int] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                key = name.split(".")[0]
                groups[key] = groups.get(key, 0) + p.numel()
        return groups

    def num_trainable(self) -> int:
        return sum(self.parameter_groups().values())

    def gradient_checkpointing_enable(self) -> None:
        """Recompute the frozen LLM layers in backward; the recomputation holds the memory its forward held."""
        kwargs = {"use_reentrant": False, "context_fn": self.memory.checkpoint_contexts}
        if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self._checkpointing = True
        self.train(self.training)

    _checkpointing = False

    # ---- forward ----------------------------------------------------------------------------
    def encode_images(self, pixel_values: Tensor | None, image_mask: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Steps 1-5: keys (B, N, d), values (B, N, d) and the input embeddings of each image sample
        (n_img, S, d): its [cls] (step 5), then `input_tokens` pooled patch tokens (Table X); None when S = 0.

        Only the samples with an image run through the tower. The image indicator multiplies Xv
        (step 3), so a sample without an image gets no visual signal; the position tables still
        act on it (K = E_k, V = E_v), as in the released code, which gives the no-image path
        ("Image: N/A") trainable weights of its own.
        """
        device = self.pos_k.device
        b, d, dtype = image_mask.shape[0], self.pos_k.shape[1], self.pos_k.dtype
        image_mask = image_mask.to(device).bool()
        xv = torch.zeros(b, self.config.num_visual_tokens, d, device=device, dtype=dtype)  # (B, N, d)
        slots = None
        if image_mask.any():
            px = pixel_values[image_mask.to(pixel_values.device)].to(next(self.vision.parameters()).dtype)
            feats = self.tower.features(px).to(dtype)  # (b, 1 + P, C)
            visual = multiscale(feats[:, 1:], self.config.scales, self.config.pooling)  # (b, N, C)
            xv = xv.index_put((image_mask.nonzero()[:, 0],), (self.proj(visual) * self.config.beta).to(dtype))  # (B, N, d)
            parts = [self.cls_proj(feats[:, :1])] if self.cls_proj is not None else []  # (b, 1, d)
            if self.input_proj is not None:
                tokens = multiscale(feats[:, 1:], (self.config.input_tokens,), self.config.pooling)  # (b, M, C)
                parts.append(self.input_proj(tokens))  # (b, M, d)
            slots = torch.cat(parts, dim=1).to(dtype) if parts else None  # (b, S, d)
        return xv + self.pos_k, xv + self.pos_v, slots  # K, V: (B, N, d) each

    @property
    def image_slots(self) -> int:
        """S: input positions an image sample fills after its prefix ([cls], then Table X's tokens)."""
        return int(self.config.use_cls) + self.config.input_tokens

    def embed(self, input_ids: Tensor, slots: Tensor | None, image_mask: Tensor | None = None) -> Tensor:
        """Input embeddings with each image sample's S placeholders replaced by its slots (n_img, S, d).

        image_mask (B,): which samples the slots belong to; an image sample whose layout has no
        placeholder then gets none (the released generate() can cut them away, released_protocol)."""
        placeholder = input_ids == IMAGE_TOKEN_ID  # (B, T)
        emb = self.llm.get_input_embeddings()(input_ids.clamp(min=0))  # (B, T, d)
        if placeholder.any():
            per_sample = placeholder.sum(1)  # (B,): 0 for a text-only sample, S for an image sample
            if slots is not None and image_mask is not None:
                slots = slots[per_sample[image_mask.to(per_sample.device).bool()] > 0]
            if slots is None or placeholder.sum() != slots.shape[0] * slots.shape[1] or \
                    ((per_sample != 0) & (per_sample != slots.shape[1])).any():
                raise ValueError(f"each sample with an image needs exactly {self.image_slots} image placeholder(s) "
                                 "(build inputs with model.processor)")
            emb = emb.index_put(placeholder.nonzero(as_tuple=True), slots.reshape(-1, slots.shape[-1]).to(emb.dtype))
        return emb

    def prepare(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                image_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The input embeddings (B, T, d) and this batch's visual keys and values (B, N, d) each,
        to hold around the LLM call: `with model.memory.holding(keys, values): model.llm(...)`.

        Every batch gets a memory, one without any image too: its samples read the tables alone.
        """
        if pixel_values is None or image_mask is None:
            image_mask = torch.zeros(input_ids.shape[0], dtype=torch.bool)  # a batch without images
        keys, values, slots = self.encode_images(pixel_values, image_mask)
        return self.embed(input_ids, slots, image_mask), keys, values

    def value_span(self) -> tuple[Tensor, Tensor] | None:
        """(E_v (N, d), [W2 | b2] (d, hidden_proj + 1)): V - E_v lies in the span of the projector's
        last layer (step 3), so a decode step reads V factored (fusion.LowRankValues). None off the CPU:
        on a GPU, reading V dense measured faster (H200, LLaMA-7B shape, batch 16: 5.6 against 8.9 ms per
        decode step of the fusion over 32 layers; docs/gpu.md), while on a CPU the factored read wins."""
        if self.pos_v.device.type != "cpu":
            return None
        fc2 = self.proj.fc2
        return self.pos_v.detach(), torch.cat([fc2.weight, fc2.bias[:, None]], dim=1).detach()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                image_mask: Tensor | None = None, labels: Tensor | None = None, loss_only: bool = False, **kwargs: Any):
        """Returns the LLM's CausalLMOutput; with labels, loss over the target tokens only.

        loss_only=True (training): the LM head runs only where a target token is predicted, not
        over the whole vocabulary at every position; the loss is the same, `logits` is None.
        """
        inputs_embeds, keys, values = self.prepare(input_ids, pixel_values, image_mask)
        with self.memory.holding(keys, values):
            if loss_only and labels is not None:
                return self._target_loss(inputs_embeds, attention_mask, labels, **kwargs)
            return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def _target_loss(self, inputs_embeds: Tensor, attention_mask: Tensor | None, labels: Tensor, **kwargs: Any):
        """Mean cross-entropy over the target tokens, with the LM head applied to those positions only."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        hidden = self.llm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs).last_hidden_state
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        keep = targets != -100
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep])  # (n_targets, vocab)
        loss = nn.functional.cross_entropy(logits.float(), targets[keep])
        return CausalLMOutputWithPast(loss=loss, logits=None)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                 image_mask: Tensor | None = None, **generate_kwargs: Any) -> Tensor:
        """transformers' generate() with the KV cache. Visual keys/values are made once per call.

        Returns only the new tokens (B * num_return_sequences, new). Use left padding.
        """
        if is_sharded(self):  # FSDP gathers parameters around forward(), and generate() is not forward()
            raise RuntimeError("this model is sharded over processes (train.sharding fsdp); generate from its saved "
                               "adapter in one process: AdemVLModel.from_pretrained(OUT/checkpoint), as ademvl eval does")
        inputs_embeds, keys, values = self.prepare(input_ids, pixel_values, image_mask)
        expand = generate_kwargs.get("num_beams", 1) * generate_kwargs.get("num_return_sequences", 1)
        generate_kwargs.setdefault("pad_token_id", self.processor.pad if self.tokenizer is not None else None)
        with self.memory.holding(keys, values, repeat=expand, value_span=self.value_span()):
            return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)

    def answer(self, images: list[Any], prompts: list[str], max_new_tokens: int = 32, **kwargs: Any) -> list[str]:
        """Convenience: free-text answers to prompts about images (None for no image)."""
        from .data import Sample

        samples = [Sample(str(i), img, [(p, "")]) for i, (img, p) in enumerate(zip(images, prompts))]
        batch = self.processor(samples, train=False)
        dev = self.pos_k.device
        batch = {k: v.to(dev) for k, v in batch.items() if k != "labels"}
        out = self.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    # ---- save / load ------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, state: dict[str, Tensor] | None = None) -> Path:
        """Write adapter.safetensors (trainable weights only) + ademvl_config.json, atomically.

        Files go to a temporary sibling directory first, which then replaces `directory` by
        rename: a crash mid-write never leaves a half-written checkpoint under the final name.
        """
        with atomic_directory(directory) as tmp:
            self.write_checkpoint(tmp, state)
        return Path(directory)

    def write_checkpoint(self, directory: Path, state: dict[str, Tensor] | None = None) -> None:
        """The two checkpoint files into an existing directory (save_pretrained makes this atomic).

        state: the trainable weights whole, when this model holds only a shard of them
        (ademvl.sharding.full_trainable_state); by default its own parameters.
        """
        if state is None:
            state = {k: v.detach().to("cpu").contiguous() for k, v in self.trainable_state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "ademvl": "1"})
        config_path = self.config.save(directory)
        # safetensors writes its file owner-only (0600); give it the umask's mode, like the config,
        # so a checkpoint on a shared disk is readable by whoever can read the run.
        shutil.copymode(config_path, directory / WEIGHTS_NAME)

    def load_adapter(self, checkpoint: str | Path, expected_base: dict[str, Any] | None = None) -> None:
        """Load trainable weights; names, shapes and base model must match, else a clear error."""
        checkpoint = Path(checkpoint)
        path = checkpoint / WEIGHTS_NAME
        if expected_base is None:
            expected_base = AdemVLConfig.load(checkpoint).base
        state = read_safetensors(path, "the checkpoint's ADEM-VL weights (trainable tensors only)",
                                 fix=f"a checkpoint directory holds {WEIGHTS_NAME} and ademvl_config.json (ademvl train writes both)")
        own = self.trainable_state_dict()
        problems = [f"missing {k}" for k in own if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in own]
        problems += [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                     for k, v in own.items() if k in state and state[k].shape != v.shape]
        differ, renamed = base_differences(expected_base, self.config.base)
        if problems or differ:
            found = differ + renamed + problems
            raise CheckpointMismatch(
                checkpoint, f"does not fit the base models built ({'; '.join(found[:6])}{' ...' if len(found) > 6 else ''}); "
                            f"checkpoint made for: {_describe(expected_base)}",
                f"load it onto the base it expects: --llm {expected_base.get('llm')} --vision {expected_base.get('vision')}")
        if renamed:
            warnings.warn(f"{checkpoint}: loading onto other base models of the same shape ({'; '.join(renamed)}); "
                          "expect other results than on the base it was trained on", stacklevel=2)
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k].to(v.device, v.dtype))


def _describe(base: dict[str, Any]) -> str:
    if not base:
        return "(unknown)"
    return (f"LLM {base.get('llm')} ({base.get('llm_type')}, d={base.get('hidden_size')}, {base.get('num_layers')} layers) + "
            f"vision {base.get('vision')} ({base.get('vision_kind', 'vit')}, width {base.get('vision_width')}, "
            f"{base.get('vision_blocks')} blocks, {base.get('image_size')} px)")


# Fields of the vision side besides the vision* ones (for a name field: which override renames it).
VISION_FIELDS = ("image_size", "patches", "preprocess", "tower", "grid")


def base_differences(saved: dict[str, Any], built: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(errors, warnings): every field of the recorded base description against the built one.

    A number (hidden_size, num_layers, vocab_size, vision_width, ...; fields added later too) is a
    size: one that differs is an error. Any other field names a model (llm, llm_type, vision, the
    random tower's fingerprint): one that differs is a warning when that side's model was renamed
    (an --llm / --vision override; a field of neither side: either override), else an error, as
    the same name now builds another model. Fields only one side records are not compared.
    """
    renamed = {"llm": saved.get("llm") != built.get("llm"), "vision": saved.get("vision") != built.get("vision")}
    errors, notes = [], []
    for key in [k for k in saved if k in built and saved[k] != built[k]]:
        side = ("vision" if key.startswith("vision") or key in VISION_FIELDS else
                "llm" if key.startswith("llm") else None)
        line = f"{key} {saved[key]} in the checkpoint, {built[key]} built"
        if key == "vision_fingerprint":
            line = f"the random vision tower's weights differ ({line})"
        elif key == "preprocess":
            line = f"the image preprocessing differs ({line})"
        is_size = isinstance(saved[key], (int, float)) and not isinstance(saved[key], bool)
        if not is_size and (renamed[side] if side else any(renamed.values())):
            notes.append(line)
        else:
            errors.append(line)
    return errors, notes


def build_meta(llm: str, vision: str, config: AdemVLConfig | None = None) -> AdemVLModel:
    """The model's shapes on the meta device: 7B/13B cost nothing (used by `ademvl params`)."""
    from transformers import AutoModelForCausalLM

    config = (config or AdemVLConfig()).replace(llm=llm, vision=vision)
    llm_cfg, vis_cfg = hub.shape_config(llm), hub.shape_config(vision)
    with torch.device("meta"):
        return AdemVLModel(AutoModelForCausalLM.from_config(llm_cfg), hub.vision_class(vis_cfg)(vis_cfg), config)
