"""MME, as released (MME_Benchmark_release_version): one folder per subtask.

    root/{subtask}/questions_answers_YN/{name}.txt + root/{subtask}/images/{name}.jpg
        (artwork, celebrity, landmark, posters, scene)
    root/{subtask}/{name}.txt + root/{subtask}/{name}.{jpg,png}   (the other subtasks)

Each .txt holds the two questions of its image, one per line: "question<TAB>Yes|No"; the
questions end with "Please answer yes or no.". Prompt: "Instruction: {question}\\nResponse:" (the
released eval). `load_samples(root, split="test")` returns one sample per question, the two of an
image next to each other; meta has subtask, image name, question and ground truth for the result
files (`ademvl eval mme` writes them in the layout MME's eval_tool reads).
"""

from __future__ import annotations

from pathlib import Path

from ..data import Sample
from ..score import MME_COGNITION, MME_PERCEPTION
from .instruct import prompt_of

SUBTASKS = MME_PERCEPTION + MME_COGNITION
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


def subtask_files(root: Path, subtask: str) -> tuple[Path, Path]:
    """(questions dir, images dir) of a subtask in either released layout."""
    base = root / subtask
    if (base / "questions_answers_YN").is_dir():
        return base / "questions_answers_YN", base / "images"
    return base, base


def load_samples(root: str, split: str = "test", subtasks: list[str] | None = None,
                 limit: int | None = None) -> list[Sample]:
    """All questions of the subtasks found under root (or of `subtasks`); limit: images per subtask."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: MME benchmark folder not found (MME_Benchmark_release_version)")
    names = subtasks or [s for s in SUBTASKS if (root / s).is_dir()]
    if not names:
        raise FileNotFoundError(f"{root}: no MME subtask folders ({', '.join(SUBTASKS)})")
    samples = []
    for task in names:
        qdir, idir = subtask_files(root, task)
        if not qdir.is_dir():
            raise FileNotFoundError(f"{qdir}: MME subtask folder not found")
        for qa in sorted(qdir.glob("*.txt"))[:limit]:
            image = next((idir / (qa.stem + s) for s in IMAGE_SUFFIXES if (idir / (qa.stem + s)).exists()), None)
            if image is None:
                raise FileNotFoundError(f"{qa}: no image {qa.stem}.jpg/.png beside it in {idir}")
            for n, line in enumerate(qa.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                    raise ValueError(f"{qa}:{n}: expected 'question<TAB>Yes|No', got {line[:80]!r}")
                question, gt = parts[0].strip(), parts[1].strip()
                samples.append(Sample(id=f"{task}/{qa.stem}/{n}", image=str(image), turns=[(prompt_of(question), gt)],
                                      meta={"subtask": task, "image_name": image.name, "question": question, "gt": gt}))
    return samples
