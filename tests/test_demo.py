"""`ademvl demo` end to end with tiny random models (the real run takes ~15 min; see docs/demo.md)."""

from __future__ import annotations

import json
from pathlib import Path

from ademvl import AdemVLModel
from ademvl.cli import main
from ademvl.tasks import shapes
from ademvl.tasks.shapes import per_type

TINY = ["--model.llm", "random:tiny-llama", "--model.vision", "random:tiny-clip", "--model.scales", "[16, 4]",
        "--train.max_steps", "3", "--train.batch_size", "4", "--train.save_every", "2"]


def test_per_type_accuracy() -> None:
    problems = {"1": {"qtype": "color", "answer": 0}, "2": {"qtype": "color", "answer": 1},
                "3": {"qtype": "shape", "answer": 2}, "4": {"qtype": "text", "answer": 0}}
    acc = per_type(problems, {"1": 0, "2": 0, "3": 2, "4": -1}, ["1", "2", "3", "4"])
    assert acc == {"color": 50.0, "shape": 100.0, "text": 0.0, "image_questions": 66.67}


def test_demo_writes_checkpoint_report_and_figures(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--task", "shapes", "--out", str(out), "--n", "50", "--batch-size", "8", *TINY]) == 0
    assert "image questions:" in capsys.readouterr().out
    for f in ("report.md", "report.json", "loss.png", "drops.png", "checkpoint/adapter.safetensors",
              "eval/trained/preds.json", "eval/blanked/scores.json", "eval/untrained/preds.json", "eval/shuffled/preds.json"):
        assert (out / f).is_file(), f
    report = json.loads((out / "report.json").read_text())
    problems = json.loads((out / "data" / "problems.json").read_text())
    test = json.loads((out / "data" / "pid_splits.json").read_text())["test"]
    assert report["data"]["test_problems"] == len(test) == 5
    image_pids = [p for p in test if problems[p]["qtype"] in shapes.IMAGE_QTYPES]

    def image_accuracy(preds: dict) -> float:  # by hand: the report's number must be the files' number
        return round(100 * sum(preds[p] == problems[p]["answer"] for p in image_pids) / len(image_pids), 2)

    for key, folder in (("trained", "trained"), ("images_blanked", "blanked"), ("untrained", "untrained")):
        preds = json.loads((out / "eval" / folder / "preds.json").read_text())
        assert report["results"][key]["per_type"]["image_questions"] == image_accuracy(preds)
        assert report["results"][key]["unreadable"] == sum(preds[p] == -1 for p in test)
        forced = json.loads((out / "eval" / folder / "forced_choice.json").read_text())
        assert sorted(forced) == sorted(test) and all(0 <= forced[p] < len(problems[p]["choices"]) for p in test)
        assert all(forced[p] == preds[p] for p in test if preds[p] != -1)  # forced only where unreadable
        assert report["results"][key]["forced_choice_per_type"]["image_questions"] == image_accuracy(forced)
    assert report["train"]["steps"] == 3 and report["trainable_params"] == AdemVLModel.from_pretrained(out / "checkpoint").num_trainable()
    assert {"setting": "model.scales", "paper": [256, 64], "demo": [16, 4]} in [
        {**c, "paper": list(c["paper"])} if isinstance(c["paper"], tuple) else c for c in report["changes_from_paper_defaults"]]
    md = (out / "report.md").read_text()
    assert "randomly initialised" in md and "image questions" in md and "![drops](drops.png)" in md
    assert len(report["drops"]["images"]) == 4  # one test image of each type, both scales
    for img in report["drops"]["images"]:
        for counts in img["dropped_per_scale"].values():
            assert sum(counts) == int(0.1 * 20)  # floor(gamma N) of N = 16 + 4 visual tokens


def test_forced_choice_reads_the_letter_after_the_answer_prefix() -> None:
    """A model whose letter logits are known: forced choice must pick the most likely allowed letter."""
    import torch

    from ademvl.data import Sample
    from ademvl.tasks.scienceqa import forced_choice
    from tests.conftest import tiny_model

    model = tiny_model()
    tok = model.tokenizer
    c_id = tok.encode(" C", add_special_tokens=False)[-1]
    e_id = tok.encode(" E", add_special_tokens=False)[-1]
    vocab, d = model.llm.get_output_embeddings().weight.shape
    model.llm.lm_head = torch.nn.Linear(d, vocab)  # logits = bias: " E" most likely, then " C"
    with torch.no_grad():
        model.llm.lm_head.weight.zero_()
        model.llm.lm_head.bias.zero_()
        model.llm.lm_head.bias[e_id], model.llm.lm_head.bias[c_id] = 2.0, 1.0
    samples = [Sample("five", None, [("Pick.", "")], {"choices": list("vwxyz")}),
               Sample("three", None, [("Pick.", "")], {"choices": list("xyz")}),
               Sample("two", None, [("Pick.", "")], {"choices": list("xy")})]
    assert forced_choice(model, samples) == {"five": 4, "three": 2, "two": 0}


def test_letter_logits_are_the_logits_at_the_answer_slot() -> None:
    """Left-padded batch, LM head on the last positions only == each sample alone, full logits."""
    import torch

    from ademvl.tasks.scienceqa import letter_logits
    from tests.conftest import perturb, samples, tiny_model

    model = tiny_model(alpha=1.0, beta=1.0)
    perturb(model)
    items = [type(s)(s.id, s.image, s.turns, {"choices": list("xyz")}) for s in samples()]  # mixed lengths
    got = letter_logits(model, items, batch_size=3)
    tok = model.tokenizer
    letters = [tok.encode(f" {c}", add_special_tokens=False)[-1] for c in "ABCDE"]
    for s in items:
        one = type(s)(s.id, s.image, [(s.turns[-1][0], "The answer is A.")], s.meta)
        batch = model.processor([one], train=True)
        labels = batch.pop("labels")[0]
        start = int((labels != -100).nonzero()[0])  # first target token: "The"
        prefix = len(tok.encode("The answer is", add_special_tokens=False))
        with torch.no_grad():
            full = model(**batch).logits[0]  # (T, V)
        assert int(batch["input_ids"][0, start + prefix]) == letters[0]  # the slot predicts " A"
        torch.testing.assert_close(got[s.id], full[start + prefix - 1, letters], rtol=1e-4, atol=1e-4)


def test_evaluate_keeps_readable_answers_and_forces_only_the_rest(tmp_path: Path, monkeypatch) -> None:
    import ademvl.recipes.evaluate
    from ademvl.data import Sample
    from ademvl.recipes import demo
    from ademvl.recipes.evaluate import Evaluation
    from ademvl.tasks import scienceqa

    data = shapes.write_dataset(tmp_path / "data", 20, seed=0)
    test = json.loads((data / "pid_splits.json").read_text())["test"]
    assert len(test) == 2
    readable, unreadable = test
    items = [Sample(p, None, [("q", "")], {"choices": ["a", "b"]}) for p in test]
    monkeypatch.setattr(ademvl.recipes.evaluate, "evaluate", lambda *a, **k: Evaluation(
        "scienceqa", {"preds.json": {readable: 1, unreadable: -1}}, {}, "", items))
    asked = []
    monkeypatch.setattr(scienceqa, "forced_choice", lambda model, samples, bs: asked.extend(s.id for s in samples) or {unreadable: 0})
    out = tmp_path / "eval"
    out.mkdir()
    res = demo.evaluate(None, data, out)
    assert asked == [unreadable]
    assert json.loads((out / "forced_choice.json").read_text()) == {readable: 1, unreadable: 0}
    problems = json.loads((data / "problems.json").read_text())
    assert res["forced_choice_per_type"] == shapes.per_type(problems, {readable: 1, unreadable: 0}, test)
