"""Past one device's memory: shard the frozen LLM across the processes of a training run.

`train.sharding` picks the engine (ademvl/recipes/train.py wires it):

    none             data parallel (DDP): every rank holds the whole model
    fsdp             torch FSDP2 (`fully_shard`): every parameter, frozen or not, lives 1/N on each rank
    deepspeed-zero2  DeepSpeed ZeRO-2 through Accelerate: the trainable weights' gradients and optimizer
                     state are split; the frozen LLM stays whole on every rank
    deepspeed-zero3  DeepSpeed ZeRO-3 (parameters split too): refused for now, it hung here

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
    if sharding == "deepspeed-zero3":
        # Measured (2 CPU processes, DeepSpeed 0.19.8): under ZeRO-3 transformers builds models inside
        # zero.Init, whose broadcasts need every rank, while the recipe builds on rank 0 first
        # (main_process_first): a hang. Building on all ranks at once, it trains and halves the LLM's
        # bytes, but from another model than one process builds (step-0 loss 10.83 against 10.74).
        raise ValueError("train.sharding=deepspeed-zero3 is not supported yet (see docs/training.md); "
                         "use --train.sharding fsdp, which shards the frozen LLM's parameters the same way")
    if sharding != "none" and world < 2:
        raise ValueError(f"train.sharding={sharding} needs 2 or more processes (this run has 1): launch with "
                         "`torchrun --nproc_per_node N -m ademvl train ...` or `accelerate launch`, "
                         "or use --train.sharding none")
    if asked and accelerate_engine is None and sharding == "none":
        # Accelerate applies FSDP / DeepSpeed only on accelerators; on CPUs it silently runs DDP.
        raise ValueError(f"the Accelerate config asks for {asked}, which Accelerate does not apply on this "
                         f"machine (it would train plain data parallel, the whole model on every rank); pass "
                         f"--train.sharding {'fsdp' if asked == 'fsdp' else 'deepspeed-zero2'} "
                         "so that ademvl shards the model itself, or launch without that config")
    engine = "deepspeed" if zero_stage(sharding) else (None if sharding == "none" else "fsdp")
    if accelerate_engine and engine and accelerate_engine != engine:
        raise ValueError(f"train.sharding={sharding}, but the Accelerate config runs {accelerate_engine}: "
                         "use one of the two (drop --train.sharding, or launch without that config)")
    if engine == "deepspeed" and accelerate_engine != "deepspeed":
        raise ValueError(f"train.sharding={sharding}, but DeepSpeed did not start (an Accelerate config with "
                         "use_cpu: true turns it off): launch with torchrun, or with a config without use_cpu")
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
    (cpu=True would turn DeepSpeed off), so it is told gloo.

    DeepSpeed would also compile its shared-memory collective for CPUs on first use (1-2 min, and
    again whenever its build command hashes differently: seen here, runs then wait on the build);
    it is switched off through the table DeepSpeed keeps for that, and gloo does the collectives.
    """
    from accelerate.utils import InitProcessGroupKwargs

    if not stage or torch.accelerator.is_available():
        return []
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return [InitProcessGroupKwargs(backend="gloo")]


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


def build_on_meta(config: Any) -> nn.Module:
    """The AdemVLModel of `config` on the meta device (shapes, no memory), with its tokenizer: what
    ranks other than 0 build before `shard_fsdp` fills in their shards from rank 0."""
    from . import hub
    from .model import build_meta

    model = build_meta(config.llm, config.vision, config)
    model.tokenizer = hub.load_tokenizer(config.llm)
    return model


def shard_fsdp(model: nn.Module, layers: nn.ModuleList, device: torch.device,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 in place: each decoder layer a group, then the whole model as the root group.

    Only rank 0 holds the weights (the others built the model on the meta device, `build_on_meta`):
    after sharding, it sends every rank its shard of each parameter and a copy of each buffer (the
    rotary tables are buffers), so the whole model is loaded once, not once per rank.

    Ranks whose batch has no image leave the vision side without a gradient while others do;
    `set_reduce_scatter_unused_params` sends zeros for those, so every rank joins the same
    reduce-scatter (DDP needs the recipe's zero term for the same reason).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    on_meta = next(model.parameters()).is_meta
    whole = {} if on_meta else model.state_dict()  # rank 0: the tensors stay alive until sent
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if on_meta:
        model.to_empty(device=device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
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
