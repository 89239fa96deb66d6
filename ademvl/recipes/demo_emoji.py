"""`ademvl demo` (`make demo`): real emoji artwork and real words, end to end on this machine.

1. the emoji corpus (`ademvl data emoji`, ademvl/emoji.py): 7 vendor sets, CLDR names and groups;
2. ADEM-VL on the embedded SmolLM2-135M-Instruct + ImageNet MobileNetV2 (ademvl/configs/demo_emoji.yaml),
   trained on the train families (Noto, Fluent flat + colour, OpenMoji, fxemoji) with naming and
   multiple choice mixed (the corpus's LLaVA layout, `ademvl train`'s recipe);
3. `ademvl eval emoji` on the held-out Twemoji family (test) and EmojiOne (val): naming and the
   multiple choice; concepts never trained (group and subgroup); controls: every image blanked,
   the untrained model;
4. OUT/report.md + report.json, the loss curve, a gallery of held-out answers and the drop maps.

The shapes demo stays `ademvl demo --task shapes` (ademvl/recipes/demo.py).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from .. import emoji as corpus_lib
from ..config import config_path, load_run_config
from ..data import Sample
from ..model import AdemVLModel
from ..tasks import emoji as task
from .demo import changes, fit, plot_drop_rows, plot_loss, tower_note, training_sections

REPO_CONFIG = config_path("demo_emoji")
CHANGES_DOC = "docs/emoji.md"
# Linear read-outs of the frozen MobileNetV2 at 224 px (a scout's measurement, NOTES.md "real images with
# real words"): held-out Twemoji, train = the other families; the reference the model's numbers stand beside.
READOUT_REFERENCE = [("demo stage, global mean (64-d)", 25.8, 48.6, 53.1, 34.9),
                     ("demo stage, pooled 7x7 (3,136-d)", 61.9, 78.6, 57.1, 58.4),
                     ("last stage, mean (1,280-d)", 57.3, 77.5, 66.9, 63.0)]
CHANCE = 25.0


def pick(items: list[Any], n: int | None, seed: int) -> list[Any]:
    """n items by a seeded draw, in their order (all when n is None or larger)."""
    if n is None or n >= len(items):
        return items
    keep = set(random.Random(seed).sample(range(len(items)), n))
    return [x for i, x in enumerate(items) if i in keep]


def eval_sets(data: Path, concepts: dict[str, Any], unseen: set[str], n: int | None, seed: int) -> dict[str, list[Sample]]:
    """The held-out questions: test (Twemoji, trained concepts), val (EmojiOne), unseen (Twemoji,
    concepts never trained: group and subgroup only); each on n images drawn by `seed`."""
    index = json.loads((data / "index.json").read_text())
    trained = {i["key"] for i in index["images"] if i["split"] == "train"}
    sets = {}
    for name, vendor, keys, qtypes in (("test", "twemoji", trained, task.ALL_QUESTIONS),
                                      ("val", "emojione", trained, task.ALL_QUESTIONS),
                                      ("unseen", "twemoji", set(unseen) - trained, ("group", "subgroup"))):
        files = sorted(data / i["image"] for i in index["images"] if i["vendor"] == vendor and i["key"] in keys)
        sets[name] = task.samples_for(pick(files, n, seed), concepts, qtypes, seed)
    return sets


def blanked(samples: list[Sample]) -> list[Sample]:
    return [Sample(s.id, None, s.turns, s.meta) for s in samples]


def score(model: AdemVLModel, samples: list[Sample], out: Path, batch_size: int) -> dict[str, Any]:
    from .evaluate import evaluate

    opts = task.EvalOptions(images=str(out))  # the samples are given: only generation's settings are read
    return evaluate(model, "emoji", opts, out_dir=out, batch_size=batch_size, samples=samples).scores


def gallery(rows: list[dict[str, Any]], images: dict[str, Path], path: Path, n: int = 24, seed: int = 0) -> None:
    """n held-out images with the model's name for each and the truth (green: exact)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    naming = pick([r for r in rows if r["qtype"] == "naming"], n, seed)
    cols = 6
    fig, axes = plt.subplots((len(naming) + cols - 1) // cols, cols, figsize=(2.3 * cols, 2.5 * ((len(naming) + cols - 1) // cols)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, naming):
        ax.imshow(Image.open(images[r["file"]]).convert("RGB"))
        right = r["answer"] == task.clean_name(r["truth"])
        ax.set_title(f"{r['output'][:26] or '(empty)'}\ntruth: {r['truth'][:26]}", fontsize=7, color="green" if right else "red")
    fig.suptitle("Held-out Twemoji: the model's name (top) and the CLDR name", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_emoji_demo(out: str | Path = "runs/demo", config: str | Path = REPO_CONFIG, seed: int = 0,
                   overrides: list[str] | None = None, batch_size: int = 32, eval_images: int | None = 300) -> dict[str, Any]:
    """Everything `ademvl demo` does; returns what report.json holds."""
    from accelerate.utils import set_seed

    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    times: dict[str, float] = {}

    t = time.time()
    corpus = corpus_lib.build(data)
    times["data_s"] = time.time() - t

    cfg = load_run_config(config, [*(overrides or []), f"data.path={data / 'llava_train.json'}", f"train.output_dir={out}",
                                   f"train.seed={seed}"])
    summary = fit(cfg, out, times)

    t = time.time()
    model = AdemVLModel.from_pretrained(out / "checkpoint")
    sets = eval_sets(data, corpus.concepts, corpus.unseen, eval_images, seed)
    ev = out / "eval"
    results = {"trained": score(model, sets["test"], ev / "test", batch_size),
               "val": score(model, sets["val"], ev / "val", batch_size),
               "unseen": score(model, sets["unseen"], ev / "unseen", batch_size),
               "images_blanked": score(model, blanked(sets["test"]), ev / "blanked", batch_size)}
    rows = json.loads((ev / "test" / "preds.json").read_text())
    files = {Path(s.image).name: Path(s.image) for s in sets["test"]}
    gallery(rows, files, out / "gallery.png", seed=seed)
    drop_samples = [s for s in sets["test"] if s.meta["qtype"] == "naming"][:4]
    drops = plot_drop_rows(model, [(s, s.image, s.meta["truth"]) for s in drop_samples], out / "drops.png")
    set_seed(seed)
    results["untrained"] = score(AdemVLModel.build(cfg.model), sets["test"], ev / "untrained", batch_size)
    times["eval_s"] = time.time() - t
    plot_loss(out / "log.jsonl", out / "loss.png", cfg.model.vision)
    times["total_s"] = time.time() - t_start

    tr = results["trained"]
    report = {
        "models": {"llm": cfg.model.llm, "vision": cfg.model.vision, "vision_weights": tower_note(cfg.model.vision)[1]},
        "data": {"images": len(corpus.items), "concepts": len(corpus.concepts), "unseen_concepts": len(corpus.unseen),
                 "eval_images": {k: len({s.meta["file"] for s in v}) for k, v in sets.items()}, "seed": seed},
        "config": cfg.to_dict(), "train": summary, "results": results, "drops": drops, "times": times,
        "targets": {"naming_exact_ge_30": tr["naming_exact"] >= 30, "mc_name_ge_75": tr["mc_name"] >= 75,
                    "mc_group_ge_85": tr["mc_group"] >= 85,
                    "blanked_within_5_of_chance": all(abs(results["images_blanked"][f"mc_{q}"] - CHANCE) <= 5 for q in task.QTYPES),
                    "total_le_15_min": times["total_s"] <= 15 * 60},
        "trainable_params": model.num_trainable(), "changes_from_paper_defaults": changes(cfg),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "report.md").write_text(render_report(report))
    return report


def render_report(r: dict[str, Any]) -> str:
    res, times = r["results"], r["times"]
    names = {"trained": "ADEM-VL, held-out Twemoji (test)", "val": "ADEM-VL, EmojiOne (val)",
             "images_blanked": "same as test, every image blanked", "untrained": "untrained (initial weights), test"}

    def cell(sc: dict[str, Any], k: str) -> str:
        return f"{sc[k]:.1f}" if k in sc else "-"

    lines = [
        "# ADEM-VL emoji demo report", "",
        f"LLM: `{r['models']['llm']}` (frozen). Vision: `{r['models']['vision']}` (frozen).", "",
        f"> {tower_note(r['models']['vision'])[0]}", "",
        f"Data: the emoji corpus (`ademvl data emoji`): {r['data']['images']:,} images of {r['data']['concepts']:,} concepts "
        "by 7 vendor sets; names, groups and subgroups from Unicode CLDR. Trained on Noto, Fluent (flat + colour), OpenMoji "
        f"and fxemoji; {r['data']['unseen_concepts']} concepts (20% of each subgroup) never trained. Evaluated on "
        f"{r['data']['eval_images']} images drawn with seed {r['data']['seed']} (`ademvl eval emoji`).", "",
        "## Naming and multiple choice (%)", "",
        "| model | naming exact | token F1 | BLEU-4 | CIDEr | MC name (4) | MC group (4) | MC subgroup (4) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in names.items():
        sc = res[key]
        lines.append(f"| {label} | " + " | ".join(cell(sc, k) for k in ("naming_exact", "naming_token_f1", "naming_bleu_4",
                                                                          "naming_cider", "mc_name", "mc_group", "mc_subgroup")) + " |")
    un = res["unseen"]
    lines += ["", "Naming is the greedy generation, compared whole (case-insensitive). Multiple choice is read by forced "
              "choice (`ademvl eval emoji --mc choice`): the option letter the model scores highest right after "
              "\"The answer is\", so every question gets an answer and a blanked image reads as the text's prior.", "",
              f"Chance on every multiple-choice type: {CHANCE:.0f}%. Concepts never trained (held-out Twemoji): "
              f"group {un['mc_group']:.1f}%, subgroup {un['mc_subgroup']:.1f}% ({un['mc_group_n']} images).", "",
              "## The linear read-out reference (NOTES.md)", "",
              "A scout's linear classifiers on the frozen MobileNetV2's features at 224 px, trained on the same train "
              "families over all 1,652 names, held-out Twemoji (a classifier, not a generator: the bar to beat):", "",
              "| features | name top-1 | top-5 | group (9) | subgroup (96) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {f} | {a} | {b} | {c} | {d} |" for f, a, b, c, d in READOUT_REFERENCE]
    t = r["targets"]
    lines += ["", "## Targets", "",
              f"- naming exact >= 30%: {res['trained']['naming_exact']:.1f}% ({'met' if t['naming_exact_ge_30'] else 'NOT met'})",
              f"- MC name >= 75%: {res['trained']['mc_name']:.1f}% ({'met' if t['mc_name_ge_75'] else 'NOT met'})",
              f"- MC group >= 85%: {res['trained']['mc_group']:.1f}% ({'met' if t['mc_group_ge_85'] else 'NOT met'})",
              "- every image blanked within 5 points of chance: "
              + ", ".join(f"{q} {res['images_blanked'][f'mc_{q}']:.1f}%" for q in task.QTYPES)
              + f" ({'met' if t['blanked_within_5_of_chance'] else 'NOT met'})",
              f"- whole command <= 15 min: {times['total_s'] / 60:.1f} min ({'met' if t['total_le_15_min'] else 'NOT met'})",
              "", "## Gallery (held-out Twemoji)", "", "![gallery](gallery.png)", ""]
    return "\n".join(lines + training_sections(r, CHANGES_DOC, "corpus")) + "\n"
