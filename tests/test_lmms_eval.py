"""ademvl on lmms-eval (ademvl/harness.py), offline: lmms-eval's own task definitions run on small
local copies of their datasets made from the synthetic shapes, with a tiny checkpoint trained here.

    mme_synthetic             lmms-eval's `mme` (generation, yes/no, its scorer) on MME's parquet columns
    seedbench_ppl_synthetic   lmms-eval's `seedbench_ppl` (likelihood multiple choice) on SEED-Bench's

The harness runs through its own CLI (`python -m lmms_eval --model ademvl`), which finds the
backend by ademvl's entry point; its MME score must equal the project's own MME evaluation of the
same checkpoint on the same items with the same prompt.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pytest
import torch
from PIL import Image as PILImage
from transformers import StopStringCriteria

lmms_eval = pytest.importorskip("lmms_eval", reason="the `eval` extra (lmms-eval) is not installed; `make test` installs it")

from lmms_eval.api.instance import Instance, unwrap_generation_output  # noqa: E402
from lmms_eval.tasks.mme.utils import mme_doc_to_text  # noqa: E402
from lmms_eval.tasks.seedbench.utils import seed_doc_to_text_mc, seed_doc_to_visual  # noqa: E402
from lmms_eval.utils import load_yaml_config  # noqa: E402

# ---- the project's own evaluation and training: one place to change when modules move (issue 13)
from ademvl import AdemVLModel  # noqa: E402
from ademvl.recipes.evaluate import evaluate as project_eval  # noqa: E402  the project's own evaluation loop
from ademvl.data import Sample  # noqa: E402
from ademvl.harness import AdemVL  # noqa: E402
from ademvl.tasks import mme as mme_task  # noqa: E402  MME release-layout loader (builds the prompt)
from ademvl.tasks.instruct import prompt_of  # noqa: E402  the backend's default template
from ademvl.tasks.shapes import COLORS, SHAPES, make_problems, render  # noqa: E402
from ademvl.config import load_run_config  # noqa: E402
from ademvl.recipes.train import train  # noqa: E402

from .conftest import perturb, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "ademvl" / "configs" / "tiny.yaml"
TASK_YAMLS = Path(__file__).resolve().parent / "lmms_eval_tasks"
STOCK_TASKS = Path(lmms_eval.__file__).parent / "tasks"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# shapes' question type -> (MME category, question about a value, the options it may name)
MME_QUESTIONS = {
    "color": ("color", "Is the shape {}?", COLORS),
    "shape": ("existence", "Is there a {} in the image?", SHAPES),
    "count": ("count", "Are there {} shapes in the image?", ("1", "2", "3", "4")),
    "position": ("position", "Is the shape on the {}?", ("left", "right")),
}


# ---- the data: the same items in lmms-eval's parquet layouts and in MME's release layout ------
def png(image) -> bytes:
    buf = BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_problems(n: int, seed: int) -> list[tuple[str, dict]]:
    """Synthetic-shapes image problems (all splits), with the option each one answers."""
    problems = make_problems(n, seed)
    return [(pid, p) for pid, p in problems.items() if p["image"]]


def write_mme(out: Path, items: list[tuple[str, dict]], seed: int = 0) -> list[dict]:
    """Two yes/no questions per image (one true, one false), as MME asks them; written both as
    lmms-lab/MME's parquet (question_id, image, question, answer, category) and as the benchmark's
    release layout ({category}/{name}.png + {name}.txt), which `ademvl eval mme` reads."""
    from datasets import Dataset, Features, Image, Value

    rng = random.Random(seed)
    rows = []
    for pid, p in items:
        category, template, options = MME_QUESTIONS[p["qtype"]]
        right = p["choices"][p["answer"]]
        wrong = rng.choice([o for o in options if o != right])
        image = png(render(p["objects"]))
        folder = out / "release" / category
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{pid}.png").write_bytes(image)
        qa = [(template.format(right) + " Please answer yes or no.", "Yes"),
              (template.format(wrong) + " Please answer yes or no.", "No")]
        (folder / f"{pid}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qa))
        rows += [{"question_id": f"{category}/{pid}.png", "image": {"bytes": image, "path": f"{pid}.png"},
                  "question": q, "answer": a, "category": category} for q, a in qa]
    features = Features({"question_id": Value("string"), "image": Image(), "question": Value("string"),
                         "answer": Value("string"), "category": Value("string")})
    Dataset.from_list(rows, features=features).to_parquet(str(out / "mme_synthetic.parquet"))
    return rows


def write_seedbench(out: Path, items: list[tuple[str, dict]], seed: int = 0) -> list[dict]:
    """Four-option questions in SEED-Bench's columns (question, choice_a..d, answer letter, image
    as a list of images, data_type, question_id); colour questions drop one wrong colour."""
    from datasets import Dataset, Features, Image, Sequence, Value

    rng = random.Random(seed)
    rows = []
    for pid, p in items:
        if p["qtype"] not in ("color", "count"):
            continue
        choices = list(p["choices"])
        if len(choices) > 4:
            choices.remove(rng.choice([c for c in choices if c != p["choices"][p["answer"]]]))
        answer = "ABCD"[choices.index(p["choices"][p["answer"]])]
        rows.append({"question": p["question"], **{f"choice_{k}": c for k, c in zip("abcd", choices)},
                     "answer": answer, "image": [{"bytes": png(render(p["objects"])), "path": f"{pid}.png"}],
                     "data_type": "image", "question_id": pid})
    features = Features({"question": Value("string"), **{f"choice_{k}": Value("string") for k in "abcd"},
                         "answer": Value("string"), "image": Sequence(Image()), "data_type": Value("string"),
                         "question_id": Value("string")})
    Dataset.from_list(rows, features=features).to_parquet(str(out / "seedbench_ppl_synthetic.parquet"))
    return rows


def task_dir(out: Path) -> Path:
    """The test's task YAMLs beside the data, pointing at the installed stock tasks."""
    for f in TASK_YAMLS.glob("*.yaml"):
        (out / f.name).write_text(f.read_text().replace("LMMS_EVAL_TASKS", str(STOCK_TASKS)))
    return out


# ---- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("lmms_eval_data")
    items = image_problems(100, seed=0)[:16]  # 16 images: 32 MME questions, ~8 SEED-Bench questions
    return {"dir": task_dir(out), "mme": write_mme(out, items), "seed": write_seedbench(out, items),
            "release": out / "release"}


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> Path:
    """A few steps of the project's training (tiny random models) on the MME items' yes/no answers."""
    out = tmp_path_factory.mktemp("lmms_eval_run")
    cfg = load_run_config(TINY_CONFIG, ["--train.output_dir", str(out), "--train.max_steps", "10",
                                        "--train.batch_size", "8", "--train.save_every", "1000"])
    cfg.data = {"task": "mme", "root": str(data["release"])}
    train(cfg)
    return out / "checkpoint"


@pytest.fixture(scope="module")
def harness_run(data, checkpoint, tmp_path_factory) -> dict:
    """lmms-eval's CLI, unchanged, on both tasks, data parallel over two processes (each rank
    answers half the requests; lmms-eval gathers them): its results and its per-sample log."""
    out = tmp_path_factory.mktemp("lmms_eval_out")
    env = {**os.environ, **OFFLINE, "HF_HOME": str(out / "hf"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmms_eval", "--model", "ademvl",
           "--model_args", f"checkpoint={checkpoint},batch_size=8,device=cpu",
           "--tasks", "mme_synthetic,seedbench_ppl_synthetic", "--include_path", str(data["dir"]),
           "--output_path", str(out / "results"), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    found = list((out / "results").rglob("*_results.json"))
    assert proc.returncode == 0 and found, proc.stdout[-3000:] + proc.stderr[-3000:]  # its errors exit 0
    assert "Running on rank 1 (local rank 1)" in proc.stdout + proc.stderr  # two ranks shared the work
    results = json.loads(found[0].read_text())
    samples = {t: [json.loads(line) for line in next((out / "results").rglob(f"*_samples_{t}.jsonl")).read_text().splitlines()]
               for t in ("mme_synthetic", "seedbench_ppl_synthetic")}
    return {"results": results["results"], "samples": samples}


@pytest.fixture(scope="module")
def model(checkpoint) -> AdemVLModel:
    return AdemVLModel.from_pretrained(checkpoint)


# ---- the tests --------------------------------------------------------------------------------
def test_mme_score_equals_the_projects_own_evaluation(data, harness_run, model, tmp_path, monkeypatch) -> None:
    """Same checkpoint, same items, same prompt (lmms-eval's MME text in the backend's default
    template), greedy: the harness's perception score is the project's `evaluate_mme` score."""
    stock = load_yaml_config(str(STOCK_TASKS / "mme" / "mme.yaml"), mode="simple")
    kwargs = stock["lmms_eval_specific_kwargs"]["default"]
    monkeypatch.setattr(mme_task, "prompt_of", lambda q: prompt_of(mme_doc_to_text({"question": q}, kwargs)))
    opts = mme_task.EvalOptions(data_root=str(data["release"]), max_new_tokens=stock["generation_kwargs"]["max_new_tokens"])
    own = project_eval(model, "mme", opts, out_dir=tmp_path, batch_size=8)

    harness = harness_run["results"]["mme_synthetic"]["mme_perception_score,none"]
    assert harness == pytest.approx(own.scores["perception"], rel=0, abs=1e-9)  # sums in another order
    # ... and answer by answer: the harness's answers are the project's generations
    own_answers = {}
    for f in tmp_path.glob("*.txt"):
        for line in f.read_text().splitlines():
            image, question, _, answer = line.split("\t")
            own_answers[(f.stem, Path(image).stem, question)] = answer
    logged = harness_run["samples"]["mme_synthetic"]
    assert len(logged) == len(own_answers) == len(data["mme"])
    for s in logged:
        row = data["mme"][s["doc_id"]]
        key = (row["category"], Path(row["question_id"]).stem, row["question"])
        assert " ".join(s["filtered_resps"].split()) == own_answers[key], key
    assert own.scores["perception"] > 0  # the trained checkpoint answers in MME's terms


def test_likelihood_task_scores_each_option_by_its_loss(data, harness_run, model) -> None:
    """seedbench_ppl: each option's value is its mean loss per token after the same prompt, which
    the model computes alone (batch of one, transformers' own loss); the lowest wins."""
    logged = sorted(harness_run["samples"]["seedbench_ppl_synthetic"], key=lambda s: s["doc_id"])
    assert len(logged) == len(data["seed"]) > 0
    right = 0
    for s in logged:
        doc = data["seed"][s["doc_id"]]
        image = render_back(doc["image"][0]["bytes"])
        losses = [own_loss(model, image, prompt_of(seed_doc_to_text_mc(doc)), " " + doc[f"choice_{k}"]) for k in "abcd"]
        harness = [float(loss) for loss, _ in s["filtered_resps"]]  # the log writes them as text
        assert harness == pytest.approx(losses, abs=1e-4)
        right += "ABCD"[losses.index(min(losses))] == doc["answer"]
    assert harness_run["results"]["seedbench_ppl_synthetic"]["acc,none"] == pytest.approx(right / len(logged), abs=1e-12)


def own_loss(model: AdemVLModel, image, prompt: str, continuation: str) -> float:
    """Mean loss per continuation token, computed alone: transformers' loss on one unpadded sample."""
    batch = model.processor([Sample("x", image, [(prompt, continuation)])])
    batch["labels"][0, (batch["labels"][0] != -100).nonzero().max()] = -100  # the EOS is not scored
    with torch.no_grad():
        return model(**batch).loss.item()


def render_back(image_bytes: bytes) -> PILImage.Image:
    return PILImage.open(BytesIO(image_bytes))


@pytest.fixture(scope="module")
def backend(checkpoint) -> AdemVL:
    return AdemVL.create_from_arg_string(f"checkpoint={checkpoint},batch_size=2", {"batch_size": "1", "device": None})


def request(backend: AdemVL, doc: dict, doc_to_visual, kind: str = "generate_until", task: str = "toy",
            context: str = "What is in the image?", gen_kwargs: dict | None = None) -> Instance:
    """One request as lmms-eval's tasks build them, with its doc in the backend's task_dict."""
    docs = backend.task_dict.setdefault(task, {}).setdefault("test", [])
    docs.append(doc)
    if kind == "generate_until":
        second = gen_kwargs or {"max_new_tokens": 5, "until": ["\n\n"]}
    else:
        second = " red"  # the continuation to score
    return Instance(kind, (context, second, doc_to_visual, len(docs) - 1, task, "test"), idx=0,
                    metadata={"task": task, "doc_id": len(docs) - 1, "repeats": 1})


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> AdemVL:
    """A backend whose answers depend on the image: tiny random weights everywhere (conftest's
    perturb), so a request answered with another request's image or prompt shows."""
    model = tiny_model()
    perturb(model)
    path = model.save_pretrained(tmp_path_factory.mktemp("varied") / "checkpoint")
    return AdemVL(checkpoint=str(path), batch_size=3)


def test_batched_answers_are_each_requests_own(varied) -> None:
    """Grouped, sorted and batched, every answer is the one its request gets alone."""
    scenes = [[{"shape": s, "color": c, "box": [x, 40, x + 60, 100]}]
              for s, c, x in [("circle", "red", 10), ("square", "blue", 150), ("triangle", "green", 80),
                              ("circle", "yellow", 120), ("square", "purple", 30)]]
    texts = ["What is in the image?", "Which shape is it?", "Describe the image in a few words, please.",
             "Colour?", "Is the shape on the left or on the right of the picture?"]
    images = [render(scene) for scene in scenes]
    settings = {"max_new_tokens": 12, "until": ["\n\n"]}
    reqs = [request(varied, {"i": im}, lambda d: [d["i"]], context=t, gen_kwargs=settings) for im, t in zip(images, texts)]
    reqs.append(request(varied, {}, lambda d: [], context="The kite is red. What color is the kite?", gen_kwargs=settings))
    answers = varied.generate_until(reqs)
    alone = [varied.model.answer([im], [prompt_of(t)], max_new_tokens=12, do_sample=False, num_beams=1)[0]
             for im, t in zip(images + [None], texts + ["The kite is red. What color is the kite?"])]
    assert answers == [a.split("\n\n")[0] for a in alone]
    assert len(set(answers)) > 1  # the answers differ from request to request: a mix-up would show


def test_model_args_beat_the_cli_flags(backend) -> None:
    assert backend.batch_size == 2  # model_args batch_size=2 over lmms-eval's --batch_size default
    with pytest.raises(ValueError, match="unknown key.*pretrained.*valid: checkpoint"):
        AdemVL.create_from_arg_string("checkpoint=x,pretrained=y")


def test_two_images_are_refused_naming_the_task(backend) -> None:
    img = render([{"shape": "circle", "color": "red", "box": [10, 10, 60, 60]}])
    two = request(backend, {"image": [img, img]}, seed_doc_to_visual, task="seedbench_video")
    with pytest.raises(ValueError, match=r"task seedbench_video \(doc 0\) sends 2 images.*one image per sample"):
        backend.generate_until([two])
    with pytest.raises(ValueError, match="task seedbench_video"):
        backend.loglikelihood([request(backend, {"image": [img, img]}, seed_doc_to_visual, "loglikelihood", "seedbench_video")])


def test_requests_without_an_image_take_the_no_image_path(backend) -> None:
    """No visual: the model's "Image: N/A" input, the same answer model.answer gives for None."""
    req = request(backend, {}, lambda doc: [], context="The kite is red. What color is the kite?")
    expected = backend.model.answer([None], [prompt_of("The kite is red. What color is the kite?")], max_new_tokens=5,
                                    do_sample=False, num_beams=1)
    assert backend.generate_until([req]) == [expected[0].split("\n\n")[0]]


def test_context_free_requests_score_the_continuation_alone(varied) -> None:
    """acc_mutual_info's unconditional requests carry (context, continuation) only: no image."""
    req = Instance("loglikelihood", ("", " red"), idx=0, metadata={"task": "toy", "doc_id": 0, "repeats": 1})
    (loss, greedy), _ = unwrap_generation_output(varied.loglikelihood([req])[0])
    assert loss == pytest.approx(own_loss(varied.model, None, prompt_of(""), " red"), abs=1e-5) and greedy is False


def test_any_image_mode_reads_as_rgb(varied) -> None:
    """A palette or RGBA image answers as its RGB conversion does (ademvl.images rules)."""
    rgb = render([{"shape": "square", "color": "blue", "box": [100, 20, 170, 90]}])
    rgba = rgb.convert("RGBA")
    palette = rgb.convert("P", palette=PILImage.Palette.ADAPTIVE)  # exact: the image has a few colours
    grey = rgb.convert("L")
    answers = varied.generate_until([request(varied, {"i": im}, lambda d: [d["i"]]) for im in (rgb, rgba, palette, grey)])
    assert answers[0] == answers[1] == answers[2] != answers[3]  # grey is another image, and reads as one


def test_generation_settings_from_tasks(backend) -> None:
    """Greedy for temperature 0, sampling for > 0, stop strings passed on and cut."""
    until, greedy = backend.generation_settings({"until": "\n\n", "max_new_tokens": 16, "temperature": 0, "do_sample": False})
    assert until == ["\n\n"] and greedy["do_sample"] is False and greedy["max_new_tokens"] == 16
    assert "temperature" not in greedy
    stop = greedy["stopping_criteria"][0]
    assert isinstance(stop, StopStringCriteria) and stop.stop_strings == ("\n\n",)
    assert backend.generation_settings({"until": ["\n\n"]})[1]["stopping_criteria"] is greedy["stopping_criteria"]  # built once
    _, sampled = backend.generation_settings({"temperature": 0.7, "top_p": 0.9, "num_beams": 1})
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9
    assert "stopping_criteria" not in sampled
    from ademvl.harness import cut_at

    assert cut_at("Yes.\n\nBecause", ["\n\n"]) == "Yes." and cut_at("A. B", ["."]) == "A"
