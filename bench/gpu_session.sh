#!/usr/bin/env bash
# One call on a lent GPU machine (<= 9 minutes): GPU tests, the benchmark, the rest of the test suite,
# the pytest-benchmark microbenchmarks; everything lands under $OUT.
#
#   OUT=/some/dir BENCH_COMMIT=$(git rev-parse HEAD) bash bench/gpu_session.sh
# (a dry run of the flow on a CPU: BENCH_GRID=smoke BUDGET_S=300 OUT=/tmp/x bash bench/gpu_session.sh)
#
# Run from anywhere; it cds to the repository root. Assumes torch, triton, transformers, peft and
# pytest are installed (no network needed; matplotlib / tqdm / pytest-benchmark are optional).
# Order: the cuda-marked tests first (they gate every speed claim: their exit code goes into the
# benchmark's JSON), then the benchmark (the artefact a GPU session exists for), then the rest of
# the suite and the pytest-benchmark run in whatever time is left. Every step has a timeout sent as
# SIGINT, so pytest prints its summary and the benchmark writes what it measured.
#
# Outputs: env.txt, gpu_tests_cuda.log, bench.log, bench/{results.json,results.md,ratio_*.png},
# gpu_tests.log, pytest_benchmark.{log,json}, SUMMARY.md.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-530}
OUT="${OUT:-bench/results/gpu-session}"
mkdir -p "$OUT"
PY=${PYTHON:-}
for cand in python python3; do  # the first interpreter that has torch
  [ -z "$PY" ] && command -v "$cand" >/dev/null && "$cand" -c "import torch" 2>/dev/null && PY=$(command -v "$cand")
done
[ -z "$PY" ] && { echo "no python with torch found (set PYTHON=...)" | tee "$OUT/SUMMARY.md"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export BENCH_COMMIT="${BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}"
unset TRITON_INTERPRET TIEDLORA_BACKEND TIEDLORA_FWD_PATH
# pyproject's addopts carry --benchmark-disable, which pytest rejects without pytest-benchmark.
PYTEST_OPTS=()
"$PY" -c "import pytest_benchmark" 2>/dev/null || PYTEST_OPTS=(-o "addopts=-ra --import-mode=importlib")
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
phase() { echo "== $1 (t=$(( $(date +%s) - START ))s, $(left)s left)" | tee -a "$OUT/SUMMARY.md"; }

: > "$OUT/SUMMARY.md"
{
  nvidia-smi
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name())"
  "$PY" -c "import transformers, peft; print('transformers', transformers.__version__, 'peft', peft.__version__)"
  "$PY" -c "import matplotlib, tqdm, pytest_benchmark" 2>&1 || echo "(optional packages missing: plots / progress bar / pytest-benchmark skipped)"
  echo "commit ${BENCH_COMMIT:-unknown}"
} > "$OUT/env.txt" 2>&1

phase "cuda-marked tests"
timeout -s INT -k 15 150 "$PY" -m pytest ${PYTEST_OPTS[@]+"${PYTEST_OPTS[@]}"} -q -p no:cacheprovider -m cuda tests -rfE > "$OUT/gpu_tests_cuda.log" 2>&1
CUDA_RC=$?
echo "cuda-marked tests: exit $CUDA_RC; $(tail -1 "$OUT/gpu_tests_cuda.log")" | tee -a "$OUT/SUMMARY.md"

phase "benchmark (targets grid + end-to-end)"
BENCH_S=$(( $(left) - 140 ))
BENCH_S=$(( BENCH_S > 300 ? 300 : BENCH_S ))
if [ "$BENCH_S" -ge 60 ]; then
  BENCH_MIN=$("$PY" -c "print(round(($BENCH_S - 25) / 60, 2))")
  timeout -s INT -k 20 "$BENCH_S" "$PY" -m bench --grid "${BENCH_GRID:-targets}" --max-minutes "$BENCH_MIN" --e2e-minutes 1.4 \
    --tests-exit-code "$CUDA_RC" --out "$OUT/bench" > "$OUT/bench.log" 2>&1
  echo "benchmark: exit $?; $(tail -1 "$OUT/bench.log")" | tee -a "$OUT/SUMMARY.md"
else
  echo "benchmark: skipped (out of time)" | tee -a "$OUT/SUMMARY.md"
fi

phase "full test suite on CUDA (cuda-marked ones already ran)"
FULL_S=$(( $(left) - 45 ))
if [ "$FULL_S" -gt 20 ]; then
  timeout -s INT -k 15 "$FULL_S" "$PY" -m pytest ${PYTEST_OPTS[@]+"${PYTEST_OPTS[@]}"} -q -p no:cacheprovider -m "not cuda" tests -rfE --maxfail=25 \
    > "$OUT/gpu_tests.log" 2>&1
  echo "full suite: exit $?; $(tail -1 "$OUT/gpu_tests.log")" | tee -a "$OUT/SUMMARY.md"
else
  echo "full suite: skipped (out of time)" | tee -a "$OUT/SUMMARY.md"
fi

phase "pytest-benchmark microbenchmarks"
PB_S=$(( $(left) - 5 ))
if [ "$PB_S" -gt 20 ] && "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  timeout -s INT -k 10 "$PB_S" "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_ops.py --benchmark-enable \
    --benchmark-json="$OUT/pytest_benchmark.json" --benchmark-columns=median,iqr,rounds > "$OUT/pytest_benchmark.log" 2>&1
  echo "pytest-benchmark: exit $?" | tee -a "$OUT/SUMMARY.md"
else
  echo "pytest-benchmark: skipped (out of time or not installed)" | tee -a "$OUT/SUMMARY.md"
fi

phase "done"
if [ -f "$OUT/bench/results.md" ]; then
  sed -n '/^## Targets/,/^## Per-layer/p' "$OUT/bench/results.md" | head -40 | tee -a "$OUT/SUMMARY.md"
  sed -n '/^## End-to-end/,$p' "$OUT/bench/results.md" | tee -a "$OUT/SUMMARY.md"
fi
exit 0
