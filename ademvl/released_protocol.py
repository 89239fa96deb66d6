"""The released code's input layout and evaluation protocol (`ademvl eval ... --protocol released`).

An imported checkpoint (ademvl/released.py) must see the token sequence it was trained on. The
released code (adem/model.py forward/generate, engine.py, util/datasets.py) builds it from
SentencePiece calls on separate strings, each `sp.encode(s)` being one tokenizer call without
special tokens here:

    [BOS] tok("Image: ") <cls> tok(text)          a sample with an image
    [BOS] tok("Image: N/A")    tok(text)          a sample without one (no [cls], Xv zeroed)

No "\\n" after the [cls] embedding (ours has one), and `text` is one string: for training
prompt + answer joined without a space ("...Response:The answer is A." + EOS, the loss from the
first token after tok(prompt)); for evaluation the prompt alone. Sequences are cut at the end to
512 tokens (training) or 512 - new tokens (generation), as the released code cuts them; a cut
generation prompt gets its [cls] where the released generate() puts it (`generation_cut`).
Images are read as the released scripts read them: PIL's `.convert("RGB")`, so a transparent
pixel keeps the colour stored under it (ours composites transparency on white).

The evaluation scripts, per task:

    ScienceQA (eval_sqa.py)   QCM-A with captions, the prompt ends "Response:The answer is";
                              1 token, greedy; the first capital letter read as the option
                              (not among the choices: wrong). ImageNet mean/std.
    COCO (eval_caption.py)    "a picture of", 20 tokens, greedy; the caption is what follows
                              "picture of" in the generated text, else all of it. CLIP mean/std.
                              Karpathy val split.
    MME (eval_mme.py)         "Instruction: {question}\\nResponse:", 10 tokens, greedy; newlines
                              removed from the answer. ImageNet mean/std.

Each task (ademvl/tasks/) switches to these prompts, token counts and readers when its
EvalOptions.protocol is "released"; the evaluation loop then uses `processor_for`. The scorers
are the same as for our protocol (ScienceQA's official keys, pycocoevalcap, MME's
eval_tool rules). docs/released.md sets this protocol beside ours.
"""

from __future__ import annotations

import re
from typing import Any

from .data import IGNORE_INDEX, IMAGE_TOKEN_ID, AdemProcessor, Sample
from .released import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from .vision import image_to_tensor

PROTOCOLS = ("ademvl", "released")
IMAGE_PREFIX, NO_IMAGE_PREFIX = "Image: ", "Image: N/A"
SQA_FORMAT, SQA_ANSWER_HEAD, SQA_NEW_TOKENS = "QCM-A", "The answer is", 1
COCO_PROMPT, COCO_NEW_TOKENS = "a picture of", 20
MME_NEW_TOKENS = 10
MAX_LENGTH = 512  # the released code's max_seq_len and generation window
CLS = IMAGE_TOKEN_ID
SLOT_ID = 0  # the token id the released generate() puts in the [cls] slot before writing [cls] there
FIRST_CAPITAL = re.compile(r"([A-Z])")
AFTER_PICTURE_OF = re.compile(r"picture of (.+)")
OPTIONS = ("A", "B", "C", "D", "E")


# ---- prompts ----------------------------------------------------------------------------------
def segments(text: str, has_image: bool) -> list[str | int]:
    """The released input, piece by piece: strings are tokenised one call each; CLS is the [cls] slot."""
    return [IMAGE_PREFIX, CLS, text] if has_image else [NO_IMAGE_PREFIX, text]


def scienceqa_prompt(problem: dict[str, Any]) -> str:
    """eval_sqa.py's prompt: QCM-A with the caption in the context, then "The answer is"."""
    from .tasks.scienceqa import build_prompt

    return build_prompt(problem, SQA_FORMAT, use_caption=True)[0] + SQA_ANSWER_HEAD


def mme_prompt(question: str) -> str:
    return f"Instruction: {question}\nResponse:"


def read_letter(text: str, num_choices: int) -> int:
    """The first capital letter of the generated text as an option index; -1 if none or not a choice."""
    found = FIRST_CAPITAL.findall(text)
    if not found or found[0] not in OPTIONS[:num_choices]:
        return -1
    return OPTIONS.index(found[0])


def read_caption(text: str) -> str:
    """eval_caption.py: what follows "picture of" (to the line's end) if the text has it, else the text.

    Stripped: SentencePiece's decode never starts with a space, a Hugging Face decode may."""
    found = AFTER_PICTURE_OF.findall(text)
    return found[0] if found else text.strip()


def read_mme_answer(text: str) -> str:
    """eval_mme.py removes newlines; tabs become spaces so the eval_tool's tab-split line stays 4 fields."""
    return text.replace("\n", "").replace("\t", " ")


# ---- the processor ---------------------------------------------------------------------------
class ReleasedProcessor(AdemProcessor):
    """AdemProcessor with the released layout, cut and image normalisation (module docstring).

    One turn per sample: the released data has single-turn samples only.
    """

    def __init__(self, tokenizer: Any, config: Any, image_size: int, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, max_new_tokens: int = 0) -> None:
        super().__init__(tokenizer, config, image_size)
        self.mean, self.std, self.max_new_tokens = tuple(mean), tuple(std), max_new_tokens

    def layout(self, text: str, has_image: bool) -> list[int]:
        ids = list(self.bos)
        for piece in segments(text, has_image):
            ids += [piece] if piece == CLS else self._tok(piece)
        return ids

    def encode(self, sample: Sample, train: bool = True) -> dict[str, Any]:
        if len(sample.turns) != 1:
            raise ValueError(f"sample {sample.id!r}: {len(sample.turns)} turns; the released layout has one "
                             f"prompt and one answer per sample (use --protocol ademvl for conversations)")
        prompt, target = sample.turns[0]
        has_image = sample.image is not None
        if not train:
            ids = generation_cut(self.layout(prompt, has_image), MAX_LENGTH - self.max_new_tokens)
            return {"id": sample.id, "input_ids": ids, "labels": [IGNORE_INDEX] * len(ids), "image": sample.image}
        ids = self.layout(prompt + target, has_image) + [self.eos]
        n_prompt = len(self.layout(prompt, has_image))  # the loss starts after tok(prompt), counted alone
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        return {"id": sample.id, "input_ids": ids[:MAX_LENGTH], "labels": labels[:MAX_LENGTH], "image": sample.image}

    def image_tensor(self, image: Any) -> Any:
        """eval_sqa.py, eval_mme.py and their COCO dataset: `Image.open(path).convert('RGB')`: alpha
        dropped, a palette's transparent index shown in its stored colour (not on white, as ours)."""
        from PIL import Image

        from .files import read_image
        from .images import DATASET_HINT

        img = image if isinstance(image, Image.Image) else read_image(image, DATASET_HINT)
        return image_to_tensor(img.convert("RGB"), self.image_size, self.mean, self.std)


def generation_cut(ids: list[int], window: int) -> list[int]:
    """The released generate() on a prompt longer than `window` (512 - new tokens): the end is cut,
    and [cls] is placed from the *uncut* length (adem/model.py: `pos - len(prompt_tokens[i]) -
    max_gen_len`), so it lands `excess` positions before its slot, over a prompt token, while the slot
    keeps token SLOT_ID's embedding; when that falls before position 1 it is not written at all.
    Reproduced because it changes their scores (docs/released.md)."""
    excess = len(ids) - window
    if excess <= 0 or CLS not in ids:
        return ids[:window]
    pos = ids.index(CLS)
    out = ids[:window]
    out[pos] = SLOT_ID
    if pos - excess >= 1:
        out[pos - excess] = CLS
    return out


def processor_for(model: Any, task: str) -> ReleasedProcessor:
    """The released processor of a task: its image normalisation and its number of new tokens."""
    mean, std = (CLIP_MEAN, CLIP_STD) if task == "coco" else (IMAGENET_MEAN, IMAGENET_STD)
    new = {"scienceqa": SQA_NEW_TOKENS, "coco": COCO_NEW_TOKENS, "mme": MME_NEW_TOKENS}[task]
    return ReleasedProcessor(model.tokenizer, model.config, model.vision.config.image_size, mean, std, new)
