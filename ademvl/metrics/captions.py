"""Caption metrics as the papers report them: pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L, CIDEr.

pycocoevalcap's PTB tokenizer and METEOR are Java programs; SPICE is left out (slow, and not among
the paper's numbers). Any captioning task can score with `caption_scores(refs, hyps)`.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Iterable
from typing import Any

KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def require_java() -> str:
    """pycocoevalcap's PTB tokenizer and METEOR run on Java; say so plainly when it is missing."""
    java = shutil.which("java")
    if java is None:
        raise FileNotFoundError("COCO caption scoring needs Java (pycocoevalcap runs Stanford's PTB tokenizer "
                                "and METEOR 1.5 as Java programs) and no `java` is on PATH; install a JRE "
                                "(e.g. apt-get install default-jre-headless) and try again")
    return java


def caption_scores(refs: dict[Any, list[str]], hyps: dict[Any, str], metrics: Iterable[str] = KEYS) -> dict[str, float]:
    """Scores (fractions) of one hypothesis per image against all its references, tokenised by PTB."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in refs[k]] for k in hyps})
    res = tok.tokenize({k: [{"caption": h}] for k, h in hyps.items()})
    wanted = list(metrics)
    scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
    if "METEOR" in wanted:
        scorers.insert(1, (Meteor(), ["METEOR"]))
    out: dict[str, float] = {}
    for scorer, names in scorers:
        if not set(names) & set(wanted):
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts
            score, _ = scorer.compute_score(gts, res)
        for name, value in zip(names, score if isinstance(score, list) else [score]):
            out[name] = float(value)
        if isinstance(scorer, Meteor):  # its Java process stays up otherwise
            _close_meteor(scorer)
    return {k: out[k] for k in KEYS if k in out and k in wanted}


def _close_meteor(m: Any) -> None:
    with m.lock:
        m.meteor_p.stdin.close()
        m.meteor_p.kill()
        m.meteor_p.wait()
