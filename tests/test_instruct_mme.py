"""Instruction data (LLaVA conversations, all_data.json) and MME: loaders, result files in the
eval_tool's layout, and its acc / acc+ / totals checked against hand counts."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ademvl.cli import main
from ademvl.recipes.evaluate import evaluate
from ademvl.data import IGNORE_INDEX
from ademvl.tasks import instruct, mme

from .conftest import tiny_model
from .test_evaluate import script


# ---- instruction following ------------------------------------------------------------------
def llava(tmp_path, records):
    Image.new("CMYK", (20, 20)).save(tmp_path / "a.jpg")
    (tmp_path / "conv.json").write_text(json.dumps(records))
    return tmp_path / "conv.json"


def test_llava_multiturn_loss_on_answers_only(tmp_path):
    path = llava(tmp_path, [
        {"id": "x1", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A box."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]},
        {"id": "x2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}])
    samples = instruct.load_samples(str(path))
    assert samples[0].image == str(tmp_path / "a.jpg") and samples[1].image is None
    assert samples[0].turns == [("Instruction: What is it?\nResponse:", "A box."),
                                ("Instruction: Colour?\nResponse:", "Black.")]
    model = tiny_model()
    enc = model.processor.encode(samples[0])
    tok = model.tokenizer
    learned = [t for t, l in zip(enc["input_ids"], enc["labels"]) if l != IGNORE_INDEX]
    eos = tok.eos_token_id
    assert learned == tok("A box.", add_special_tokens=False).input_ids + [eos] + \
        tok("Black.", add_special_tokens=False).input_ids + [eos]
    batch = model.processor(samples)  # the CMYK image loads as RGB
    assert batch["image_mask"].tolist() == [True, False]


def test_llava_rules(tmp_path):
    path = llava(tmp_path, [{"id": "bad", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}])
    with pytest.raises(ValueError, match=r"conv.json\[0\] \(id bad\): turns 0, 1 are 'gpt', 'human'"):
        instruct.load_samples(str(path))
    path = llava(tmp_path, [{"id": "img", "image": "missing.jpg", "conversations": []}])
    with pytest.raises(FileNotFoundError, match="missing.jpg not found"):
        instruct.load_samples(str(path))


def test_all_data_layout(tmp_path):
    (tmp_path / "images" / "train" / "q1").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "train" / "q1" / "image.png")
    data = {"train": [{"qid": "q1", "instruction": "Instruction: Q?\nResponse:", "answer": "A.", "image": "image.png",
                       "image_source": "sqa"},
                      {"qid": "q2", "instruction": "Instruction: T?\nResponse:", "answer": "B.", "image": None,
                       "image_source": None}]}
    (tmp_path / "all_data.json").write_text(json.dumps(data))
    samples = instruct.load_samples(str(tmp_path / "all_data.json"), split="train")
    assert samples[0].image == str(tmp_path / "images" / "train" / "q1" / "image.png")
    assert samples[1].turns == [("Instruction: T?\nResponse:", "B.")] and samples[1].image is None


# ---- MME ------------------------------------------------------------------------------------
@pytest.fixture()
def mme_root(tmp_path):
    """existence (flat layout): 2 images; artwork (images/ + questions_answers_YN/): 1 image."""
    root = tmp_path / "MME"
    (root / "existence").mkdir(parents=True)
    for name in ("000", "001"):
        Image.new("RGB", (16, 16)).save(root / "existence" / f"{name}.jpg")
        (root / "existence" / f"{name}.txt").write_text(
            "Is there a cat in this image? Please answer yes or no.\tYes\n"
            "Is there a dog in this image? Please answer yes or no.\tNo\n")
    (root / "artwork" / "images").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN").mkdir()
    Image.new("RGB", (16, 16)).save(root / "artwork" / "images" / "10.jpg")
    (root / "artwork" / "questions_answers_YN" / "10.txt").write_text(
        "Is this by Monet? Please answer yes or no.\tNo\nIs this by Manet? Please answer yes or no.\tYes\n")
    return root


def test_mme_loader(mme_root):
    samples = mme.load_samples(str(mme_root))
    assert [s.id for s in samples] == ["existence/000/1", "existence/000/2", "existence/001/1", "existence/001/2",
                                       "artwork/10/1", "artwork/10/2"]
    assert samples[0].turns == [("Instruction: Is there a cat in this image? Please answer yes or no.\nResponse:", "Yes")]
    assert samples[4].image == str(mme_root / "artwork" / "images" / "10.jpg")
    (mme_root / "artwork" / "questions_answers_YN" / "10.txt").write_text("no tab here\n")
    with pytest.raises(ValueError, match=r"10.txt:1: expected 'question<TAB>Yes\|No'"):
        mme.load_samples(str(mme_root))


def test_mme_label():
    assert [mme.mme_label(a) for a in ["Yes", "no", "Yes, it is.", "No.", "Not sure", "maybe", "I think yes"]] == \
        ["yes", "no", "yes", "no", "no", "other", "other"]  # the eval_tool reads only the first 4 characters


def test_score_mme_by_hand(tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    # existence: image a both right, image b one right -> acc 3/4 = 75, acc+ 1/2 = 50, score 125
    (res / "existence.txt").write_text("a.jpg\tQ1\tYes\tYes\na.jpg\tQ2\tNo\tNo, it is not.\n"
                                       "b.jpg\tQ1\tYes\tYes\nb.jpg\tQ2\tNo\tmaybe\n")
    # code_reasoning: one image, one right -> acc 50, acc+ 0, score 50
    (res / "code_reasoning.txt").write_text("c.png\tQ1\tYes\tno\nc.png\tQ2\tNo\tNo\n")
    with pytest.warns(UserWarning, match="no results for count"):
        s = mme.score_mme(res)
    assert s["subtasks"] == {"existence": {"acc": 75.0, "acc_plus": 50.0, "score": 125.0},
                             "code_reasoning": {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}}
    assert s["perception"] == 125.0 and s["cognition"] == 50.0 and "count" in s["missing"]
    (res / "count.txt").write_text("a.jpg\tQ1\tYes\tYes\nb.jpg\tQ2\tNo\tNo\n")
    with pytest.raises(ValueError, match=r"count.txt:1-2: consecutive lines name different images"):
        mme.score_mme(res)


def test_eval_and_score_mme(mme_root, tmp_path, monkeypatch, capsys):
    model = tiny_model()
    # existence: 000 both right; 001 first wrong. artwork: first right, second answered "maybe"
    answers = ["Yes", "No", "No", "No", "No", "maybe\tso"]
    script(model, monkeypatch, lambda i: answers[i])
    r = evaluate(model, "mme", mme.EvalOptions(data_root=str(mme_root)), tmp_path / "out", batch_size=4)
    lines = (tmp_path / "out" / "artwork.txt").read_text().splitlines()
    assert lines == ["10.jpg\tIs this by Monet? Please answer yes or no.\tNo\tNo",
                     "10.jpg\tIs this by Manet? Please answer yes or no.\tYes\tmaybe so"]
    assert r.scores["subtasks"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert r.scores["subtasks"]["artwork"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert r.scores["perception"] == 175.0 and r.scores["cognition"] == 0
    with pytest.warns(UserWarning):
        assert main(["score", "mme", "--results", str(tmp_path / "out"), "--out", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-3:] == [f"{'Perception':<24}{'':>16}{175.0:>9.2f}", f"{'Cognition':<24}{'':>16}{0.0:>9.2f}",
                        "(no results for: " + ", ".join(n for n in mme.SUBTASKS if n not in ("existence", "artwork")) + ")"]
    assert json.loads((tmp_path / "s.json").read_text())["perception"] == 175.0
