"""lmms-eval backend: ademvl checkpoints on the field's harness (`--model ademvl`).

lmms-eval (0.7.x) finds models of other packages through the entry-point group
`lmms_eval.models`; ademvl's pyproject declares `ademvl = "ademvl.harness:manifest"`, so after
`pip install "ademvl[eval]"` lmms-eval's own CLI runs ademvl checkpoints unchanged:

    python -m lmms_eval --model ademvl --model_args checkpoint=runs/demo/checkpoint --tasks mme
    accelerate launch --num_processes 8 -m lmms_eval --model ademvl --model_args checkpoint=DIR --tasks mme
    python -m torch.distributed.run --nproc_per_node 2 -m lmms_eval --model ademvl ...   # on CPUs

model_args (key=value, comma separated):

    checkpoint  directory written by save_pretrained / `ademvl train` (required)
    llm, vision another place for the base models the checkpoint names (as `ademvl eval --llm`)
    batch_size  requests per forward pass; model_args' value wins over lmms-eval's --batch_size
                (whose default, 1, is what the CLI passes otherwise)
    device      auto (cuda when there is one, one GPU per process), cpu, cuda, cuda:N
    dtype       float32 (default: what `ademvl eval` uses, so numbers compare), bfloat16, float16
    template    instruct (default): the task's text goes in as "Instruction: {text}\\nResponse:",
                the released instruction-tuning format that the paper's MME evaluation uses
                (lmms-eval's chat models apply their chat template the same way); plain: as is

Each request becomes one ademvl Sample, so the prompt is the model's own layout
("Image: <cls>\\n" or, for a request without an image, "Image: N/A\\n", then the text), built by
model.processor; generation is model.answer. ADEM-VL reads one image per sample: a request with
several images (multi-image and video tasks) is refused with the task's name, before any work.
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm
from transformers import StoppingCriteriaList, StopStringCriteria

from .data import IGNORE_INDEX, Sample
from .model import AdemVLModel
from .tasks.instruct import prompt_of

MODEL_NAME = "ademvl"
TEMPLATES = {"instruct": prompt_of, "plain": lambda text: text}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_NEW_TOKENS = 256  # when a task sets none (lmms-eval's tasks almost always do)
# The generation settings of lmms-eval's tasks that mean something to transformers' generate();
# "until" and "max_new_tokens" are handled apart. Anything else (model-specific knobs of other
# backends) is ignored, with one warning per key.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "num_beams", "repetition_penalty", "length_penalty")
# lmms-eval 0.7's evaluator passes every response, likelihoods too, through
# unwrap_generation_output, which turns a (loss, is_greedy) pair into its str() and breaks every
# multiple-choice task ("too many values to unpack" in Task.process_results). A GenerationResult's
# text comes out as it went in, so pairs travel in one where the installed lmms-eval needs it.
WRAP_PAIRS = isinstance(unwrap_generation_output((0.0, True))[0], str)


def manifest():
    """The entry point lmms-eval loads (group `lmms_eval.models`): the model's name and class path."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path="ademvl.harness.AdemVL")


class AdemVL(lmms):
    """An AdemVLModel behind lmms-eval's model interface (generate_until, loglikelihood)."""

    def __init__(self, checkpoint: str, llm: str | None = None, vision: str | None = None, batch_size: int | str = 16,
                 device: str = "auto", dtype: str = "float32", template: str = "instruct", **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"--model_args: unknown key(s) {', '.join(sorted(unknown))} for model ademvl; "
                             "valid: checkpoint, llm, vision, batch_size, device, dtype, template")
        if template not in TEMPLATES:
            raise ValueError(f"--model_args template={template}: choose {' or '.join(TEMPLATES)}")
        if dtype not in DTYPES:
            raise ValueError(f"--model_args dtype={dtype}: choose {', '.join(DTYPES)}")
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"batch_size={batch_size}: ademvl takes a number of requests per batch (no 'auto')") from None
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.template = TEMPLATES[template]

        # Data parallel as lmms-eval's other backends do it: every process holds the whole model and
        # the evaluator hands each rank its share of the requests (rank::world_size).
        # cpu=True where the model runs on the CPU: without it Accelerate sees no distributed run
        # there (torchrun's processes would each take every request).
        on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=on_cpu)
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if on_cpu:
            device = "cpu"
        elif device in ("auto", "cuda"):
            device = f"cuda:{self.accelerator.local_process_index}"  # one GPU per process
        self.device = torch.device(device)
        self.model = AdemVLModel.from_pretrained(checkpoint, llm=llm, vision=vision, dtype=DTYPES[dtype]).to(self.device)
        self.model.eval()
        self._ignored: set[str] = set()
        self._stops: dict[tuple[str, ...], StoppingCriteriaList] = {}
        self._checked: set[tuple[str, str, Any]] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "AdemVL":
        """model_args win over lmms-eval's --batch_size / --device flags (whose defaults are always
        passed): `--model_args batch_size=8` then works with or without `--batch_size`."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        flags = {k: v for k, v in (additional_config or {}).items() if k in ("batch_size", "device") and v is not None}
        return cls(**{**flags, **args})

    # ---- what a request carries -------------------------------------------------------------
    def _visuals(self, request: Instance) -> list[Any]:
        """The request's visuals as its task makes them (doc_to_visual on the doc), checked."""
        if len(request.args) < 6:  # the unconditional (context-free) requests of acc_mutual_info
            return []
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = [v for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or []) if v is not None]
        check_visuals(visuals, task, doc_id)
        return visuals

    def _image(self, request: Instance) -> Image.Image | None:
        """The one image of a request, None for a text-only one (the "Image: N/A" path)."""
        visuals = self._visuals(request)
        return visuals[0] if visuals else None

    def _check_all(self, requests: list[Instance]) -> None:
        """Refuse a task with multi-image or non-image requests before the model runs on any."""
        for r in requests:
            key = tuple(r.args[-3:]) if len(r.args) == 6 else ()  # (doc_id, task, split)
            if key and key not in self._checked:
                self._visuals(r)
                self._checked.add(key)

    # ---- generation -------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy or sampled answers, batched; each stops at its task's `until` strings.

        Requests are grouped by their generation settings (one generate() call per setting) and
        sorted longest prompt first within a group, so a batch pads little.
        """
        self._check_all(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        answers: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="ademvl generate")
        for idx in groups.values():
            idx.sort(key=lambda i: -len(requests[i].args[0]))
            until, hf_kwargs = self.generation_settings(requests[idx[0]].args[1])
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                images = [self._image(requests[i]) for i in chunk]
                prompts = [self.template(requests[i].args[0]) for i in chunk]
                with torch.no_grad():
                    texts = self.model.answer(images, prompts, **hf_kwargs)
                for i, text in zip(chunk, texts):
                    answers[i] = cut_at(text, until)
                bar.update(len(chunk))
        bar.close()
        return answers  # type: ignore[return-value]

    def generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        """(stop strings, generate() kwargs) from a task's generation_kwargs.

        temperature 0 (or none) is greedy, as in lmms-eval's tasks; temperature > 0, or do_sample
        without a temperature, samples. Stop strings end each sequence early (transformers'
        StopStringCriteria) and are cut from the answer, as lmms-eval expects.
        """
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = int(kw.pop("max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS)
        temperature = float(kw.get("temperature") or 0.0)
        sample = temperature > 0 or (bool(kw.get("do_sample")) and "temperature" not in kw)
        out: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample,
                               "num_beams": int(kw.get("num_beams") or 1)}
        if sample:
            out.update({k: kw[k] for k in ("top_p", "top_k") if kw.get(k) is not None})
            if temperature > 0:
                out["temperature"] = temperature
        for k in ("repetition_penalty", "length_penalty"):
            if kw.get(k) is not None:
                out[k] = kw[k]
        if until:
            # transformers' stop-string criterion, built once per set of strings: building it
            # walks the whole vocabulary (~0.6 s), which generate(stop_strings=...) does per call
            key = tuple(until)
            if key not in self._stops:
                self._stops[key] = StoppingCriteriaList([StopStringCriteria(self.model.tokenizer, list(key))])
            out["stopping_criteria"] = self._stops[key]
        ignored = set(kw) - set(SAMPLING_KEYS) - {"do_sample"} - self._ignored
        if ignored:
            warnings.warn(f"ademvl: generation setting(s) {', '.join(sorted(ignored))} ignored "
                          "(not a transformers generate() setting ademvl passes on)", stacklevel=2)
            self._ignored |= ignored
        return until, out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        task = requests[0].args[-2] if requests else "?"
        raise NotImplementedError(f"task {task}: multi-round generation is not supported by the ademvl backend")

    # ---- likelihood -------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """(mean negative log-likelihood per continuation token, continuation is the greedy one).

        lmms-eval's multiple-choice scorer takes the argmin of the first value and its other
        backends return the LM loss there, so that is what this returns too (not a log-prob).
        The prompt is the one generation sees; the continuation is scored without the EOS that
        the processor adds to a training target. (Each pair comes wrapped in a GenerationResult
        where the installed lmms-eval would otherwise mangle it: see WRAP_PAIRS.)
        """
        self._check_all(requests)
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="ademvl loglikelihood")
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            samples = []
            for n, r in enumerate(chunk):
                context, continuation = r.args[0], r.args[1]
                if not isinstance(continuation, str):  # output_type loglikelihood: the target of the doc
                    _, _, _, doc_id, task, split = r.args
                    continuation = continuation(self.task_dict[task][split][doc_id])
                samples.append(Sample(str(n), self._image(r), [(self.template(context), continuation)]))
            batch = {k: v.to(self.device) for k, v in self.model.processor(samples, train=True).items()}
            labels = batch.pop("labels")
            last = (labels != IGNORE_INDEX).cumsum(1).argmax(1)  # (B,) position of each row's EOS label
            labels[torch.arange(labels.shape[0]), last] = IGNORE_INDEX
            logits = self.model(**batch).logits[:, :-1].float()  # (B, T-1, V): position t predicts t+1
            targets = labels[:, 1:]  # (B, T-1)
            keep = targets != IGNORE_INDEX
            logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            greedy = (logits.argmax(-1) == targets) | ~keep
            n_tokens = keep.sum(1).clamp(min=1)
            nll = -(logp * keep).sum(1) / n_tokens  # (B,)
            results += [(float(v), bool(g)) for v, g in zip(nll.tolist(), greedy.all(1).tolist())]
            bar.update(len(chunk))
        bar.close()
        return [GenerationResult(text=r) for r in results] if WRAP_PAIRS else results  # type: ignore[arg-type]


def check_visuals(visuals: list[Any], task: str, doc_id: Any) -> None:
    """ADEM-VL reads one image per sample: say so, naming the task, for anything else."""
    if len(visuals) > 1:
        raise ValueError(f"task {task} (doc {doc_id}) sends {len(visuals)} images in one request; ADEM-VL reads one "
                         "image per sample, so the ademvl backend cannot run multi-image or video tasks; "
                         "choose a single-image task (e.g. mme, scienceqa_img, seedbench_ppl's image questions)")
    if visuals and not isinstance(visuals[0], Image.Image):
        raise ValueError(f"task {task} (doc {doc_id}) sends a {type(visuals[0]).__name__} as its visual; the ademvl "
                         "backend reads images (PIL) only, not video or audio")


def cut_at(text: str, until: list[str]) -> str:
    """The text before the first stop string (lmms-eval's convention: stops are not returned)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
