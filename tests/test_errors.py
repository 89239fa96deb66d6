"""Bad input anywhere in the CLI (docs/errors.md): a clear message that names the culprit, never a traceback.

Every row of docs/errors.md's table is one case below (a test checks that the two lists agree).
Each case builds one broken input in its own directory, runs the real entry point
`ademvl.cli.main`, and checks the exit status, that no traceback is printed, and that the one
error line names the file or key at fault. One tiny checkpoint and one small synthetic ScienceQA
are made once for the module and copied where a case breaks them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from ademvl.cli import main
from ademvl.tasks.shapes import write_dataset

from .conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "ademvl" / "configs" / "tiny.yaml"

Case = Callable[[Path, Path], tuple[list[str], list[str]]]
CASES: dict[str, tuple[Case, int]] = {}


def case(name: str, rc: int = 2) -> Callable[[Case], Case]:
    """Register a row of docs/errors.md: `fn(shared, tmp) -> (argv, texts the stderr must hold)`."""
    def register(fn: Case) -> Case:
        assert name not in CASES, name
        CASES[name] = (fn, rc)
        return fn
    return register


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """One tiny checkpoint and one synthetic ScienceQA (50 problems), made once."""
    root = tmp_path_factory.mktemp("shared")
    tiny_model().save_pretrained(root / "ckpt")
    write_dataset(root / "sqa", 50, seed=0)  # 5 test problems, images among them
    return root


# ---- helpers ---------------------------------------------------------------------------------
def ckpt(shared: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(shared / "ckpt", tmp / "ckpt"))


def sqa(shared: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(shared / "sqa", tmp / "sqa"))


def edit_json(path: Path, change: Callable[[object], object]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def generate(checkpoint: Path, *extra: str) -> list[str]:
    return ["generate", "--checkpoint", str(checkpoint), "--prompt", "What color?", "--max-new-tokens", "2", *extra]


def eval_sqa(checkpoint: Path, root: Path, *extra: str) -> list[str]:
    return ["eval", "scienceqa", "--checkpoint", str(checkpoint), "--data-root", str(root), "--device", "cpu",
            "--batch-size", "2", *extra]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (no pixel data): PIL's decompression-bomb check fires on open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def truncated_png(path: Path) -> Path:
    Image.effect_noise((64, 64), 60).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def first_test_pid(root: Path) -> str:
    return json.loads((root / "pid_splits.json").read_text())["test"][0]


def first_image_pid(root: Path) -> str:
    problems = json.loads((root / "problems.json").read_text())
    return next(p for p in json.loads((root / "pid_splits.json").read_text())["test"] if problems[p]["image"])


def sqa_preds(shared: Path, tmp: Path, preds: object | str) -> list[str]:
    """`ademvl score scienceqa` on the shared problems with preds.json holding `preds` (text as is)."""
    path = tmp / "preds.json"
    path.write_text(preds if isinstance(preds, str) else json.dumps(preds))
    return ["score", "scienceqa", "--problems", str(shared / "sqa" / "problems.json"), "--preds", str(path)]


def sqa_test_pids(shared: Path) -> list[str]:
    return json.loads((shared / "sqa" / "pid_splits.json").read_text())["test"]


def train_config(tmp: Path, text: str | bytes) -> list[str]:
    path = tmp / "run.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return ["train", "--config", str(path), "--output-dir", str(tmp / "out")]


# ---- checkpoints (generate, eval: --checkpoint) ----------------------------------------------
@case("checkpoint-missing")
def _(shared, tmp):
    return generate(tmp / "nope"), [f"{tmp / 'nope'}: checkpoint not found"]


@case("checkpoint-is-the-weights-file")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    return generate(c / "adapter.safetensors"), [f"{c / 'adapter.safetensors'}: is a file; a checkpoint is the directory", f"pass its directory, {c}"]


@case("checkpoint-config-missing")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    (c / "ademvl_config.json").unlink()
    return generate(c), [f"{c / 'ademvl_config.json'}: the checkpoint's ADEM-VL config {{field: value}} not found"]


@case("checkpoint-config-empty")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    (c / "ademvl_config.json").write_text("")
    return generate(c), [f"{c / 'ademvl_config.json'}: empty; expected the checkpoint's ADEM-VL config"]


@case("checkpoint-config-cut-short")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    text = (c / "ademvl_config.json").read_text()
    (c / "ademvl_config.json").write_text(text[: len(text) // 2])
    return generate(c), [f"{c / 'ademvl_config.json'}: not valid JSON", "(the file ends too early: cut short?)"]


@case("checkpoint-config-a-list")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    (c / "ademvl_config.json").write_text("[1, 2]")
    return generate(c), [f"{c / 'ademvl_config.json'}: holds a JSON list [...]; expected the checkpoint's ADEM-VL config"]


@case("checkpoint-config-unknown-key")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    edit_json(c / "ademvl_config.json", lambda d: {**d, "alpah": 0.2})
    return generate(c), [f"{c / 'ademvl_config.json'}: bad ADEM-VL config: unknown AdemVLConfig key(s) ['alpah']"]


@case("checkpoint-config-wrong-type")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    edit_json(c / "ademvl_config.json", lambda d: {**d, "adapter_dim": "twelve"})
    return generate(c), [f"{c / 'ademvl_config.json'}: bad ADEM-VL config: AdemVLConfig adapter_dim: Value 'twelve'"]


@case("checkpoint-config-bad-value")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    edit_json(c / "ademvl_config.json", lambda d: {**d, "drop_ratio": 1.5})
    return generate(c), [f"{c / 'ademvl_config.json'}: bad ADEM-VL config: drop_ratio=1.5: must be in [0, 1)"]


@case("checkpoint-config-nan")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    (c / "ademvl_config.json").write_text((c / "ademvl_config.json").read_text().replace('"alpha": 0.1', '"alpha": NaN'))
    return generate(c), [f"{c / 'ademvl_config.json'}: NaN is not a JSON number"]


@case("checkpoint-config-not-utf8")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    (c / "ademvl_config.json").write_bytes('{"image_prefix": "Bild: ü"}'.encode("latin-1"))
    return generate(c), [f"{c / 'ademvl_config.json'}: not UTF-8 text (byte 0xfc at offset 24)", "save the file as UTF-8"]


@case("checkpoint-base-not-a-mapping")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    edit_json(c / "ademvl_config.json", lambda d: {**d, "base": "llama"})
    return generate(c), [f"{c / 'ademvl_config.json'}: base is a str; expected the base models' description"]


@case("checkpoint-weights-missing")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    (c / "adapter.safetensors").unlink()
    return generate(c), [f"{c / 'adapter.safetensors'}: the checkpoint's ADEM-VL weights (trainable tensors only) not found"]


@case("checkpoint-weights-empty")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    (c / "adapter.safetensors").write_bytes(b"")
    return generate(c), [f"{c / 'adapter.safetensors'}: not a readable safetensors file (0 bytes;", "copy it again"]


@case("checkpoint-weights-cut-short")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    data = (c / "adapter.safetensors").read_bytes()
    (c / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    return generate(c), [f"{c / 'adapter.safetensors'}: not a readable safetensors file ({len(data) // 2} bytes;",
                         "an interrupted copy leaves a short file"]


@case("checkpoint-weights-not-safetensors")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    (c / "adapter.safetensors").write_bytes(b"PK\x03\x04 a zip file, say a torch.save pickle" * 4)
    return generate(c), [f"{c / 'adapter.safetensors'}: not a readable safetensors file"]


@case("checkpoint-weights-of-another-shape")
def _(shared, tmp):
    c = tmp / "ckpt"
    tiny_model(scales=(16,)).save_pretrained(c)  # 16 visual tokens, not 16 + 4
    config = json.loads((shared / "ckpt" / "ademvl_config.json").read_text())
    (c / "ademvl_config.json").write_text(json.dumps(config))  # ... but a config that says 16 + 4
    return generate(c), [f"{c}: does not fit the base models built (", "pos_k: checkpoint (16, 64) vs model (20, 64)"]


@case("checkpoint-base-num-layers-differs")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    edit_json(c / "ademvl_config.json", lambda d: {**d, "base": {**d["base"], "num_layers": 30}})
    return generate(c), [f"{c}: does not fit the base models built (num_layers 30 in the checkpoint, 2 built)",
                         "checkpoint made for: LLM random:tiny-llama", "--llm random:tiny-llama --vision random:tiny-clip"]


@case("checkpoint-base-vocab-and-width-differ")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    edit_json(c / "ademvl_config.json", lambda d: {**d, "base": {**d["base"], "vocab_size": 32000, "vision_blocks": 24}})
    return generate(c), ["vocab_size 32000 in the checkpoint, 49152 built", "vision_blocks 24 in the checkpoint, 3 built"]


@case("checkpoint-random-tower-differs")
def _(shared, tmp):
    c = ckpt(shared, tmp)
    edit_json(c / "ademvl_config.json", lambda d: {**d, "base": {**d["base"], "vision_fingerprint": "0123456789abcdef"}})
    return generate(c), ["the random vision tower's weights differ (vision_fingerprint 0123456789abcdef in the checkpoint"]


@case("checkpoint-llm-override-same-shape", rc=0)
def _(shared, tmp):
    return generate(shared / "ckpt", "--llm", "random:tiny-qwen2"), [
        f"{shared / 'ckpt'}: loading onto other base models of the same shape "
        "(llm random:tiny-llama in the checkpoint, random:tiny-qwen2 built; llm_type llama in the checkpoint, qwen2 built)"]


@case("checkpoint-vision-override-same-shape", rc=0)
def _(shared, tmp):
    return generate(shared / "ckpt", "--vision", "random:tiny-siglip"), [
        f"{shared / 'ckpt'}: loading onto other base models of the same shape (vision random:tiny-clip in the "
        "checkpoint, random:tiny-siglip built; the random vision tower's weights differ (vision_fingerprint"]


@case("checkpoint-llm-override-other-shape")
def _(shared, tmp):
    cfg = tmp / "wide" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, vocab_size=49152)))
    return generate(shared / "ckpt", "--llm", f"random:{cfg}"), [
        "hidden_size 64 in the checkpoint, 32 built", f"llm random:tiny-llama in the checkpoint, random:{cfg} built"]


@case("checkpoint-llm-unknown-name")
def _(shared, tmp):
    return generate(shared / "ckpt", "--llm", str(tmp / "no such model")), [f"{tmp / 'no such model'}: cannot load this LLM"]


# ---- generate --image -------------------------------------------------------------------------
@case("image-missing")
def _(shared, tmp):
    return generate(shared / "ckpt", "--image", str(tmp / "cat.png")), [f"{tmp / 'cat.png'}: image file not found; check the --image path"]


@case("image-is-a-directory")
def _(shared, tmp):
    return generate(shared / "ckpt", "--image", str(tmp)), [f"{tmp}: is a directory; expected an image file"]


@case("image-empty")
def _(shared, tmp):
    (tmp / "cat.png").write_bytes(b"")
    return generate(shared / "ckpt", "--image", str(tmp / "cat.png")), [f"{tmp / 'cat.png'}: cannot read this image"]


@case("image-not-an-image")
def _(shared, tmp):
    (tmp / "cat.png").write_text("a cat, sitting")
    return generate(shared / "ckpt", "--image", str(tmp / "cat.png")), [
        f"{tmp / 'cat.png'}: cannot read this image (not an image format PIL knows); re-encode it as PNG or JPEG"]


@case("image-cut-short")
def _(shared, tmp):
    path = truncated_png(tmp / "cat.png")
    return generate(shared / "ckpt", "--image", str(path)), [f"{path}: cannot read this image (", "re-encode it"]


@case("image-huge")
def _(shared, tmp):
    (tmp / "cat.png").write_bytes(png_header(30000, 30000))
    return generate(shared / "ckpt", "--image", str(tmp / "cat.png")), [
        f"{tmp / 'cat.png'}: image too large to decode safely", "downscale it"]


@case("image-path-with-spaces-and-non-ascii", rc=0)
def _(shared, tmp):
    path = tmp / "mes images" / "chat ü 猫.png"
    path.parent.mkdir()
    Image.new("RGB", (40, 30), (0, 128, 0)).save(path)
    return generate(shared / "ckpt", "--image", str(path)), []


# ---- eval scienceqa --data-root ----------------------------------------------------------------
@case("sqa-root-missing")
def _(shared, tmp):
    return eval_sqa(shared / "ckpt", tmp / "nope"), [f"{tmp / 'nope'}: no ScienceQA data here; expected problems.json"]


@case("sqa-problems-malformed")
def _(shared, tmp):
    root = sqa(shared, tmp)
    (root / "problems.json").write_text('{"1": {"question": "Which?" "choices": []}}')
    return eval_sqa(shared / "ckpt", root), [f"{root / 'problems.json'}: not valid JSON: Expecting ',' delimiter at line 1 column 29"]


@case("sqa-problems-a-list")
def _(shared, tmp):
    root = sqa(shared, tmp)
    (root / "problems.json").write_text("[]")
    return eval_sqa(shared / "ckpt", root), [f"{root / 'problems.json'}: holds a JSON list [...]; expected ScienceQA problems.json {{pid: problem}}"]


@case("sqa-problems-not-utf8")
def _(shared, tmp):
    root = sqa(shared, tmp)
    (root / "problems.json").write_bytes((root / "problems.json").read_text().encode("utf-16"))
    return eval_sqa(shared / "ckpt", root), [f"{root / 'problems.json'}: not UTF-8 text (byte 0xff at offset 0)"]


@case("sqa-splits-a-list")
def _(shared, tmp):
    root = sqa(shared, tmp)
    (root / "pid_splits.json").write_text('["1", "2"]')
    return eval_sqa(shared / "ckpt", root), [f"{root / 'pid_splits.json'}: holds a JSON list [...]; expected ScienceQA pid_splits.json"]


@case("sqa-split-unknown")
def _(shared, tmp):
    return eval_sqa(shared / "ckpt", shared / "sqa", "--split", "dev"), [
        f"{shared / 'sqa' / 'pid_splits.json'}: no split 'dev'; it has train, val, test"]


@case("sqa-split-ids-unknown")
def _(shared, tmp):
    root = sqa(shared, tmp)
    edit_json(root / "pid_splits.json", lambda d: {**d, "test": ["nope", *d["test"]]})
    return eval_sqa(shared / "ckpt", root), [f"{root / 'pid_splits.json'}: 1 test ids are not in problems.json (e.g. ['nope'])"]


@case("sqa-problem-not-an-object")
def _(shared, tmp):
    root = sqa(shared, tmp)
    pid = first_test_pid(root)
    edit_json(root / "problems.json", lambda d: {**d, pid: "Which is a mammal?"})
    return eval_sqa(shared / "ckpt", root), [f"{root / 'problems.json'}: problem {pid} is a str; expected {{question, choices"]


@case("sqa-problem-six-choices")
def _(shared, tmp):
    root = sqa(shared, tmp)
    pid = first_test_pid(root)
    edit_json(root / "problems.json", lambda d: {**d, pid: {**d[pid], "choices": list("abcdef")}})
    return eval_sqa(shared / "ckpt", root), [f"{root / 'problems.json'}: problem {pid}: 6 choices; ScienceQA problems have 2 to 5",
                                             "--skip-invalid"]


@case("sqa-problem-answer-a-letter")
def _(shared, tmp):
    root = sqa(shared, tmp)
    pid = first_test_pid(root)
    edit_json(root / "problems.json", lambda d: {**d, pid: {**d[pid], "answer": "B"}})
    return eval_sqa(shared / "ckpt", root), [f"{root / 'problems.json'}: problem {pid}: answer index 'B' is not one of its"]


@case("sqa-problem-no-question")
def _(shared, tmp):
    root = sqa(shared, tmp)
    pid = first_test_pid(root)
    edit_json(root / "problems.json", lambda d: {**d, pid: {k: v for k, v in d[pid].items() if k != "question"}})
    return eval_sqa(shared / "ckpt", root), [f"{root / 'problems.json'}: problem {pid}: question is None; expected text"]


@case("sqa-image-missing")
def _(shared, tmp):
    root = sqa(shared, tmp)
    pid = first_image_pid(root)
    (root / "images" / "test" / pid / "image.png").unlink()
    return eval_sqa(shared / "ckpt", root), [f"problem {pid}: image file {root / 'images' / 'test' / pid / 'image.png'} not found"]


@case("sqa-image-not-an-image")
def _(shared, tmp):
    root = sqa(shared, tmp)
    path = root / "images" / "test" / first_image_pid(root) / "image.png"
    path.write_text("<html>404</html>")
    return eval_sqa(shared / "ckpt", root), [f"{path}: cannot read this image (not an image format PIL knows)"]


@case("sqa-captions-wrong-form")
def _(shared, tmp):
    root = sqa(shared, tmp)
    (root / "captions.json").write_text('{"1": "a cat"}')
    return eval_sqa(shared / "ckpt", root, "--use-caption"), [
        f"{root / 'captions.json'}: no \"captions\" object; expected {{\"captions\": {{pid: text}}}}"]


@case("sqa-parquet-cut-short")
def _(shared, tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp / "hf"
    root.mkdir()
    pq.write_table(pa.table({"question": ["Which?"] * 50, "choices": [["a", "b"]] * 50, "answer": [0] * 50,
                             "image": [None] * 50}), root / "test-00000-of-00001.parquet")
    data = (root / "test-00000-of-00001.parquet").read_bytes()
    (root / "test-00000-of-00001.parquet").write_bytes(data[: len(data) // 2])
    return eval_sqa(shared / "ckpt", root), [f"{root / 'test-00000-of-00001.parquet'}: not a readable parquet file"]


@case("eval-out-is-a-file")
def _(shared, tmp):
    (tmp / "results").write_text("earlier notes")
    return eval_sqa(shared / "ckpt", shared / "sqa", "--out", str(tmp / "results")), [
        f"{tmp / 'results'}: is a file; --out needs a directory"]


# ---- eval coco / mme ---------------------------------------------------------------------------
def eval_coco(shared: Path, root: Path) -> list[str]:
    return ["eval", "coco", "--checkpoint", str(shared / "ckpt"), "--data-root", str(root), "--device", "cpu"]


@case("coco-annotations-missing")
def _(shared, tmp):
    return eval_coco(shared, tmp), [f"{tmp / 'coco_karpathy_test.json'}: Karpathy annotation file not found; get coco_karpathy_test.json"]


@case("coco-annotations-an-object")
def _(shared, tmp):
    (tmp / "coco_karpathy_test.json").write_text('{"images": []}')
    return eval_coco(shared, tmp), [f"{tmp / 'coco_karpathy_test.json'}: holds a JSON object {{...}}; expected a Karpathy split file"]


@case("coco-entry-without-caption")
def _(shared, tmp):
    (tmp / "coco_karpathy_test.json").write_text('[{"image": "val2014/x_000000000001.jpg"}]')
    return eval_coco(shared, tmp), ["coco_karpathy_test.json[0]: expected {image: path, caption}"]


@case("mme-root-missing")
def _(shared, tmp):
    return ["eval", "mme", "--checkpoint", str(shared / "ckpt"), "--data-root", str(tmp / "MME")], [
        f"{tmp / 'MME'}: MME benchmark folder not found"]


@case("mme-questions-not-utf8")
def _(shared, tmp):
    (tmp / "MME" / "count").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp / "MME" / "count" / "1.jpg")
    (tmp / "MME" / "count" / "1.txt").write_bytes("Y a-t-il deux chats ? Répondez\tYes\n".encode("latin-1"))
    return ["eval", "mme", "--checkpoint", str(shared / "ckpt"), "--data-root", str(tmp / "MME")], [
        f"{tmp / 'MME' / 'count' / '1.txt'}: not UTF-8 text"]


@case("mme-question-line-malformed")
def _(shared, tmp):
    (tmp / "MME" / "count").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp / "MME" / "count" / "1.jpg")
    (tmp / "MME" / "count" / "1.txt").write_text("Are there two cats? Yes\n")
    return ["eval", "mme", "--checkpoint", str(shared / "ckpt"), "--data-root", str(tmp / "MME")], [
        f"{tmp / 'MME' / 'count' / '1.txt'}:1: expected 'question<TAB>Yes|No'"]


# ---- score scienceqa ---------------------------------------------------------------------------
@case("score-sqa-preds-a-list")
def _(shared, tmp):
    return sqa_preds(shared, tmp, ["A", "B"]), [
        f"{tmp / 'preds.json'}: holds a JSON list [...]; expected predictions {{pid: choice index}}"]


@case("score-sqa-preds-malformed")
def _(shared, tmp):
    return sqa_preds(shared, tmp, '{"1": 0,}'), [f"{tmp / 'preds.json'}: not valid JSON: Expecting property name"]


@case("score-sqa-preds-missing")
def _(shared, tmp):
    return ["score", "scienceqa", "--problems", str(shared / "sqa" / "problems.json"), "--preds", str(tmp / "p.json")], [
        f"{tmp / 'p.json'}: predictions {{pid: choice index}} (as ademvl eval scienceqa --out writes) not found"]


@case("score-sqa-preds-a-directory")
def _(shared, tmp):
    return ["score", "scienceqa", "--problems", str(shared / "sqa" / "problems.json"), "--preds", str(tmp)], [
        f"{tmp}: is a directory; expected predictions"]


@case("score-sqa-preds-empty-object")
def _(shared, tmp):
    return sqa_preds(shared, tmp, {}), [f"{tmp / 'preds.json'}: no predictions (an empty object)"]


@case("score-sqa-preds-unknown-ids")
def _(shared, tmp):
    return sqa_preds(shared, tmp, {"A": 0, "B": 1}), [
        f"{tmp / 'preds.json'}: 2 predicted ids are not in {shared / 'sqa' / 'problems.json'} (e.g. ['A', 'B'])"]


@case("score-sqa-pred-a-letter")
def _(shared, tmp):
    pid = sqa_test_pids(shared)[0]
    return sqa_preds(shared, tmp, {pid: "B"}), [
        f"{tmp / 'preds.json'}: prediction for {pid} is 'B' (a letter: write its index, A = 0); expected a choice index 0-4"]


@case("score-sqa-pred-a-fraction")
def _(shared, tmp):
    pid = sqa_test_pids(shared)[0]
    return sqa_preds(shared, tmp, {pid: 1.5}), [f"{tmp / 'preds.json'}: prediction for {pid} is 1.5; expected a choice index"]


@case("score-sqa-pred-nan")
def _(shared, tmp):
    pid = sqa_test_pids(shared)[0]
    return sqa_preds(shared, tmp, f'{{"{pid}": NaN}}'), [f"{tmp / 'preds.json'}: NaN is not a JSON number"]


@case("score-sqa-pred-infinite")
def _(shared, tmp):
    pid = sqa_test_pids(shared)[0]
    return sqa_preds(shared, tmp, f'{{"{pid}": 1e999}}'), [f"{tmp / 'preds.json'}: prediction for {pid} is inf"]


@case("score-sqa-pred-out-of-range")
def _(shared, tmp):
    pid = sqa_test_pids(shared)[0]
    return sqa_preds(shared, tmp, {pid: 7}), [f"{tmp / 'preds.json'}: prediction for {pid} is 7; expected a choice index 0-4"]


@case("score-sqa-split-not-all-predicted")
def _(shared, tmp):
    pids = sqa_test_pids(shared)
    return sqa_preds(shared, tmp, {pids[0]: 0}) + ["--split", "test"], [
        f"{tmp / 'preds.json'}: {len(pids) - 1} of the {len(pids)} problems of split 'test' have no prediction"]


@case("score-sqa-problems-missing")
def _(shared, tmp):
    (tmp / "preds.json").write_text("{}")
    return ["score", "scienceqa", "--problems", str(tmp / "problems.json"), "--preds", str(tmp / "preds.json")], [
        f"{tmp / 'problems.json'}: ScienceQA problems.json {{pid: problem}} not found"]


@case("score-sqa-problem-without-answer")
def _(shared, tmp):
    root = sqa(shared, tmp)
    pid = first_test_pid(root)
    edit_json(root / "problems.json", lambda d: {**d, pid: {k: v for k, v in d[pid].items() if k != "answer"}})
    (tmp / "preds.json").write_text(json.dumps({pid: 0}))
    return ["score", "scienceqa", "--problems", str(root / "problems.json"), "--preds", str(tmp / "preds.json")], [
        f"{root / 'problems.json'}: problem {pid} has no answer index"]


@case("score-out-is-a-directory")
def _(shared, tmp):
    pid = sqa_test_pids(shared)[0]
    return sqa_preds(shared, tmp, {pid: 0}) + ["--out", str(tmp)], [
        f"{tmp}: is a directory; expected the path of a file to write"]


# ---- score coco / mme --------------------------------------------------------------------------
def coco_files(tmp: Path, gt: object, preds: object) -> list[str]:
    (tmp / "gt.json").write_text(json.dumps(gt))
    (tmp / "preds.json").write_text(json.dumps(preds))
    return ["score", "coco", "--gt", str(tmp / "gt.json"), "--preds", str(tmp / "preds.json")]


GT = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a cat"}]}


@case("score-coco-gt-without-annotations")
def _(shared, tmp):
    return coco_files(tmp, {"images": []}, []), [f"{tmp / 'gt.json'}: no 'annotations' list; expected COCO-format ground truth"]


@case("score-coco-gt-annotation-without-caption")
def _(shared, tmp):
    return coco_files(tmp, {"annotations": [{"image_id": 1}]}, []), [
        f"{tmp / 'gt.json'}: annotations[0] is {{'image_id': 1}}; expected {{image_id, caption: text}}"]


@case("score-coco-preds-an-object")
def _(shared, tmp):
    return coco_files(tmp, GT, {"1": "a cat"}), [
        f"{tmp / 'preds.json'}: holds a JSON object {{...}}; expected predictions in the COCO results format"]


@case("score-coco-pred-unknown-image")
def _(shared, tmp):
    return coco_files(tmp, GT, [{"image_id": 99, "caption": "a dog"}]), [
        f"{tmp / 'preds.json'}: prediction 0: image_id 99 is not in {tmp / 'gt.json'}"]


@case("score-coco-pred-caption-not-text")
def _(shared, tmp):
    return coco_files(tmp, GT, [{"image_id": 1, "caption": ["a", "cat"]}]), [
        f"{tmp / 'preds.json'}: prediction 0: {{'image_id': 1, 'caption': ['a', 'cat']}} is not {{image_id, caption: text}}"]


@case("score-mme-results-missing")
def _(shared, tmp):
    return ["score", "mme", "--results", str(tmp / "res")], [f"{tmp / 'res'}: no MME results directory"]


@case("score-mme-results-odd-lines")
def _(shared, tmp):
    (tmp / "count.txt").write_text("1.jpg\tAre there two cats?\tYes\tYes\n")
    return ["score", "mme", "--results", str(tmp)], [f"{tmp}/count.txt: 1 result lines; MME asks two questions per image"]


@case("score-mme-results-not-utf8")
def _(shared, tmp):
    (tmp / "count.txt").write_bytes(b"1.jpg\tDeux chats ? R\xe9pondez\tYes\tYes\n" * 2)
    return ["score", "mme", "--results", str(tmp)], [f"{tmp / 'count.txt'}: not UTF-8 text (byte 0xe9"]


# ---- train (and demo: the same config reader) ---------------------------------------------------
@case("train-config-missing")
def _(shared, tmp):
    return ["train", "--config", str(tmp / "run.yaml")], [f"{tmp / 'run.yaml'}: config file not found; a path, or a shipped config: "]


@case("train-config-a-directory")
def _(shared, tmp):
    return ["train", "--config", str(tmp)], [f"{tmp}: is a directory; expected a YAML run config"]


@case("train-config-yaml-syntax")
def _(shared, tmp):
    return train_config(tmp, "model:\n  llm: [random:tiny-llama\ntrain:\n  batch_size: 2\n"), [
        f"{tmp / 'run.yaml'}: not valid YAML: ", "at line "]


@case("train-config-not-utf8")
def _(shared, tmp):
    return train_config(tmp, "model:\n  image_prefix: 'Bild: \xfc'\n".encode("latin-1")), [f"{tmp / 'run.yaml'}: not UTF-8 text"]


@case("train-config-a-list")
def _(shared, tmp):
    return train_config(tmp, "- model\n- train\n"), [f"{tmp / 'run.yaml'}: holds a list; expected sections model:, data:, train:"]


@case("train-config-unknown-section")
def _(shared, tmp):
    return train_config(tmp, "trian:\n  batch_size: 2\n"), [f"{tmp / 'run.yaml'}: unknown section(s) trian; valid: model, data, train"]


@case("train-config-section-not-a-mapping")
def _(shared, tmp):
    return train_config(tmp, "train: 5\n"), [f"{tmp / 'run.yaml'}: section train: is a int; expected a mapping of keys under it"]


@case("train-config-unknown-key")
def _(shared, tmp):
    return train_config(tmp, "train:\n  batchsize: 2\n"), [
        f"{tmp / 'run.yaml'}: unknown run config key(s) ['batchsize'] in train; valid keys: output_dir"]


@case("train-config-wrong-type")
def _(shared, tmp):
    return train_config(tmp, "train:\n  batch_size: two\n"), [f"{tmp / 'run.yaml'}: run config train.batch_size: Value 'two'"]


@case("train-override-malformed")
def _(shared, tmp):
    return ["train", "--config", str(TINY_YAML), "batch_size=2"], [
        "override 'batch_size=2': the key must be model.X, data.X or train.X"]


@case("train-data-task-missing")
def _(shared, tmp):
    return train_config(tmp, "data:\n  root: somewhere\n"), ["data.task is missing"]


@case("train-data-file-malformed")
def _(shared, tmp):
    (tmp / "conv.json").write_text('[{"id": "1", "conversations": [}]')
    return train_config(tmp, f"data:\n  task: instruct\n  path: {tmp / 'conv.json'}\n"), [
        f"{tmp / 'conv.json'}: not valid JSON: Expecting value at line 1 column 32; expected instruction data"]


@case("train-output-dir-is-a-file")
def _(shared, tmp):
    (tmp / "out").write_text("notes")
    return ["train", "--config", str(TINY_YAML), "--output-dir", str(tmp / "out")], [
        f"{tmp / 'out'}: is a file; train.output_dir (--output-dir) needs a directory"]


@case("train-output-dir-holds-a-run")
def _(shared, tmp):
    shutil.copytree(shared / "ckpt", tmp / "out" / "checkpoint")
    return ["train", "--config", str(TINY_YAML), "--output-dir", str(tmp / "out")], [
        f"{tmp / 'out'}: holds an earlier run (checkpoint); a new run would overwrite it",
        "continue it with --resume auto, or choose another --output-dir"]


@case("train-resume-not-a-checkpoint")
def _(shared, tmp):
    return ["train", "--config", str(TINY_YAML), "--output-dir", str(tmp / "out"), "--resume", str(shared / "ckpt")], [
        f"{shared / 'ckpt'}: not a training checkpoint (no trainer_state.pt)"]


@case("train-resume-state-cut-short")
def _(shared, tmp):
    step = tmp / "out" / "checkpoints" / "step-2"
    shutil.copytree(shared / "ckpt", step)
    (step / "trainer_state.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    return ["train", "--config", str(TINY_YAML), "--output-dir", str(tmp / "out"), "--resume", "auto",
            "--train.num_workers", "0"], [f"{step / 'trainer_state.pt'}: cannot be loaded ("]


@case("train-dataset-image-not-an-image")
def _(shared, tmp):
    """Met by a DataLoader worker: torch re-raises it in the main process, the CLI prints its message alone."""
    root = sqa(shared, tmp)
    for image in (root / "images" / "train").glob("*/image.png"):
        image.write_text("<html>404</html>")
    text = ("model: {llm: random:tiny-llama, vision: random:tiny-clip, scales: [16, 4], max_length: 64}\n"
            f"data: {{task: scienceqa, root: '{root}', split: train}}\n"
            "train: {batch_size: 4, max_steps: 1, num_workers: 1}\n")
    return train_config(tmp, text), [f"{root / 'images' / 'train'}/", "/image.png: cannot read this image (not an image format PIL knows)"]


@case("demo-config-yaml-syntax")
def _(shared, tmp):
    (tmp / "demo.yaml").write_text("train: {max_steps: 2\n")
    return ["demo", "--task", "shapes", "--out", str(tmp / "demo"), "--n", "10", "--config", str(tmp / "demo.yaml")], [
        f"{tmp / 'demo.yaml'}: not valid YAML"]


@case("demo-out-is-a-file")
def _(shared, tmp):
    (tmp / "demo").write_text("notes")
    return ["demo", "--task", "shapes", "--out", str(tmp / "demo"), "--n", "10"], [f"{tmp / 'demo'}: is a file; --out needs a directory"]


# ---- params, data, bench -----------------------------------------------------------------------
@case("params-config-json-malformed")
def _(shared, tmp):
    (tmp / "config.json").write_text('{"model_type": "llama", "hidden_size": 4096')
    return ["params", "--llm-config", str(tmp / "config.json")], [f"{tmp / 'config.json'}: not valid JSON", "cut short?"]


@case("params-config-json-missing")
def _(shared, tmp):
    return ["params", "--llm-config", str(tmp / "config.json")], [f"{tmp / 'config.json'}: a model's config.json {{model_type, hidden_size, ...}} not found"]


@case("params-config-json-unknown-model-type")
def _(shared, tmp):
    (tmp / "config.json").write_text('{"model_type": "lama", "hidden_size": 4096}')
    return ["params", "--llm-config", str(tmp / "config.json")], [f"{tmp / 'config.json'}: not a model config transformers knows"]


@case("params-model-name-unknown")
def _(shared, tmp):
    return ["params", "--vision-config", str(tmp / "no-such-tower")], [f"{tmp / 'no-such-tower'}: cannot load this model config"]


@case("synth-shapes-out-is-a-file")
def _(shared, tmp):
    (tmp / "data").write_text("notes")
    return ["data", "synth-shapes", "--out", str(tmp / "data"), "--n", "10"], [f"{tmp / 'data'}: is a file; --out needs a directory"]


@case("synth-shapes-too-few")
def _(shared, tmp):
    return ["data", "synth-shapes", "--out", str(tmp / "data"), "--n", "3"], ["--n 3: need at least 10 problems"]


@case("bench-new-tokens-too-few")
def _(shared, tmp):
    return ["bench", "--out", str(tmp / "bench"), "--new-tokens", "1", "--llm", "random:tiny-llama",
            "--vision", "random:tiny-clip"], ["--new-tokens 1: need at least 2"]


# ---- the tests -------------------------------------------------------------------------------
def error_line(err: str, command: str) -> str:
    """The one line `ademvl COMMAND: error: ...` of stderr (progress bars may come before it)."""
    lines = [line for line in err.splitlines() if line.startswith(f"ademvl {command}: error: ")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_clear_line(name: str, shared: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unknown model name must not wait on the network
    monkeypatch.delenv("ADEMVL_DEBUG", raising=False)
    fn, rc = CASES[name]
    argv, expected = fn(shared, tmp_path)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:  # the CLI prints them (see the process test below)
        warnings.simplefilter("always")
        assert main(argv) == rc
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err[-3000:]
    if rc == 0:
        assert out.strip(), "a command that works prints its result"
    where = error_line(err, argv[0]) if rc else "\n".join(str(w.message) for w in caught)
    for text in expected:
        assert text in where, f"{text!r} not in {where!r}"


def test_every_row_of_the_table_is_a_case() -> None:
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", (ROOT / "docs" / "errors.md").read_text(), re.M)
    assert sorted(rows) == sorted(CASES)


def test_debug_shows_the_traceback_too(shared: Path, tmp_path: Path, capsys) -> None:
    argv = sqa_preds(shared, tmp_path, ["A"])
    assert main([*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ademvl.files.InputError" in err
    assert error_line(err, "score").endswith("expected predictions {pid: choice index} (as ademvl eval scienceqa --out writes)")


def test_a_bug_keeps_its_traceback(shared: Path, tmp_path: Path, monkeypatch) -> None:
    """A ValueError that no `raise` of ademvl wrote (here int() on a bad string) is not taken for bad input."""
    from ademvl.tasks import scienceqa

    monkeypatch.setattr(scienceqa, "score_scienceqa", lambda *a, **k: int("not a number"))
    pid = sqa_test_pids(shared)[0]
    with pytest.raises(ValueError, match="invalid literal for int"):
        main(sqa_preds(shared, tmp_path, {pid: 0}))


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ademvl", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_as_a_process_a_warning_and_an_error_are_one_line_each(shared: Path, tmp_path: Path) -> None:
    """`python -m ademvl`: the override's warning names both models, the error its file; status 2."""
    root = sqa(shared, tmp_path)
    image = root / "images" / "test" / first_image_pid(root) / "image.png"
    image.write_text("<html>404</html>")  # met while generating, after the model loaded
    proc = run_cli(*eval_sqa(shared / "ckpt", root, "--llm", "random:tiny-qwen2"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ademvl eval: ")]  # after the progress bar
    assert lines == [
        f"ademvl eval: warning: {shared / 'ckpt'}: loading onto other base models of the same shape (llm "
        "random:tiny-llama in the checkpoint, random:tiny-qwen2 built; llm_type llama in the checkpoint, qwen2 built); "
        "expect other results than on the base it was trained on",
        f"ademvl eval: error: {image}: cannot read this image (not an image format PIL knows); re-encode it as PNG or JPEG"]


def test_ademvl_debug_in_the_environment_shows_the_traceback(shared: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("ADEMVL_DEBUG", "1")
    assert main(sqa_preds(shared, tmp_path, ["A"])) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


# ---- nothing is lost ---------------------------------------------------------------------------
def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_train_into_an_earlier_run_leaves_it_as_it_was(shared: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(shared / "ckpt", out / "checkpoint")
    shutil.copytree(shared / "ckpt", out / "checkpoints" / "step-4")
    (out / "log.jsonl").write_text('{"step": 4, "loss": 1.0}\n')
    before = snapshot(out)
    assert main(["train", "--config", str(TINY_YAML), "--output-dir", str(out)]) == 2
    assert "holds an earlier run (checkpoint, step-4)" in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_failed_eval_keeps_the_earlier_results(shared: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "results"
    assert main(eval_sqa(shared / "ckpt", shared / "sqa", "--limit", "2", "--out", str(out))) == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert sorted(before) == ["generations.json", "notes.txt", "preds.json", "scores.json"]
    root = sqa(shared, tmp_path)
    (root / "images" / "test" / first_image_pid(root) / "image.png").write_text("not an image")
    assert main(eval_sqa(shared / "ckpt", root, "--out", str(out))) == 2
    assert snapshot(out) == before


def test_outputs_are_written_all_or_none(tmp_path: Path) -> None:
    """A write that fails part-way (here: one name is taken by a directory) changes none of the files."""
    from ademvl.files import InputError
    from ademvl.recipes.evaluate import write_outputs

    write_outputs(tmp_path, {"preds.json": {"1": 0}}, {"acc": 100.0})
    before = snapshot(tmp_path)
    (tmp_path / "generations.json").mkdir()
    with pytest.raises(InputError, match="generations.json: is a directory"):
        write_outputs(tmp_path, {"preds.json": {"1": 1}, "generations.json": {"1": "B"}}, {"acc": 0.0})
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generations.json", "preds.json", "scores.json"]  # no temp files


def test_a_failed_score_keeps_the_earlier_scores_file(shared: Path, tmp_path: Path) -> None:
    pid = sqa_test_pids(shared)[0]
    scores = tmp_path / "scores.json"
    assert main(sqa_preds(shared, tmp_path, {pid: 0}) + ["--out", str(scores)]) == 0
    before = scores.read_bytes()
    assert main(sqa_preds(shared, tmp_path, {pid: "A"}) + ["--out", str(scores)]) == 2
    assert scores.read_bytes() == before
