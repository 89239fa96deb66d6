"""Past one device's memory: shard the frozen LLM across the processes of a training run.

`train.sharding` picks the engine (ademvl/recipes/train.py wires it):

    none             data parallel (DDP): every rank holds the whole model
    fsdp             torch FSDP2 (`fully_shard`): every parameter, frozen or not, lives 1/N on each rank
    deepspeed-zero2  DeepSpeed ZeRO-2 through Accelerate: the trainable weights' gradients and optimizer
                     state are split; the frozen LLM stays whole on every rank
    deepspeed-zero3  DeepSpeed ZeRO-3 through Accelerate: parameters split too

FSDP2 here: each decoder layer is its own group (gathered just before it runs, freed after),
then the whole AdemVLModel is the root group (embeddings, LM head, vision tower and ADEM-VL's
own weights, gathered for the forward). This is what Accelerate's FSDP2 plugin does on GPUs,
and Accelerate does not apply it on CPUs (it falls back to DDP there without a word), so the
recipe calls `shard_fsdp` itself unless Accelerate already has. Either way the trainable
parameters are DTensors, so everything that reads them whole goes through this module:
`full_trainable_state` (checkpoint, checksum) and `optimizer_state` / `load_optimizer_state`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

def zero_stage(sharding: str) -> int | None:
    """The ZeRO stage of a deepspeed-zeroN sharding, None for the others."""
    return int(sharding[-1]) if sharding.startswith("deepspeed-zero") else None


def launcher_asks(env: dict[str, str] | None = None) -> str | None:
    """The engine an `accelerate launch --config_file` asked for (its environment), or None."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    return None


def check_launch(sharding: str, world: int, accelerate_engine: str | None, asked: str | None,
                 fsdp_version: int | None = None) -> None:
    """Refuse a launch that would train without the sharding asked for, and say what to do.

    accelerate_engine: "fsdp" / "deepspeed" when the Accelerator runs that engine itself, else None.
    asked: what the launcher's config asked for (`launcher_asks`). fsdp_version: of Accelerate's plugin.
    """
    if sharding != "none" and world < 2:
        raise ValueError(f"train.sharding={sharding} needs 2 or more processes (this run has 1): launch with "
                         "`torchrun --nproc_per_node N -m ademvl train ...` or `accelerate launch`, "
                         "or use --train.sharding none")
    if asked and accelerate_engine is None and sharding == "none":
        # Accelerate applies FSDP / DeepSpeed only on accelerators; on CPUs it silently runs DDP.
        raise ValueError(f"the Accelerate config asks for {asked}, which Accelerate does not apply on this "
                         f"machine (it would train plain data parallel, the whole model on every rank); pass "
                         f"--train.sharding {'fsdp' if asked == 'fsdp' else 'deepspeed-zero2 (or -zero3)'} "
                         "so that ademvl shards the model itself, or launch without that config")
    engine = "deepspeed" if zero_stage(sharding) else (None if sharding == "none" else "fsdp")
    if accelerate_engine and engine and accelerate_engine != engine:
        raise ValueError(f"train.sharding={sharding}, but the Accelerate config runs {accelerate_engine}: "
                         "use one of the two (drop --train.sharding, or launch without that config)")
    if engine == "deepspeed" and accelerate_engine != "deepspeed":
        raise ValueError(f"train.sharding={sharding}, but DeepSpeed did not start (an Accelerate config with "
                         "use_cpu: true turns it off): launch with torchrun, or with a config without use_cpu")
    if sharding == "deepspeed-zero3":
        # Measured (2 CPU processes, DeepSpeed 0.19.8): both ranks hang before the first step, even
        # with every sample holding an image; not yet understood, so refused rather than left to hang.
        raise ValueError("train.sharding=deepspeed-zero3 is not supported yet (it hangs before the first step "
                         "here); use --train.sharding fsdp, which shards the frozen LLM's parameters the same way")
    if accelerate_engine == "fsdp" and fsdp_version != 2:
        raise ValueError(f"the Accelerate config runs FSDP version {fsdp_version}; ademvl needs fsdp_version: 2 "
                         "(ademvl/configs/accelerate/fsdp.yaml)")


def deepspeed_plugin(stage: int, train: Any) -> Any:
    """Accelerate's DeepSpeed plugin for ZeRO `stage` from the train settings (no config file needed)."""
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=train.grad_accum,
                           gradient_clipping=train.clip_grad or 0.0, zero3_save_16bit_model=False)


def process_group_kwargs(stage: int | None) -> list[Any]:
    """DeepSpeed on CPU processes: Accelerate finds no backend for a CPU it is not told to use
    (cpu=True would turn DeepSpeed off), so it is told gloo."""
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")] if stage and not torch.accelerator.is_available() else []


def fit_deepspeed_config(plugin: Any, train: Any) -> None:
    """What DeepSpeed needs before `prepare` and the recipe does not give it: the micro-batch size
    (Accelerate reads it off a prepared DataLoader, which the recipe's step-addressed one is not).
    The accumulation steps must be train.grad_accum: DeepSpeed steps the optimizer by them."""
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = train.batch_size
    accum = config.get("gradient_accumulation_steps", "auto")
    if accum not in ("auto", train.grad_accum):
        raise ValueError(f"the DeepSpeed config has gradient_accumulation_steps {accum}, train.grad_accum is "
                         f"{train.grad_accum}: make them equal (--train.grad_accum {accum})")
    config["gradient_accumulation_steps"] = train.grad_accum
    if train.clip_grad and config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = train.clip_grad


def shard_fsdp(model: nn.Module, layers: nn.ModuleList, device_type: str, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 in place: each decoder layer a group, then the whole model as the root group.

    Ranks whose batch has no image leave the vision side without a gradient while others do;
    `set_reduce_scatter_unused_params` sends zeros for those, so every rank joins the same
    reduce-scatter (DDP needs the recipe's zero term for the same reason).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.set_reduce_scatter_unused_params(True)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter is a DTensor (FSDP2, ours or Accelerate's)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters as whole CPU tensors, by name. Sharded: a collective, every rank calls it."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in named):  # ZeRO-3: each rank holds a partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {k: p.detach().to("cpu").clone() for k, p in named}
    return {k: (p.full_tensor() if isinstance(p, DTensor) else p).detach().to("cpu").contiguous() for k, p in named}


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """torch's clip_grad_norm_ over DTensor gradients: the norm of the whole gradient, the same on every rank."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # the shards' partial norms, combined
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def local_bytes(module: nn.Module) -> int:
    """Bytes of parameter data this rank holds: its shard of each DTensor (FSDP2) or ZeRO-3 partition."""
    def held(p: Tensor) -> Tensor:
        return p.to_local() if isinstance(p, DTensor) else getattr(p, "ds_tensor", p)

    return sum(held(p).nbytes for p in module.parameters())


def optimizer_state(sharding: str, model: nn.Module, optimizer: Any) -> Any:
    """What trainer_state.pt holds as the optimizer state (a collective when sharded; rank 0's is whole).

    none: torch's state_dict. fsdp: whole tensors keyed by parameter name (torch.distributed.checkpoint).
    deepspeed: the list of every rank's partition, in rank order, which ZeRO's load_state_dict takes.
    optimizer: Accelerate's wrapper (DeepSpeed's ZeRO optimizer inside it), or the torch one for fsdp.
    """
    if sharding == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if zero_stage(sharding):
        from accelerate.utils import gather_object

        return gather_object([optimizer.state_dict()])
    return optimizer.state_dict()


def load_optimizer_state(sharding: str, model: nn.Module, optimizer: Any, state: Any) -> None:
    """Inverse of `optimizer_state`: every rank reads the whole saved state and keeps its part."""
    if sharding == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    elif zero_stage(sharding):
        # The fp32 master weights from the checkpoint, not from the (possibly 16-bit) model.
        optimizer.optimizer.load_state_dict(state, load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(state)
