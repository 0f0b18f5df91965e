#!/usr/bin/env bash
# One call on a lent GPU machine: the targets microbenchmark, the cuda-marked tests, the end-to-end
# benchmark, the rest of the suite and pytest-benchmark, all inside BUDGET_S seconds (default 480 =
# 8 minutes; the machine's start and the environment capture before the clock are not included).
#
#   On the device tool (what comes back is at most 8 files, so everything is packed into one tarball):
#     PACK_TO=$OUT OUT=/tmp/gpu-session BENCH_COMMIT=<sha> bash bench/gpu_session.sh
#   -> $OUT/gpu_session.tar.gz (every file below) and $OUT/SUMMARY.md, both refreshed after each phase.
#   Locally: OUT=some/dir bash bench/gpu_session.sh. A CPU dry run of the flow (tests/bench runs one;
#   150 s is the smallest budget whose scaled shares fit, and the phases end early on a CPU):
#     BUDGET_S=150 BENCH_GRID=smoke OUT=/tmp/x bash bench/gpu_session.sh
#
# Phases, in this order. Each has a guaranteed share and a cap (seconds at BUDGET_S=480; both scale
# with BUDGET_S; PHASE_MINS / PHASE_CAPS="name=s,..." override them unscaled, and a name that is no
# phase stops the script before anything runs). A phase may run up to
#   min(cap, seconds left - the guaranteed shares of the phases after it - RESERVE_S - STEP_S per phase),
# so every later phase keeps its share and time a phase leaves unused flows to the next ones. At its
# allowance minus GRACE_S a phase gets SIGINT (pytest prints its summary; the benchmark writes what
# it measured), SIGKILL GRACE_S later: no phase ends past its allowance.
#
#   phase       share  cap  what
#   bench         90   180  python -m bench --grid targets --no-e2e: the artefact. Timings (each impl
#                           interleaved with the limit), then the probes (copy bandwidth, addmm vs mm,
#                           the merged weight), then the profiler pass; its own deadline leaves MARGIN_S
#                           for start-up and the final write (138 measurements: 92 s on an H200). At
#                           BUDGET_S=450 its share and the time the later shares leave allow it 146 s.
#   cuda_tests   140   160  pytest -m cuda: 37 tests (30 of them took 85 s wall, 62-69 s in pytest, on an
#                           H200); at BUDGET_S=450 a 131 s share, SIGINT no earlier than 121 s: an
#                           interrupted run exits 124 and withdraws every speed claim
#   host          10    25  python -m bench.host_overhead: host us per call of each pathway (the e2e step
#                           of a small model is host-bound) and a cProfile of our fwd+bwd
#   tiles         40    90  python -m bench.tile_sweep: each Triton kernel's launch configurations against
#                           its byte floor, the most decisive cases first (a full sweep needs ~3 minutes)
#   e2e           50   120  python -m bench --e2e-only: 19 configs in the order of the targets they decide
#                           (bench.e2e.CONFIGS: eager TL6 / PEFT / DoRA / 4-bit first, ~10 s each; then the
#                           CUDA-graph family, ~1 min of compilation each: a second call's E2E_CONFIGS)
#   serving       25   120  python -m bench.serving: many adapters in one batch (a full run needs ~3
#                           minutes: this share measures its first configs; PHASE_CAPS=serving=200 for more)
#   suite         10     -  pytest -m "not cuda": the rest of the suite, in whatever is left
#   pybench       20    40  pytest bench/test_bench_ops.py --benchmark-enable (its share must exceed GRACE_S)
#   reserve       15        SUMMARY.md, the benchmark's claims restamped with the tests' exit code, the tarball
#
# The microbenchmark runs before the tests that gate its claims: it records the tests as pending (no
# speed claims, no target verdicts, in results.json and SUMMARY.md alike) until the tests' exit code
# is restamped into it after the tests phase: 0 gives the claims back, anything else keeps them
# withdrawn (meta.tests_exit_code, speed_claims, no_claims_reason).
#
# Files under $OUT: env.txt, phases.tsv (name, share, cap, allowance, start, end, exit code, status),
# SUMMARY.md (what each phase did and skipped), bench/{results.json,results.md,ratio_*.png}, bench.log,
# cuda_tests.{log,json}, host/{host_overhead.json,host_overhead_profile.txt}, host.log,
# tiles/{tile_sweep.json,tile_sweep.md}, tiles.log,
# e2e/{results.json,results.md}, e2e.log, serving/{results.json,results.md}, serving.log,
# suite.{log,json}, pybench.{log,json}, pytest_benchmark.json. The *.json of a pytest phase
# (bench/pytest_phase_report.py) lists the tests it never ran.
#
# Knobs: BUDGET_S, OUT, PACK_TO, PYTHON, BENCH_COMMIT, SESSION_PHASES (all), TESTS_EXIT_CODE, TILE_CASES
# (bench.tile_sweep --cases), BENCH_GRID (targets), BENCH_IMPLS
# (limit,ours,merged,addmm,peft_lora,peft_vera), E2E_CONFIGS (all), TEST_PATHS (tests), PHASE_MINS,
# PHASE_CAPS. Assumes torch, triton, transformers, peft and pytest are installed (no network);
# matplotlib / tqdm / pytest-benchmark / nvidia-ml-py are optional.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${BUDGET_S:-480}
OUT="${OUT:-bench/results/gpu-session}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PACK_TO=${PACK_TO:-}
BENCH_GRID=${BENCH_GRID:-targets}
BENCH_IMPLS=${BENCH_IMPLS:-limit,ours,merged,addmm,peft_lora,peft_vera}
E2E_CONFIGS=${E2E_CONFIGS:-}
read -r -a TESTS <<< "${TEST_PATHS:-tests}"

PHASES=(bench cuda_tests host tiles e2e serving suite pybench)
SHARE=(90 140 10 40 50 25 10 20)
CAP=(180 160 25 90 120 120 0 40)  # 0: no cap
RESERVE_S=15            # not scaled: the final summary step needs its seconds at any budget
STEP_S=2                # each phase's own summary and tarball refresh, kept out of the later shares
scale() { echo $(( $1 * BUDGET_S / 480 )); }
for i in "${!PHASES[@]}"; do
  SHARE[$i]=$(scale "${SHARE[$i]}")
  CAP[$i]=$(scale "${CAP[$i]}")
done
# override ARRAY KNOB "name=s,name=s": a misspelt phase name or a value that is no number of seconds
# stops the script here, before anything runs (ignored, it would leave a phase its default share).
override() {
  local -n arr=$1
  local kv i found
  for kv in ${3//,/ }; do
    found=
    for i in "${!PHASES[@]}"; do
      [ "${PHASES[$i]}" = "${kv%%=*}" ] && found=$i
    done
    if [ -z "$found" ]; then
      echo "$2: no phase named '${kv%%=*}' (phases: ${PHASES[*]})" >&2; exit 2
    fi
    if ! [[ "${kv#*=}" =~ ^[0-9]+$ ]]; then
      echo "$2: '$kv' is not name=seconds" >&2; exit 2
    fi
    arr[$found]=${kv#*=}
  done
}
override SHARE PHASE_MINS "${PHASE_MINS:-}"
override CAP PHASE_CAPS "${PHASE_CAPS:-}"
# SESSION_PHASES="tiles,e2e" (say): only those phases run, in the usual order, with their shares and
# caps (a second call of a session: the rest of the tile sweep, the compiled e2e configs; pass the
# first call's cuda-test exit code as TESTS_EXIT_CODE so its speed claims stand).
if [ -n "${SESSION_PHASES:-}" ]; then
  for want in ${SESSION_PHASES//,/ }; do
    case " ${PHASES[*]} " in
      *" $want "*) ;;
      *) echo "SESSION_PHASES: no phase named '$want' (phases: ${PHASES[*]})" >&2; exit 2 ;;
    esac
  done
  keep_p=() keep_s=() keep_c=()
  for i in "${!PHASES[@]}"; do
    case ",${SESSION_PHASES// /,}," in
      *",${PHASES[$i]},"*) keep_p+=("${PHASES[$i]}"); keep_s+=("${SHARE[$i]}"); keep_c+=("${CAP[$i]}") ;;
    esac
  done
  PHASES=("${keep_p[@]}") SHARE=("${keep_s[@]}") CAP=("${keep_c[@]}")
fi
GRACE_S=$(( BUDGET_S >= 240 ? 10 : 3 ))
MARGIN_S=$(( BUDGET_S >= 240 ? 20 : 8 ))  # a python phase's start-up and final write, inside its allowance

PY=${PYTHON:-}
for cand in python python3; do  # the first interpreter that has torch
  [ -z "$PY" ] && command -v "$cand" >/dev/null && "$cand" -c "import torch" 2>/dev/null && PY=$(command -v "$cand")
done
[ -z "$PY" ] && { echo "no python with torch found (set PYTHON=...)" | tee "$OUT/SUMMARY.md"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export BENCH_COMMIT="${BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}"
unset TRITON_INTERPRET TIEDLORA_BACKEND
# bitsandbytes (the e2e's *_4bit configs, tests/integrations/test_quantized.py) is not installed on the
# lent GPU machine, which has no network: a wheel carried in wheels/ (git-ignored; fetch it with
# `pip download bitsandbytes==0.50.2 --no-deps -d wheels` and pass carry=["wheels"]) is installed here.
if ls wheels/bitsandbytes-*.whl >/dev/null 2>&1 && ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-index wheels/bitsandbytes-*.whl > "$OUT/pip_bitsandbytes.log" 2>&1 \
    || echo "bitsandbytes wheel did not install (see pip_bitsandbytes.log): the 4-bit configs will be skipped"
fi
# pyproject's addopts carry --benchmark-disable, which pytest rejects without pytest-benchmark.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p bench.pytest_phase_report -rfE)
"$PY" -c "import pytest_benchmark" 2>/dev/null || PYTEST+=(-o "addopts=-ra --import-mode=importlib")

{
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU dry run)")
for name in ("triton", "transformers", "peft", "bitsandbytes", "matplotlib", "tqdm", "pytest_benchmark", "pynvml"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "present"))
    except ImportError:
        print(name, "MISSING")
EOF
  echo "commit ${BENCH_COMMIT:-unknown}; budget ${BUDGET_S} s; shares ${SHARE[*]}; caps ${CAP[*]}; reserve ${RESERVE_S} s; grace ${GRACE_S} s"
  total=$RESERVE_S
  for i in "${!PHASES[@]}"; do total=$(( total + SHARE[i] + STEP_S )); done
  [ "$total" -le "$BUDGET_S" ] || echo "WARNING: shares + reserve = ${total} s > BUDGET_S: the last phases get less than their share"
} > "$OUT/env.txt" 2>&1

START=$(date +%s)
now() { echo $(( $(date +%s) - START )); }
: > "$OUT/phases.tsv"
summarize() {  # SUMMARY.md from what is there now (extra arguments: see bench/session_summary.py)
  "$PY" -m bench.session_summary "$OUT" --budget "$BUDGET_S" "$@" > /dev/null 2>> "$OUT/summary_errors.log"
  if [ -n "$PACK_TO" ]; then
    mkdir -p "$PACK_TO"
    tar czf "$PACK_TO/gpu_session.tar.gz.tmp" -C "$OUT" . && mv "$PACK_TO/gpu_session.tar.gz.tmp" "$PACK_TO/gpu_session.tar.gz"
    cp "$OUT/SUMMARY.md" "$PACK_TO/SUMMARY.md" 2>/dev/null
  fi
}

# allowance NAME: sets PHASE_I, PHASE_ALLOW (seconds this phase may take) and PHASE_T (its SIGINT
# deadline); returns 1 (and records the phase as skipped) when less than 3 s is left for it, or
# without a record when SESSION_PHASES leaves it out.
allowance() {
  local i later=0 j
  PHASE_I=
  for i in "${!PHASES[@]}"; do [ "${PHASES[$i]}" = "$1" ] && PHASE_I=$i; done
  [ -n "$PHASE_I" ] || return 1
  for (( j = PHASE_I + 1; j < ${#PHASES[@]}; j++ )); do later=$(( later + SHARE[j] + STEP_S )); done
  PHASE_ALLOW=$(( BUDGET_S - $(now) - later - STEP_S - RESERVE_S ))
  if [ "${CAP[$PHASE_I]}" -gt 0 ] && [ "$PHASE_ALLOW" -gt "${CAP[$PHASE_I]}" ]; then PHASE_ALLOW=${CAP[$PHASE_I]}; fi
  PHASE_T=$(( PHASE_ALLOW - GRACE_S ))
  if [ "$PHASE_T" -lt 3 ]; then
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "${SHARE[$PHASE_I]}" "${CAP[$PHASE_I]}" "$PHASE_ALLOW" "$(now)" "$(now)" \
      - "skipped: no time left" >> "$OUT/phases.tsv"
    echo "== $1: skipped (no time left)"
    return 1
  fi
  echo "== $1: allowed ${PHASE_ALLOW} s (share ${SHARE[$PHASE_I]}, cap ${CAP[$PHASE_I]}) at t=$(now) s"
}

# timed NAME LOG CMD...: run CMD under the allowance just computed, log to LOG, record the outcome.
timed() {
  local name=$1 log=$2 t0 rc status
  shift 2
  t0=$(now)
  timeout -s INT -k "$GRACE_S" "$PHASE_T" "$@" > "$log" 2>&1
  rc=$?
  case $rc in
    0) status="ran" ;;
    124) status="stopped at its allowance (SIGINT)" ;;
    137) status="killed at its allowance + grace (SIGKILL)" ;;
    *) status="ran, exit $rc" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "${SHARE[$PHASE_I]}" "${CAP[$PHASE_I]}" "$PHASE_ALLOW" "$t0" "$(now)" \
    "$rc" "$status" >> "$OUT/phases.tsv"
  echo "   $name: $status after $(( $(now) - t0 )) s"
  summarize
  return $rc
}

minutes() { awk -v s="$1" 'BEGIN { if (s < 6) s = 6; printf "%.2f", s / 60 }'; }

CUDA_RC=${TESTS_EXIT_CODE:--1}  # a call without the tests phase: the first call's exit code, if given
# With the tests phase still to come, what runs before it claims nothing: a session stopped from
# outside while the tests run must not leave the benchmark's verdicts standing over untested code.
case " ${PHASES[*]} " in *" cuda_tests "*) CUDA_RC=pending ;; esac
if allowance bench; then
  timed bench "$OUT/bench.log" "$PY" -m bench --grid "$BENCH_GRID" --no-e2e --impls "$BENCH_IMPLS" \
    --max-minutes "$(minutes $(( PHASE_T - MARGIN_S )))" --tests-exit-code "$CUDA_RC" --out "$OUT/bench"
fi

if allowance cuda_tests; then
  PHASE_REPORT="$OUT/cuda_tests.json" timed cuda_tests "$OUT/cuda_tests.log" "${PYTEST[@]}" -m cuda "${TESTS[@]}"
  CUDA_RC=$?
elif [ "$CUDA_RC" = pending ]; then
  CUDA_RC=-1  # no time was left for them
fi
echo "$CUDA_RC" > "$OUT/cuda_tests.rc"
# The claims follow the tests now, not only at the end: 0 gives the benchmark its claims back, and a
# session stopped from outside after this point leaves no verdict standing over failed tests.
summarize --tests-exit-code "$CUDA_RC"

if allowance host; then
  timed host "$OUT/host.log" "$PY" -m bench.host_overhead --out "$OUT/host"
fi

if allowance tiles; then
  timed tiles "$OUT/tiles.log" "$PY" -m bench.tile_sweep --out "$OUT/tiles" ${TILE_CASES:+--cases "$TILE_CASES"} \
    --tests-exit-code "$CUDA_RC" --max-seconds $(( PHASE_T - MARGIN_S > 10 ? PHASE_T - MARGIN_S : 10 ))
fi

if allowance e2e; then
  timed e2e "$OUT/e2e.log" "$PY" -m bench --e2e-only ${E2E_CONFIGS:+--e2e-configs "$E2E_CONFIGS"} \
    --max-minutes "$(minutes $(( PHASE_T - MARGIN_S )))" --tests-exit-code "$CUDA_RC" --out "$OUT/e2e"
fi

if allowance serving; then
  timed serving "$OUT/serving.log" "$PY" -m bench.serving --out "$OUT/serving" --tests-exit-code "$CUDA_RC" \
    --max-minutes "$(minutes $(( PHASE_T - MARGIN_S )))"
fi

if allowance suite; then
  PHASE_REPORT="$OUT/suite.json" timed suite "$OUT/suite.log" "${PYTEST[@]}" -m "not cuda" "${TESTS[@]}" --maxfail=25
fi

if allowance pybench; then
  if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
    PHASE_REPORT="$OUT/pybench.json" timed pybench "$OUT/pybench.log" "${PYTEST[@]}" bench/test_bench_ops.py \
      --benchmark-enable --benchmark-json="$OUT/pytest_benchmark.json" --benchmark-columns=median,iqr,rounds
  else
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' pybench "${SHARE[$PHASE_I]}" "${CAP[$PHASE_I]}" "$PHASE_ALLOW" "$(now)" \
      "$(now)" - "skipped: pytest-benchmark not installed" >> "$OUT/phases.tsv"
  fi
fi

summarize --tests-exit-code "$CUDA_RC" --final
[ -s "$OUT/summary_errors.log" ] || rm -f "$OUT/summary_errors.log"
cat "$OUT/SUMMARY.md"
exit 0
