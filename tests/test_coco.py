"""COCO captions: the Karpathy files, pycocoevalcap's scores (checked against hand counts), the
Java check, `ademvl score coco` and `ademvl eval coco`."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from ademvl.cli import main
from ademvl.metrics import captions
from ademvl.recipes.evaluate import evaluate
from ademvl.tasks import coco

from .test_evaluate import script
from .conftest import tiny_model


@pytest.fixture()
def karpathy(tmp_path):
    """Two val images with references; a train file of two captions."""
    (tmp_path / "val2014").mkdir()
    for i in (42, 7):
        Image.new("P", (40, 30)).save(tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg".replace(".jpg", ".png"))
    val = [{"image": "val2014/COCO_val2014_000000000042.png", "caption": ["A man riding a horse.", "a rider"]},
           {"image": "val2014/COCO_val2014_000000000007.png", "caption": ["two cats sleep on the sofa"]}]
    train = [{"image": "val2014/COCO_val2014_000000000042.png", "caption": "A MAN (riding) a horse!!", "image_id": "42"},
             {"image": "val2014/COCO_val2014_000000000007.png", "caption": "cats", "image_id": "7"}]
    gt = {"images": [{"id": 42}, {"id": 7}], "annotations": [
        {"image_id": 42, "id": 1, "caption": "a man riding a horse"},
        {"image_id": 7, "id": 2, "caption": "two cats sleep on the sofa"}]}
    for name, obj in [("coco_karpathy_val.json", val), ("coco_karpathy_train.json", train), ("coco_karpathy_val_gt.json", gt)]:
        (tmp_path / name).write_text(json.dumps(obj))
    return tmp_path


def test_pre_caption():
    assert coco.pre_caption("A MAN (riding) a horse!!") == "a man riding a horse"
    assert coco.pre_caption("one two three four", max_words=2) == "one two"


def test_load_karpathy(karpathy):
    train = coco.load_samples(str(karpathy), "train")
    assert [s.turns for s in train] == [[("a picture of", "a man riding a horse")], [("a picture of", "cats")]]
    val = coco.load_samples(str(karpathy), "val")
    assert [s.meta["image_id"] for s in val] == [42, 7]  # from the file name
    assert val[0].meta["captions"] == ["A man riding a horse.", "a rider"]
    (karpathy / "val2014" / "COCO_val2014_000000000007.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"coco_karpathy_val.json\[1\]: image .*000000000007.png not found"):
        coco.load_samples(str(karpathy), "val")
    with pytest.raises(FileNotFoundError, match="coco_karpathy_test.json"):
        coco.load_samples(str(karpathy), "test")


def test_score_coco_by_hand(karpathy):
    preds = [{"image_id": 42, "caption": "A man riding a dog."}, {"image_id": 7, "caption": "two cats sleep on the sofa"}]
    s = coco.score_coco(karpathy / "coco_karpathy_val_gt.json", preds)
    assert list(s) == list(coco.KEYS)
    # After PTB tokenisation (lower case, "." dropped): hyp 1 "a man riding a dog" vs "a man riding a horse",
    # hyp 2 equal to its reference. Corpus BLEU, n-grams matched / in hypotheses: 1-grams 10/11,
    # 2-grams 8/9, 3-grams 6/7, 4-grams 4/5; lengths equal, so no brevity penalty.
    p = [10 / 11, 8 / 9, 6 / 7, 4 / 5]
    for n in range(1, 5):
        assert s[f"Bleu_{n}"] == pytest.approx(math.prod(p[:n]) ** (1 / n), abs=1e-6)
    # ROUGE-L per image, LCS-based F with beta 1.2: image 1 LCS 4 of 5 -> 0.8; image 2 -> 1.0
    assert s["ROUGE_L"] == pytest.approx(0.9, abs=1e-9)
    # CIDEr-D: every n-gram occurs in one image's references, so all idf weights are log 2 and
    # cancel; image 1 cosines 6/7 (a:2 counts twice), 3/4, 2/3, 1/2; image 2 all 1; times 10.
    assert s["CIDEr"] == pytest.approx((10 * (6 / 7 + 3 / 4 + 2 / 3 + 1 / 2) / 4 + 10) / 2, abs=1e-6)
    assert 0.5 < s["METEOR"] < 1.0  # METEOR 1.5 (Java): not reproduced by hand


def test_score_coco_rules(karpathy, monkeypatch):
    gt = karpathy / "coco_karpathy_val_gt.json"
    with pytest.raises(ValueError, match="image_id 99 is not in"):
        coco.score_coco(gt, [{"image_id": 99, "caption": "x"}])
    with pytest.raises(ValueError, match="a second caption for image_id 42"):
        coco.score_coco(gt, [{"image_id": 42, "caption": "x"}, {"image_id": 42, "caption": "y"}])
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="needs Java.*no `java` is on PATH"):
        coco.score_coco(gt, [{"image_id": 42, "caption": "x"}, {"image_id": 7, "caption": "y"}])


def test_score_cli_and_eval(karpathy, monkeypatch, tmp_path, capsys):
    model = tiny_model()
    script(model, monkeypatch, lambda i: ["a man riding a horse", "two cats sleep on the sofa"][i])
    opts = coco.EvalOptions(data_root=str(karpathy), split="val",
                            metrics=["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"])
    r = evaluate(model, "coco", opts, out_dir=tmp_path / "out", batch_size=2)
    assert r.outputs["preds.json"] == [{"image_id": 42, "caption": "a man riding a horse"},
                          {"image_id": 7, "caption": "two cats sleep on the sofa"}]
    assert r.scores["Bleu_4"] == pytest.approx(1.0, abs=1e-6) and r.scores["CIDEr"] == pytest.approx(10.0)
    assert main(["score", "coco", "--gt", str(karpathy / "coco_karpathy_val_gt.json"),
                 "--preds", str(tmp_path / "out" / "preds.json"), "--out", str(tmp_path / "s.json")]) == 0
    head, row = capsys.readouterr().out.strip().splitlines()[-2:]
    assert head.split() == list(coco.KEYS) and row.split()[3] == "100.00"
    assert json.loads((tmp_path / "s.json").read_text())["CIDEr"] == pytest.approx(10.0)
