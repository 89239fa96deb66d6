"""Small commands: `ademvl params` (trainable parameters at any shape) and `ademvl generate`."""

from __future__ import annotations

import argparse

import torch

from .config import AdemVLConfig

RELEASED_EXTRA = "the released code also builds an adapter on the last vision block, which never runs"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="count trainable parameters (built on the meta device: 7B/13B cost nothing)")
    p.add_argument("--llm-config", default="smollm2-135m-instruct",
                   help="config.json path or preset (llama-7b, llama-13b, llama2-7b, smollm2-135m-instruct, tiny-llama, ...)")
    p.add_argument("--vision-config", default="demo-clip",
                   help="config.json path or preset (clip-vit-large-patch14, demo-clip, tiny-clip, mobilenet-v2, ...)")
    p.add_argument("--scales", type=int, nargs="+", default=None, help="visual token scales (default 256 64)")
    p.add_argument("--vision-layer", type=int, default=None,
                   help="which hidden state of the tower to read (default -2; the demo's MobileNetV2 stage: -6)")
    p.set_defaults(func=run_params)

    g = sub.add_parser("generate", help="answer a prompt about an image with a trained checkpoint")
    g.add_argument("--checkpoint", required=True, help="directory written by save_pretrained / ademvl train")
    g.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--llm", default=None, help="override the base LLM recorded in the checkpoint")
    g.add_argument("--vision", default=None, help="override the vision tower recorded in the checkpoint")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=run_generate)


def param_report(llm: str, vision: str, config: AdemVLConfig | None = None) -> list[str]:
    """Lines of `ademvl params`: groups, the released code's count, and `trainable: N` last."""
    from .model import build_meta

    model = build_meta(llm, vision, config)
    groups = model.parameter_groups()
    total = sum(groups.values())
    lines = [f"LLM {llm}: d={model.config.base['hidden_size']}, {model.config.base['num_layers']} layers (frozen); "
             f"vision {vision}: width {model.config.base['vision_width']}, "
             f"{len(model.tower.blocks())} of {model.config.base['vision_blocks']} blocks run (frozen)"
             + (f", a {model.tower.side}x{model.tower.side} grid at {model.preprocess.size} px" if model.tower.kind == "grid" else ""),
             f"visual tokens N = {' + '.join(map(str, model.config.scales))} = {model.config.num_visual_tokens}"]
    for name, n in groups.items():
        lines.append(f"  {name:<16} {n:>12,}")
    adapters = model.vision_adapters
    if len(adapters) and model.config.vision_layer == -2 and model.tower.kind == "vit":
        per_block = sum(p.numel() for p in adapters[0].parameters())
        lines.append(f"released code: {total + per_block} ({RELEASED_EXTRA}: +{per_block}; we build no dead parameters)")
    lines.append(f"trainable: {total}")
    return lines


def run_params(args: argparse.Namespace) -> int:
    overrides = {"scales": tuple(args.scales)} if args.scales is not None else {}
    overrides |= {"vision_layer": args.vision_layer} if args.vision_layer is not None else {}
    config = AdemVLConfig(**overrides)
    print("\n".join(param_report(args.llm_config, args.vision_config, config)))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from .images import load_image
    from .model import AdemVLModel

    image = load_image(args.image, missing_hint="check the --image path") if args.image else None  # before the slow part
    torch.manual_seed(args.seed)
    model = AdemVLModel.from_pretrained(args.checkpoint, llm=args.llm, vision=args.vision)
    kwargs = dict(num_beams=args.num_beams)
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        kwargs.update(do_sample=False)
    print(model.answer([image], [args.prompt], max_new_tokens=args.max_new_tokens, **kwargs)[0])
    return 0
