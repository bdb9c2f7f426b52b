#!/usr/bin/env bash
# The GPU check in one command: the CUDA tests, then benchmarks/gpu_bench.py, within a time
# budget, with everything written to one folder. Installs nothing from the network: wheels
# carried in --wheels DIR are installed offline first (optree if the machine lacks it, and the
# benchmark's optional peers pytorch_optimizer and kron-torch; README.md "On a GPU").
#
#   bash benchmarks/gpu_check.sh OUT_DIR                 # on a machine with a GPU
#   bash benchmarks/gpu_check.sh --device cpu OUT_DIR    # the same steps on a CPU (a dry run)
#
# Options, before OUT_DIR:
#   --device cuda|cpu  the benchmark's device (default cuda); cpu also gives it the tiny shape
#                      set and dynamo's eager compile backend, so that a dry run takes seconds
#   --budget-s N       seconds for the tests and the benchmark together (default 480); the
#                      tests get 2/5 of it, the benchmark what is left
#   --tests "ARGS"     pytest's arguments (default: every test of tests/test_cuda.py but the
#                      ones that run this script, and the CUDA tests of test_soap.py and
#                      test_kron.py); run with -n 4 where pytest-xdist is installed and the
#                      device is cuda
#   --bench "ARGS"     more arguments for gpu_bench.py, after the defaults (e.g. "--shapes tiny")
#   --wheels DIR       wheels to install offline (default: .whl in the repository, if present)
#
# While the tests run, gpu_bench.py --warm-caches compiles the benchmark's updates in parallel
# processes into inductor's on-disk caches, so that the benchmark loads them instead of spending
# its budget compiling. OUT_DIR gets env.txt, tests.log, warm.log, bench.log, gpu_bench.md,
# gpu_bench.json and summary.md (the environment, the tests' result and every table), which is
# also printed at the end. The exit status is the tests' if they failed, else the benchmark's
# (3: the environment is not usable).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DEVICE=cuda
BUDGET=480
TEST_ARGS=(tests/test_cuda.py tests/test_soap.py tests/test_kron.py
           -k "cuda and not benchmark_script")
BENCH_ARGS=()
WHEELS="$ROOT/.whl"
OUT=""

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --budget-s) BUDGET="$2"; shift 2 ;;
    --tests) eval "TEST_ARGS=($2)"; shift 2 ;;
    --bench) eval "BENCH_ARGS=($2)"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) OUT="$1"; shift ;;
  esac
done
if [ -z "$OUT" ]; then
  echo "gpu_check.sh: OUT_DIR is missing" >&2
  usage >&2
  exit 2
fi
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
cd "$ROOT" || exit 2
# the interpreter itself, not a launcher script in front of it: the compiles started in the
# background below are stopped by their process id
PY="$("$PY" -c 'import sys; print(sys.executable)')" || exit 3
START=$SECONDS
export PYTHONUNBUFFERED=1
# imports come from sys.path, not from the working directory: a functim installed below (with
# functim.adapters, which the source tree only provides once installed) is not shadowed by the
# checkout's functim/ folder (Python >= 3.11)
export PYTHONSAFEPATH=1

# -- 1. packages: carried wheels, then functim itself if it is not importable -------------------
SITE="$(mktemp -d "${TMPDIR:-/tmp}/functim-gpu-check.XXXXXX")"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
WHEEL_FILES=("$WHEELS"/*.whl)
if [ -e "${WHEEL_FILES[0]}" ]; then
  echo "installing ${#WHEEL_FILES[@]} wheels from $WHEELS (offline)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
    "${WHEEL_FILES[@]}" || exit 3
fi
if ! "$PY" -c "import optree, torch" 2>/dev/null; then
  echo "gpu_check.sh: torch and optree must be importable (carry optree's wheel in $WHEELS)" >&2
  exit 3
fi
if ! "$PY" -c "import functim.adapters" 2>/dev/null; then
  echo "installing functim from $ROOT into $SITE (offline)"
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" "$ROOT" \
    || exit 3
fi

# -- 2. the environment --------------------------------------------------------------------------
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); host: $(uname -srm); cpus: $(nproc)"
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
  "$PY" - <<'EOF'
import importlib
import platform

import torch

print(f"python {platform.python_version()}; torch {torch.__version__}, CUDA {torch.version.cuda},"
      f" {torch.cuda.device_count()} CUDA device(s)")
for i in range(torch.cuda.device_count()):
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
for name in ("functim", "optree", "pytest", "hypothesis", "xdist", "triton", "opt_einsum",
             "pytorch_optimizer", "kron_torch"):
    try:
        module = importlib.import_module(name)
    except ImportError:
        print(f"{name}: not installed")
    else:
        print(f"{name} {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# -- 3. the tests, while the benchmark's updates compile into inductor's caches -----------------
DEVICE_ARGS=()
if [ "$DEVICE" = cpu ]; then
  DEVICE_ARGS=(--shapes tiny --compile-backend eager --steps 3 --warmup 1)
fi
BENCH=("$PY" benchmarks/gpu_bench.py --device "$DEVICE" "${DEVICE_ARGS[@]}" "${BENCH_ARGS[@]}")
# the compiles are most of the benchmark's time and need the CPUs more than the GPU: done beside
# the tests, the benchmark below loads them from the caches (and times them alone)
"${BENCH[@]}" --warm-caches > "$OUT/warm.log" 2>&1 &
WARM_PID=$!
TEST_BUDGET=$(( BUDGET * 2 / 5 ))
WORKERS=()
if [ "$DEVICE" = cuda ] && "$PY" -c "import xdist" 2>/dev/null; then
  WORKERS=(-n 4)
fi
echo "tests: pytest ${WORKERS[*]} ${TEST_ARGS[*]} (at most ${TEST_BUDGET} s)"
timeout "$TEST_BUDGET" "$PY" -m pytest -q -rs -p no:cacheprovider "${WORKERS[@]}" \
  "${TEST_ARGS[@]}" > "$OUT/tests.log" 2>&1
TESTS_RC=$?
if [ "$TESTS_RC" -eq 124 ]; then
  echo "gpu_check.sh: the tests were stopped after ${TEST_BUDGET} s" >> "$OUT/tests.log"
fi
tail -n 3 "$OUT/tests.log"

# -- 4. the benchmark -----------------------------------------------------------------------------
# the compiles still going on get a quarter of what is left, then the timing starts without them
WARM_WAIT=$(( (BUDGET - (SECONDS - START)) / 4 ))
while kill -0 "$WARM_PID" 2>/dev/null && [ "$WARM_WAIT" -gt 0 ]; do
  sleep 1
  WARM_WAIT=$(( WARM_WAIT - 1 ))
done
if kill -0 "$WARM_PID" 2>/dev/null; then
  kill "$WARM_PID" 2>/dev/null  # it stops its own compiling processes
  echo "gpu_check.sh: the compiles were stopped to leave the benchmark its time" >> "$OUT/warm.log"
fi
wait "$WARM_PID" 2>/dev/null
tail -n 1 "$OUT/warm.log"
LEFT=$(( BUDGET - (SECONDS - START) ))
# a measurement started just before the budget runs out still ends: leave it room
BENCH_BUDGET=$(( LEFT > 150 ? LEFT - 90 : LEFT * 2 / 5 ))
HARD_STOP=$(( LEFT > 20 ? LEFT - 10 : 10 ))
echo "benchmark: ${BENCH[*]:1} (budget ${BENCH_BUDGET} s, stopped after ${HARD_STOP} s)"
timeout "$HARD_STOP" "${BENCH[@]}" --precompile-workers 0 --budget-s "$BENCH_BUDGET" \
  --out "$OUT" > "$OUT/bench.log" 2>&1
BENCH_RC=$?
tail -n 2 "$OUT/bench.log"

# -- 5. the summary -------------------------------------------------------------------------------
{
  echo "# GPU check, $(date -u '+%Y-%m-%d'): tests exit ${TESTS_RC}, benchmark exit ${BENCH_RC}," \
       "$(( SECONDS - START )) s"
  echo
  echo '```'
  cat "$OUT/env.txt"
  echo '```'
  echo
  echo "## Tests: pytest ${WORKERS[*]} ${TEST_ARGS[*]}"
  echo
  echo '```'
  grep -E '^(SKIPPED|FAILED|ERROR)' "$OUT/tests.log" | cut -c1-200 | sort | uniq -c | head -n 40
  tail -n 1 "$OUT/tests.log"
  echo '```'
  echo
  if [ -f "$OUT/gpu_bench.md" ]; then cat "$OUT/gpu_bench.md"; else echo "(no benchmark tables)"; fi
} > "$OUT/summary.md"
cat "$OUT/summary.md"
rm -rf "$SITE"
if [ "$TESTS_RC" -ne 0 ]; then exit "$TESTS_RC"; fi
exit "$BENCH_RC"
