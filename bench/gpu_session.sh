#!/usr/bin/env bash
# One call on a lent GPU machine: GPU tests, then the benchmark; everything lands under $OUT.
#   OUT=/some/dir bash bench/gpu_session.sh
# Assumes torch, triton, transformers, peft and pytest are installed (no network needed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-session}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
{
  nvidia-smi
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
# GPU parity first: the kernels (realistic shapes), the integration, and the cuda-marked tests.
timeout 240 python -m pytest -q -p no:cacheprovider tests/ops tests/integrations/test_training.py \
  tests/test_variants.py -x > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests exit code: $?" | tee -a "$OUT/gpu_tests.log"
tail -3 "$OUT/gpu_tests.log"
timeout 300 python -m bench --grid targets --max-minutes 4 --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "bench exit code: $?" | tee -a "$OUT/bench.log"
head -40 "$OUT/bench/results.md" 2>/dev/null
