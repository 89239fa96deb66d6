"""Paired A/B of ADEM-VL's decode: V factored (the default) against V dense, end to end.

The bench's fusion micro-benchmark keeps one layer's tensors in cache, which real decoding (30
layers of weights between two reads) does not; this times whole `generate` calls instead, on the
embedded SmolLM2 + demo CLIP tower, batch 8, text 128, 32 new tokens, interleaved rounds.

    python scripts/decode_ab.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ademvl import AdemVLConfig, AdemVLModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = AdemVLModel.build(AdemVLConfig(vision="embedded:demo-clip")).eval()
    b, t = 8, 128
    ids = torch.randint(3, 40000, (b, t))
    ids[:, 0] = 1
    batch = dict(input_ids=ids, attention_mask=torch.ones(b, t, dtype=torch.long),
                 pixel_values=torch.randn(b, 3, 224, 224), image_mask=torch.ones(b, dtype=torch.bool))
    factored = AdemVLModel.value_span

    def run(use_factored: bool) -> tuple[float, torch.Tensor]:
        AdemVLModel.value_span = factored if use_factored else (lambda self: None)  # None: V dense
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(**batch, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        return time.perf_counter() - start, out

    run(True), run(False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    outs = {}
    for _ in range(args.rounds):
        for use in (True, False):
            dt, outs[use] = run(use)
            times[use].append(dt)
    AdemVLModel.value_span = factored
    print(f"generate (prefill + 31 cached steps), median of {args.rounds}: V factored "
          f"{statistics.median(times[True]):.2f} s, V dense {statistics.median(times[False]):.2f} s; "
          f"same tokens: {torch.equal(outs[True], outs[False])}")


if __name__ == "__main__":
    main()
