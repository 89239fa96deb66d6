"""`ademvl eval`: the generation loop, letter reading, preds/scores files, blank images, the CLI.

The tiny random model answers gibberish, so the reading and scoring are checked with scripted
answers (the model's generate() replaced by one that returns chosen texts, in batch order)."""

from __future__ import annotations

import json

import pytest
import torch

from ademvl.cli import main
from ademvl.recipes.evaluate import evaluate
from ademvl.tasks import scienceqa as sqa
from ademvl.tasks.shapes import write_dataset

from .conftest import tiny_model


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), n=50, seed=0)  # test split: 5 problems


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def script(model, monkeypatch, answer_for):
    """Make model.generate answer answer_for(batch_index_in_run) and record each batch's image_mask."""
    seen = {"masks": [], "n": 0}
    tok = model.tokenizer

    def generate(input_ids, attention_mask=None, pixel_values=None, image_mask=None, **kw):
        seen["masks"].append(image_mask.tolist())
        seen["kwargs"] = kw
        texts = [answer_for(seen["n"] + i) for i in range(input_ids.shape[0])]
        seen["n"] += len(texts)
        ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
        longest = max(map(len, ids))
        pad = tok.eos_token_id
        return torch.tensor([x + [pad] * (longest - len(x)) for x in ids])

    monkeypatch.setattr(model, "generate", generate)
    return seen


def run_sqa(model, root, out_dir=None, batch_size: int = 16, **opts) -> dict:
    """The ScienceQA protocol through the generic loop: preds, scores, unreadable count."""
    r = evaluate(model, "scienceqa", sqa.EvalOptions(data_root=str(root), split="test", **opts), out_dir, batch_size)
    preds = r.outputs["preds.json"]
    return {"preds": preds, "scores": r.scores, "unreadable": sum(preds[s.id] == -1 for s in r.samples)}


def test_real_generation_writes_every_problem(shapes, model, tmp_path):
    r = run_sqa(model, shapes, out_dir=tmp_path, batch_size=2)
    test_pids = json.loads((shapes / "pid_splits.json").read_text())["test"]
    preds = json.loads((tmp_path / "preds.json").read_text())
    assert list(preds) == test_pids == list(r["preds"])
    problems = json.loads((shapes / "problems.json").read_text())
    assert all(-1 <= preds[p] < len(problems[p]["choices"]) for p in test_pids)
    assert list(json.loads((tmp_path / "scores.json").read_text())) == list(sqa.KEYS)
    assert set(json.loads((tmp_path / "generations.json").read_text())) == set(test_pids)


def test_scores_from_scripted_answers(shapes, model, monkeypatch, tmp_path):
    problems = sqa.read_problems(shapes, "test")
    pids = list(problems)
    # first problem right, second unreadable, third a letter past its choices, the rest right
    def answer(i):
        p = problems[pids[i]]
        if i == 1:
            return "I do not know"
        if i == 2:
            return "The answer is E."
        return f"The answer is {'ABCDE'[p['answer']]}."
    seen = script(model, monkeypatch, answer)
    r = run_sqa(model, shapes, out_dir=tmp_path, batch_size=2)
    assert r["preds"][pids[1]] == -1 and r["preds"][pids[2]] == -1 and r["unreadable"] == 2
    assert r["preds"][pids[0]] == problems[pids[0]]["answer"]
    assert r["scores"]["acc_average"] == round(100 * 3 / 5, 2)  # 3 of 5 right
    assert seen["masks"] == [[problems[p]["image"] is not None for p in pids[i:i + 2]] for i in range(0, 5, 2)]
    assert seen["kwargs"]["max_new_tokens"] == 8 and seen["kwargs"]["do_sample"] is False

    seen = script(model, monkeypatch, answer)
    run_sqa(model, shapes, batch_size=5, blank_images=True)
    assert seen["masks"] == [[False] * 5]  # every problem takes the "Image: N/A" path


def test_invalid_problem_counts_wrong(shapes, model, monkeypatch, tmp_path):
    root = tmp_path / "bad"
    problems = json.loads((shapes / "problems.json").read_text())
    splits = json.loads((shapes / "pid_splits.json").read_text())
    first = splits["test"][0]
    problems[first]["choices"] = list("abcdef")  # 6 choices: breaks the rule
    root.mkdir()
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    (root / "images").symlink_to(shapes / "images")
    with pytest.raises(ValueError, match=f"problem {first}: 6 choices"):
        run_sqa(model, root)
    script(model, monkeypatch, lambda i: "The answer is A.")
    with pytest.warns(UserWarning, match="skipping 1 problems"):
        r = run_sqa(model, root, skip_invalid=True)
    assert r["preds"][first] == -1 and len(r["preds"]) == 5  # kept in the denominator, as wrong


def test_eval_cli(shapes, model, tmp_path, capsys):
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    assert main(["eval", "scienceqa", "--checkpoint", str(ckpt), "--data-root", str(shapes), "--split", "test",
                 "--out", str(tmp_path / "out"), "--batch-size", "4", "--limit", "3", "--device", "cpu"]) == 0
    head, row, last = capsys.readouterr().out.strip().splitlines()
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert head.split() == list(sqa.TITLES)
    assert row.split() == ["test"] + ["-" if scores[k] is None else f"{scores[k]:.2f}" for k in sqa.KEYS]
    preds = json.loads((tmp_path / "out" / "preds.json").read_text())
    assert len(preds) == 3
    assert last == f"3 problems, {sum(v == -1 for v in preds.values())} answers unreadable (counted wrong); wrote {tmp_path / 'out'}/"
