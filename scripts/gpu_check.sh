#!/usr/bin/env bash
# The GPU checks of the benchmark, in one go, results under one folder (default runs/gpu-check):
#   torch.txt, nvidia-smi.txt   which GPU, which torch / CUDA
#   pytest.txt                  the whole test suite on the CUDA machine (its cuda tests run there)
#   bench/                      `ademvl bench` at the paper's shape: LLaMA-7B + CLIP ViT-L/14 (random
#                               weights: timings and FLOPs do not depend on weight values), bf16,
#                               batch 16 (Table V's FLOPs are 16 sequences of ours), text 256
#                               -> bench.json, bench.md, bench.png, profile.txt
# Needs an environment with a CUDA build of torch and this project installed (PYTHON=... to pick
# its interpreter). Sized for one H100/H200-class GPU: about 1-2 min of tests, 3-5 min of bench,
# each under its own timeout so the whole stays under 10 minutes.
#
#   scripts/gpu_check.sh [OUT]
set -euo pipefail
OUT=${1:-runs/gpu-check}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" > "$OUT/nvidia-smi.txt"
"$PY" - <<'PYEOF' | tee "$OUT/torch.txt"
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__} sees no CUDA device: install a CUDA build of torch")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PYEOF
start=$(date +%s)
status=0
timeout 240 "$PY" -m pytest -q tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest.txt" || status=1
echo "tests: $(( $(date +%s) - start )) s" | tee -a "$OUT/pytest.txt"
start=$(date +%s)
timeout 330 "$PY" -m ademvl bench --out "$OUT/bench" --llm random:llama-7b --vision random:clip-vit-large-patch14 \
    --dtype bf16 --device cuda --batch 16 --text-len 256 --repeats 3 --warmup 1 --profile 2>&1 \
    | tee "$OUT/bench.txt" || status=1
echo "bench: $(( $(date +%s) - start )) s" | tee -a "$OUT/bench.txt"
echo "results under $OUT (exit $status)"
exit $status
