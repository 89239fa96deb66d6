#!/usr/bin/env bash
# The GPU checks, in one go, results under one folder (default runs/gpu-check):
#   torch.txt, nvidia-smi.txt   which GPU, which driver, which torch / CUDA build
#   bench.txt, bench/           `ademvl bench` at the paper's shape: LLaMA-7B + CLIP ViT-L/14 (random
#                               weights: timings and FLOPs do not depend on weight values), bf16,
#                               batch 16 (Table V's FLOPs are 16 sequences of ours), text 256, every
#                               method in one interleaved run -> bench.json, bench.md, bench.png, profile.txt
#   pytest.txt                  the whole test suite on the CUDA machine (its cuda-only tests run there)
# Needs an environment with a CUDA build of torch and this project installed (PYTHON=... to pick its
# interpreter; PYTEST_ARGS=... e.g. "-n 8 --dist loadfile" where pytest-xdist is installed). Sized for
# one H100/H200-class GPU: the bench first (the figures nobody else can make), each part under its own
# timeout, the whole under 10 minutes.
#
#   scripts/gpu_check.sh [OUT]
set -uo pipefail
OUT=${1:-runs/gpu-check}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" > "$OUT/nvidia-smi.txt"
"$PY" - <<'PYEOF' | tee "$OUT/torch.txt"
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__} sees no CUDA device: install a CUDA build of torch")
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"{p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
PYEOF
status=0
start=$(date +%s)
timeout "${BENCH_TIMEOUT:-300}" "$PY" -m ademvl bench --out "$OUT/bench" --llm random:llama-7b \
    --vision random:clip-vit-large-patch14 --dtype bf16 --device cuda --batch 16 --text-len 256 \
    --repeats 3 --warmup 1 --profile 2>&1 | tee "$OUT/bench.txt" || status=1
echo "bench: $(( $(date +%s) - start )) s" | tee -a "$OUT/bench.txt"
start=$(date +%s)
# shellcheck disable=SC2086
timeout "${TEST_TIMEOUT:-220}" "$PY" -m pytest -q tests -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 \
    | tee "$OUT/pytest.txt" || status=1
echo "tests: $(( $(date +%s) - start )) s" | tee -a "$OUT/pytest.txt"
echo "results under $OUT (exit $status)"
exit $status
