"""`ademvl serve`: ask a checkpoint about an image in the browser, and see where it looked.

A Gradio page (the field's convention: LLaVA and LaVIN ship one). The answer streams token by
token through the model's own `generate`; a prompt in the ScienceQA form ("Options: (A) ...")
also gets the forced-choice read-out of the demo (`demo.letter_logits`), and every answer gets
the adaptive-fusion picture of `ademvl.inspect` (the computation behind the demo's drop figure).

One model serves everyone: the model's events share one queue slot, so two browsers at once are
answered one after the other. Bad input (a file that is not an image, an empty or too long
question) is a message on the page, never a dead server. Needs the `web` extra: pip install
'ademvl[web]'.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .data import Sample
from .images import ImageError, load_image
from .model import AdemVLModel, decoder_layers

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

CONCURRENCY_ID = "model"  # every event that runs the model shares this one queue slot
OPTIONS_LINE = re.compile(r"^Options:(.*)$", re.MULTILINE)
OPTION = re.compile(r"\(([A-E])\)\s*")
ALL_TOKENS = -1  # the token chooser's "all answer tokens"
MAX_UPLOAD = "50mb"  # far above any photo; a decompression bomb is small and is caught by load_image


# ---- what the page computes (no Gradio here, so tests can call it directly) -------------------
def options(question: str) -> list[str]:
    """The choices of a ScienceQA-form prompt ("Options: (A) red (B) blue"), else []."""
    from .tasks.scienceqa import OPTIONS

    m = OPTIONS_LINE.search(question)
    if not m:
        return []
    parts = OPTION.split(m.group(1))  # ['', 'A', 'red ', 'B', 'blue']
    letters, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    return texts if len(texts) >= 2 and letters == list(OPTIONS[: len(letters)]) else []


def option_probabilities(model: AdemVLModel, image: Any, question: str) -> dict[str, float]:
    """P(letter) right after "The answer is", over the prompt's options (the demo's forced choice)."""
    from .tasks.scienceqa import letter_logits
    from .tasks.scienceqa import OPTIONS

    choices = options(question)
    if not choices:
        return {}
    logits = letter_logits(model, [Sample("ask", image, [(question, "")])], batch_size=1)["ask"][: len(choices)]
    probs = torch.softmax(logits, dim=0).tolist()
    return {f"({OPTIONS[i]}) {c}": p for i, (c, p) in enumerate(zip(choices, probs))}


def prompt_length(model: AdemVLModel, image: Any, question: str) -> int:
    """Tokens the model reads before answering: the image (or "Image: N/A") head plus the question."""
    head = len(model.processor.encode(Sample("", image, [("", "")]), train=False)["input_ids"])
    return head + len(model.tokenizer(question, add_special_tokens=False).input_ids)


def check_question(model: AdemVLModel, image: Any, question: str) -> str:
    """The question, stripped; a ValueError that says how to fix an empty or too long one."""
    question = (question or "").strip()
    if not question:
        raise ValueError("the question is empty: type a question (or pick an example)")
    n, limit = prompt_length(model, image, question), model.config.max_length
    if n > limit:
        raise ValueError(f"the question is too long: {n} tokens with the image head, and this checkpoint reads at "
                         f"most max_length={limit}; shorten it by {n - limit} tokens")
    return question


def read_upload(payload: dict[str, Any] | None) -> Any:
    """The uploaded image as RGB under the project's image rules (None: no image, a text question).

    The message of a bad file names the file as the user called it, not Gradio's temporary copy.
    """
    if not payload or not payload.get("path"):
        return None
    path, name = payload["path"], payload.get("orig_name") or Path(payload["path"]).name
    try:
        return load_image(path, missing_hint="upload it again")
    except ImageError as e:
        raise ImageError(str(e).replace(str(path), name)) from e


def generation_kwargs(max_new_tokens: int, decoding: str, temperature: float, top_p: float) -> dict[str, Any]:
    """transformers' generate settings from the page's controls."""
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens)}
    if decoding == "sample":
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    else:
        kwargs.update(do_sample=False)
    return kwargs


def stream_answer(model: AdemVLModel, image: Any, question: str, lock: threading.Lock | None = None,
                  seed: int = 0, **generate_kwargs: Any) -> Iterator[tuple[str, list[int] | None]]:
    """Yield (text so far, None) while generating, then (final text, generated ids).

    transformers' TextIteratorStreamer through the model's own generate, run in a thread that holds
    `lock` (the model keeps per-call state: one generate at a time). Closing the iterator (a
    browser gone) stops the generation at the next token. The final text is decoded as
    `model.answer` decodes it, so the page shows what the API returns.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    batch = model.processor([Sample("ask", image, [(question, "")])], train=False)
    dev = model.pos_k.device
    batch = {k: v.to(dev) for k, v in batch.items() if k != "labels"}
    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    gone = threading.Event()

    class Gone(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), gone.is_set(), dtype=torch.bool, device=input_ids.device)

    result: dict[str, Any] = {}

    def work() -> None:
        try:
            with lock or threading.Lock():
                torch.manual_seed(seed)
                result["ids"] = model.generate(**batch, streamer=streamer, stopping_criteria=StoppingCriteriaList([Gone()]),
                                               **generate_kwargs)[0]
        except Exception as e:  # surfaced in the page's thread below
            result["error"] = e
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text.strip(), None
    finally:
        gone.set()  # a no-op once generation has ended; stops it if the consumer left early
    thread.join()
    if "error" in result:
        raise result["error"]
    ids = result["ids"].tolist()
    yield model.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids


def examples(data_root: str | Path | None, n: int = 5) -> list[list[str | None]]:
    """[image path or None, prompt] of a few test problems of a ScienceQA-layout data set: one per
    question type of the synthetic data (`ademvl demo`'s), else one with and one
    without an image; for the emoji corpus (`ademvl demo --task emoji`'s), held-out Twemoji images."""
    from .tasks import scienceqa as sqa

    if data_root is not None and (Path(data_root) / "llava_test.json").exists():
        return emoji_examples(Path(data_root), n)
    if data_root is None or not (Path(data_root) / "problems.json").exists():
        return []
    out, seen = [], set()
    for pid, p in sqa.read_problems(data_root, "test").items():
        kind = p.get("qtype", p.get("image_path") is not None)
        if kind not in seen:
            seen.add(kind)
            out.append([p.get("image_path"), sqa.to_sample(pid, p).turns[0][0]])
        if len(out) == n:
            break
    return out


def emoji_examples(data_root: Path, n: int = 5) -> list[list[str | None]]:
    """Held-out Twemoji images of the emoji corpus, each with one question (naming first, then each
    multiple-choice type), in the instruction prompt the demo trains."""
    from .files import read_json
    from .tasks.instruct import IMAGE_MARK, prompt_of

    records = read_json(data_root / "llava_test.json", "the emoji corpus's LLaVA test conversations", form=list)
    by_image: dict[str, dict[str, Any]] = {}
    for rec in records:  # ids are vendor/key/question
        by_image.setdefault(rec["image"], {})[rec["id"].rsplit("/", 1)[-1]] = rec
    images = sorted(by_image)[:: max(1, len(by_image) // n)][:n]
    kinds = ("naming", "name", "group", "subgroup")
    out = []
    for k, image in enumerate(images):
        rec = by_image[image].get(kinds[k % len(kinds)]) or next(iter(by_image[image].values()))
        out.append([str(data_root / image), prompt_of(rec["conversations"][0]["value"].replace(IMAGE_MARK, ""))])
    return out


def as_instruction(question: str) -> str:
    """A plain question ("What is this?") in the instruction prompt; a full prompt stays as it is."""
    from .tasks.instruct import prompt_of

    return question if question.rstrip().endswith("Response:") else prompt_of(question)


EMPTY_ANSWER = ("**No answer:** the model's first token was the end of the sequence (an empty generation). "
                "Rephrase the question as the checkpoint was trained (pick an example), or try sampling.")


# ---- the page ---------------------------------------------------------------------------------
def build_app(model: AdemVLModel, example_rows: list[list[str]] | None = None, wrap: Any = None) -> Any:
    """The Gradio Blocks of the page, for one loaded model. Launch it with `launch(app, ...)`.

    wrap: question -> prompt (e.g. `as_instruction` for a checkpoint trained on instruction prompts)."""
    import gradio as gr

    from .inspect import render, where_it_looked

    n_layers = len(decoder_layers(model.llm))
    layer_choices = list(range(n_layers))
    lock = threading.Lock()  # the queue runs one ask at a time; this also covers a generation left running

    def on_upload(payload: dict[str, Any] | None):
        try:
            read_upload(payload)
        except ImageError as e:
            return None, f"**Error:** {e}"
        return gr.skip(), ""

    def ask(payload, question, max_new_tokens, decoding, temperature, top_p, seed):
        # outputs: answer, status, option probabilities, picture, layer, token, state
        try:
            image = read_upload(payload)
            question = check_question(model, image, wrap(question) if wrap and (question or "").strip() else question)
        except ValueError as e:
            yield "", f"**Error:** {e}", gr.update(value=None, visible=False), None, gr.update(), gr.update(), None
            return
        yield "", "Generating...", gr.update(value=None, visible=False), None, gr.update(), gr.update(), None
        t0 = time.time()
        try:
            for text, ids in stream_answer(model, image, question, lock, int(seed or 0),
                                           **generation_kwargs(max_new_tokens, decoding, temperature, top_p)):
                yield (text, *(gr.skip(),) * 6)  # only the answer changes while it streams
            seconds = time.time() - t0
            with lock:
                found = option_probabilities(model, image, question)
                looked = where_it_looked(model, image, question, ids) if image is not None else None
        except Exception as e:  # the model failed on this input: say so on the page, keep serving
            yield gr.skip(), f"**Error:** {type(e).__name__}: {e}", *(gr.skip(),) * 5
            return
        probs = gr.update(value=found or None, visible=bool(found))
        status = f"Answered in {seconds:.1f} s ({len(ids)} tokens)."
        if not text.strip():
            status = f"{EMPTY_ANSWER} ({seconds:.1f} s)"
        if looked is None:
            status += " Text-only question (\"Image: N/A\"): the fusion read the position tables only, no image to show."
            yield text, status, probs, None, gr.update(), gr.update(), None
            return
        layer = n_layers // 2
        tokens = [("all answer tokens", ALL_TOKENS)] + [(f"{j}: {t!r}", j) for j, t in enumerate(looked.tokens)]
        yield (text, status, probs, render(image, looked, layer), gr.update(value=layer),
               gr.update(choices=tokens, value=ALL_TOKENS), (image, looked))

    def redraw(state, layer, token):
        if state is None or layer is None:
            return gr.skip()
        image, looked = state
        return render(image, looked, int(layer), None if token in (None, ALL_TOKENS) else int(token))

    with gr.Blocks(title="ademvl: ask a checkpoint", analytics_enabled=False) as app:
        gr.Markdown("## ADEM-VL: ask about an image, see where the model looked\n"
                    f"LLM `{model.config.llm}`, vision `{model.config.vision}`, {n_layers} layers, "
                    f"visual tokens {' + '.join(map(str, model.config.scales))}, drop ratio {model.config.drop_ratio}.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image (leave empty for a text-only question)", type="filepath",
                                 image_mode=None, sources=["upload"], elem_id="image", height=260)
                question = gr.Textbox(label="Question", lines=4, elem_id="question",
                                      placeholder="What colour is the shape?  (ScienceQA form: Context: ...\\n"
                                                  "Question: ...\\nOptions: (A) ... (B) ...\\nResponse:)")
                with gr.Accordion("Generation settings", open=False):
                    max_new_tokens = gr.Slider(1, 256, value=64, step=1, label="max new tokens", elem_id="max_new_tokens")
                    decoding = gr.Radio(["greedy", "sample"], value="greedy", label="decoding")
                    temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="temperature (sample)")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p (sample)")
                    seed = gr.Number(0, precision=0, label="seed (sample)")
                button = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column(scale=1):
                answer = gr.Textbox(label="Answer", lines=3, interactive=False, elem_id="answer")
                status = gr.Markdown(elem_id="status")
                probs = gr.Label(label="Option probabilities (forced choice after \"The answer is\")",
                                 num_top_classes=5, elem_id="options", visible=False)
        gr.Markdown("### Where it looked\nFor the answer's tokens, at one decoder layer: the fusion's attention "
                    "weight on each visual token, and the tokens it dropped (the floor(gamma N) weakest of each row), "
                    "at every scale.")
        with gr.Row():
            layer = gr.Dropdown(layer_choices, value=n_layers // 2, label="layer", elem_id="layer")
            token = gr.Dropdown([("all answer tokens", ALL_TOKENS)], value=ALL_TOKENS, label="answer token",
                                elem_id="token")
        picture = gr.Image(label="adaptive fusion", type="pil", format="png", interactive=False, elem_id="looked")
        state = gr.State(None)
        if example_rows:
            gr.Examples(example_rows, inputs=[image, question], examples_per_page=len(example_rows),
                        label="Examples: test problems of the checkpoint's data (pick one, then Ask)")

        image.upload(on_upload, image, [image, status], preprocess=False)
        inputs = [image, question, max_new_tokens, decoding, temperature, top_p, seed]
        outputs = [answer, status, probs, picture, layer, token, state]
        for trigger in (button.click, question.submit):
            trigger(ask, inputs, outputs, preprocess=False, concurrency_limit=1, concurrency_id=CONCURRENCY_ID)
        for control in (layer, token):
            control.input(redraw, [state, layer, token], picture)
    return app


def launch(app: Any, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Queue (one model: its events run one at a time) and serve; loopback unless asked otherwise."""
    app.queue(default_concurrency_limit=1)
    return app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
                      max_file_size=MAX_UPLOAD, footer_links=[])


# ---- CLI --------------------------------------------------------------------------------------
def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 7860, llm: str | None = None,
          vision: str | None = None, examples_dir: str | Path | None = None) -> int:
    """`ademvl serve`: load the checkpoint and serve the page until interrupted."""
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise ValueError("`ademvl serve` needs Gradio: pip install 'ademvl[web]'") from e
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no checkpoint directory here (make one with `ademvl demo` or `ademvl train`)")
    data = Path(examples_dir) if examples_dir else checkpoint.resolve().parent / "data"
    if examples_dir and not (data / "problems.json").exists():
        raise FileNotFoundError(f"{data}: no problems.json; --examples takes a ScienceQA-layout data directory")
    model = AdemVLModel.from_pretrained(checkpoint, llm=llm, vision=vision)
    emoji = (data / "llava_test.json").exists()  # the emoji demo trains instruction prompts
    try:
        launch(build_app(model, examples(data), wrap=as_instruction if emoji else None), host, port)
    except OSError as e:  # Gradio's "Cannot find empty port": say which flag fixes it
        raise ValueError(f"cannot listen on {host}:{port} ({e}); pass another --port") from e
    return 0
