"""ScienceQA: prompts as the templates define them, answer reading, both data layouts, the rules
every problem must pass, and the official scores (checked against counts made by hand)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from ademvl.cli import main
from ademvl.tasks import scienceqa as sqa


def problem(**kw) -> dict:
    p = {"question": "Which is a mammal?", "choices": ["frog", "horse"], "answer": 1, "hint": "", "image": None,
         "subject": "natural science", "grade": "grade3", "split": "test", "lecture": "", "solution": ""}
    p.update(kw)
    return p


def write_released(root: Path, problems: dict, splits: dict, captions: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    for pid, p in problems.items():
        if p.get("image"):
            d = root / "images" / p["split"] / pid
            d.mkdir(parents=True, exist_ok=True)
            Image.new("L", (30, 20), 128).save(d / "image.png")  # grayscale: the loader converts it
    if captions is not None:
        (root / "captions.json").write_text(json.dumps({"captions": captions}))
    return root


# ---- prompts --------------------------------------------------------------------------------
def test_cqm_a_prompt_and_target():
    prompt, target = sqa.build_prompt(problem(), "CQM-A")
    assert prompt == "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) frog (B) horse\nResponse:"
    assert target == "The answer is B."


def test_qcm_a_uses_hint_and_caption():
    p = problem(hint="Look at the animals.", caption="Two animals.")
    assert sqa.build_prompt(p, "QCM-A")[0] == ("Question: Which is a mammal?\nContext: Look at the animals.\n"
                                               "Options: (A) frog (B) horse\nResponse:")
    assert sqa.build_prompt(p, "QCM-A", use_caption=True)[0].split("\n")[1] == "Context: Look at the animals. Two animals."
    # caption only, hint empty: the caption alone is the context
    assert sqa.build_prompt(problem(caption="Two animals."), "CQM-A", True)[0].startswith("Context: Two animals.\n")


def test_lecture_and_solution_outputs():
    p = problem(lecture="Mammals have fur.\nFrogs do not.", solution="A horse has fur.")
    assert sqa.build_prompt(p, "CQM-LA")[1] == "Mammals have fur.\\nFrogs do not. The answer is B."
    assert sqa.build_prompt(p, "QCM-LEA")[1] == "Mammals have fur.\\nFrogs do not. A horse has fur. The answer is B."
    assert sqa.build_prompt(p, "CQM-EA")[1] == "A horse has fur. The answer is B."
    assert sqa.build_prompt(p, "CQM-AL")[1] == "The answer is B. BECAUSE: Mammals have fur.\\nFrogs do not."
    assert sqa.build_prompt(problem(), "CQM-AL")[1] == "The answer is B."  # empty lecture: no dangling BECAUSE:


def test_five_options_and_unknown_format():
    p = problem(choices=["a", "b", "c", "d", "e"], answer=4)
    prompt, target = sqa.build_prompt(p, "CQM-A")
    assert "Options: (A) a (B) b (C) c (D) d (E) e\n" in prompt and target == "The answer is E."
    with pytest.raises(ValueError, match="prompt_format='CQX-A'.*CQM"):
        sqa.build_prompt(p, "CQX-A")


@pytest.mark.parametrize("text,n,expected", [
    ("The answer is B.", 2, 1),
    ("The answer is (C).", 4, 2),
    ("Because ... The answer is A. Then The answer is D.", 4, 3),  # the last one counts
    ("The answer is E.", 3, -1),  # names no choice
    ("::::", 4, -1),
    ("the answer is b", 2, -1),  # not the trained form
])
def test_parse_answer(text, n, expected):
    assert sqa.parse_answer(text, n) == expected


# ---- reading --------------------------------------------------------------------------------
def test_released_layout(tmp_path):
    probs = {"1": problem(image="image.png", hint="Hint one."), "2": problem(split="train"), "3": problem()}
    root = write_released(tmp_path / "sqa", probs, {"test": ["3", "1"], "train": ["2"]}, {"1": "A cat."})
    samples = sqa.load_samples(str(root), "test", use_caption=True)
    assert [s.id for s in samples] == ["3", "1"]  # the split's order
    assert samples[1].image == str(root / "images" / "test" / "1" / "image.png") and samples[0].image is None
    assert samples[1].turns[0][0].startswith("Context: Hint one. A cat.\n")
    assert samples[1].meta["choices"] == ["frog", "horse"] and samples[1].meta["answer"] == 1
    assert samples[1].meta["hint"] == "Hint one." and samples[1].meta["image"] == "image.png"
    with pytest.raises(ValueError, match="no split 'val'"):
        sqa.load_samples(str(root), "val")
    (root / "captions.json").unlink()
    with pytest.raises(FileNotFoundError, match="captions.json"):
        sqa.load_samples(str(root), "test", use_caption=True)


def test_rules_stop_or_skip(tmp_path):
    probs = {"1": problem(choices=["only"], answer=0), "2": problem(choices=list("abcdef"), answer=5),
             "3": problem(), "4": problem(answer=2), "5": problem(image="image.png")}
    root = write_released(tmp_path / "sqa", probs, {"test": list(probs)})
    (root / "images" / "test" / "5" / "image.png").unlink()
    with pytest.raises(ValueError) as e:
        sqa.load_samples(str(root), "test")
    msg = str(e.value)
    assert "problem 1: 1 choices; ScienceQA problems have 2 to 5" in msg
    assert "problem 2: 6 choices" in msg and "problem 4: answer index 2" in msg and "--skip-invalid" in msg
    with pytest.warns(UserWarning, match="skipping 4 problems"):
        samples = sqa.load_samples(str(root), "test", skip_invalid=True)
    assert [s.id for s in samples] == ["3"]
    assert "problem 5: image file" in sqa.check_problem("5", sqa.read_problems(root, "test")["5"])


def test_parquet_layout(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.setenv("ADEMVL_CACHE", str(tmp_path / "cache"))
    png = io.BytesIO()
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(png, format="PNG")
    rows = [dict(image={"bytes": png.getvalue(), "path": "x.png"}, question="Q1?", choices=["a", "b"], answer=0,
                 hint="", task="closed choice", grade="grade2", subject="natural science", topic="t", category="c",
                 skill="s", lecture="", solution=""),
            dict(image=None, question="Q2?", choices=["a", "b", "c"], answer=2, hint="H.", task="closed choice",
                 grade="grade8", subject="language science", topic="t", category="c", skill="s", lecture="",
                 solution="")]
    (tmp_path / "hf" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hf" / "data" / "validation-00000-of-00001.parquet")
    samples = sqa.load_samples(str(tmp_path / "hf"), "val")
    assert [s.id for s in samples] == ["val-00000", "val-00001"]
    assert Path(samples[0].image).read_bytes() == png.getvalue()  # stored bytes, not re-encoded
    assert samples[1].image is None and samples[1].turns[0] == (
        "Context: H.\nQuestion: Q2?\nOptions: (A) a (B) b (C) c\nResponse:", "The answer is C.")


# ---- scores ---------------------------------------------------------------------------------
def scored_problems() -> dict:
    """8 problems; by hand: natural 1,2,3,4 / social 5,6 / language 7,8; hint: 2,5,7; image: 1,2,5;
    none: 3,4,6,8; grades 1-6: 1,2,5,7 / 7-12: 3,4,6,8."""
    P = problem
    return {
        "1": P(image="image.png", grade="grade1"), "2": P(image="image.png", hint="h", grade="grade6"),
        "3": P(grade="grade7"), "4": P(grade="grade12"),
        "5": P(subject="social science", image="image.png", hint="h", grade="grade2"),
        "6": P(subject="social science", grade="grade9"),
        "7": P(subject="language science", hint="h", grade="grade4"), "8": P(subject="language science", grade="grade10"),
    }


def test_score_scienceqa_by_hand():
    # right (answer 1): 1, 2, 3, 5, 7; wrong: 4 (0), 6 (-1, unreadable), 8 (0)
    preds = {"1": 1, "2": 1, "3": 1, "4": 0, "5": 1, "6": -1, "7": 1, "8": 0}
    s = sqa.score_scienceqa(scored_problems(), preds)
    assert s == {"acc_natural": 75.0,       # 3 of 4
                 "acc_social": 50.0,        # 1 of 2
                 "acc_language": 50.0,      # 1 of 2
                 "acc_has_text": 100.0,     # 2, 5, 7
                 "acc_has_image": 100.0,    # 1, 2, 5
                 "acc_no_context": 25.0,    # 3 of 3, 4, 6, 8
                 "acc_grade_1_6": 100.0,    # 1, 2, 5, 7
                 "acc_grade_7_12": 25.0,    # 3 of 3, 4, 6, 8
                 "acc_average": 62.5}       # 5 of 8
    assert list(s) == list(sqa.KEYS)
    only = sqa.score_scienceqa(scored_problems(), {"1": 1, "3": 0, "4": 1})  # 2 of 3; no social/language
    assert only["acc_average"] == 66.67 and only["acc_social"] is None and only["acc_natural"] == 66.67
    with pytest.raises(ValueError, match="2 of the 3 problems of the split have no prediction"):
        sqa.score_scienceqa(scored_problems(), {"1": 1}, ["1", "2", "3"])
    with pytest.raises(ValueError, match="not in the problems"):
        sqa.score_scienceqa(scored_problems(), {"99": 1})


def test_score_cli(tmp_path, capsys):
    probs = scored_problems()
    for pid, p in probs.items():
        p["split"] = "test" if int(pid) <= 4 else "train"
    (tmp_path / "problems.json").write_text(json.dumps(probs))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4"], "train": ["5", "6", "7", "8"]}))
    (tmp_path / "preds.json").write_text(json.dumps({"1": 1, "2": 0, "3": 1, "4": 1}))
    assert main(["score", "scienceqa", "--problems", str(tmp_path / "problems.json"),
                 "--preds", str(tmp_path / "preds.json"), "--split", "test", "--out", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"]
    assert out[1].split() == ["test", "75.00", "-", "-", "0.00", "50.00", "100.00", "50.00", "100.00", "75.00"]
    assert json.loads((tmp_path / "s.json").read_text())["acc_average"] == 75.0
