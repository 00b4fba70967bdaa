#!/usr/bin/env bash
# One script for a lent GPU machine (no network): set up, run the GPU tests, run the GPU benchmark.
#
#   bash benchmarks/gpu.sh            # from anywhere; results are copied into $OUT when it is set
#
# The machine has Python 3.12 with torch, cupy-cuda13x, numba + numba-cuda installed. Its NumPy
# (2.5.x) is too new for numba, so a NumPy 2.4.6 cp312 wheel carried under wheels/ is installed first
# when one is there (pip install --no-index: nothing is downloaded). Then this repository is
# installed in editable mode without dependencies, the tests in tests/backends run (the CPU emulation
# of the kernels is skipped here: it runs in CI), and benchmarks/gpu.py runs with whatever is left of
# the time budget. The whole script stays within ~8 minutes (BUDGET_S, default 470 s).
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-470}
PY=${PYTHON:-python3}
LOGDIR=benchmarks/results/gpu-logs
mkdir -p "$LOGDIR"
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(date +%s) + START )); }

echo "== machine ($(date -u +%FT%TZ))"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
$PY --version

echo "== setup"
whl=$(ls wheels/numpy-2.4.6-*cp312*.whl 2>/dev/null | head -n 1)
if [ -n "$whl" ]; then
    echo "installing the carried $whl (numba needs NumPy < 2.5)"
    $PY -m pip install --no-index --no-deps --quiet "$whl" 2>&1 | tail -n 3
else
    echo "no wheels/numpy-2.4.6-*cp312*.whl here: keeping the installed NumPy"
fi
$PY -m pip install --no-deps --no-build-isolation --quiet -e . 2>&1 | tail -n 3
$PY - <<'PYEOF'
import importlib
for name in ("numpy", "cupy", "torch", "numba", "numba_cuda", "pytest", "hypothesis", "unet_np"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:11s} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"  {name:11s} NOT importable: {type(exc).__name__}: {exc}")
PYEOF
echo "setup done after $(elapsed) s"

# tests/conftest.py needs hypothesis; without it, run the backend tests without the conftest.
PYTEST_ARGS="-q -rs -p no:cacheprovider"
if ! $PY -c "import hypothesis" 2>/dev/null; then
    echo "hypothesis is not installed: running pytest with --noconftest"
    PYTEST_ARGS="$PYTEST_ARGS --noconftest"
fi
export UNET_NP_EMULATION=0          # the CPU emulation of the kernels runs in CI, not on device time

echo "== tests: the cupy backend (tests/backends/test_cupy.py, test_cuda_compile.py)"
timeout 150 $PY -m pytest $PYTEST_ARGS tests/backends/test_cupy.py tests/backends/test_cuda_compile.py \
    2>&1 | tee "$LOGDIR/pytest-cupy.txt" | tail -n 60
echo "exit status ${PIPESTATUS[0]} after $(elapsed) s"

echo "== tests: the rest of tests/backends"
timeout $(( $(left) > 330 ? 110 : 60 )) $PY -m pytest $PYTEST_ARGS tests/backends \
    --ignore=tests/backends/test_cupy.py --ignore=tests/backends/test_cuda_compile.py \
    2>&1 | tee "$LOGDIR/pytest-rest.txt" | tail -n 40
echo "exit status ${PIPESTATUS[0]} after $(elapsed) s"

echo "== benchmark (benchmarks/gpu.py)"
REMAIN=$(left)
SOFT=$(( REMAIN - 70 ))
if [ "$SOFT" -lt 60 ]; then SOFT=60; fi
HARD=$(( REMAIN - 10 ))
if [ "$HARD" -lt 70 ]; then HARD=70; fi
echo "soft budget ${SOFT} s, hard limit ${HARD} s"
timeout "$HARD" $PY -m benchmarks.gpu --budget-s "$SOFT" "$@" 2>&1 | tee "$LOGDIR/benchmark.txt"
echo "exit status ${PIPESTATUS[0]} after $(elapsed) s"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp benchmarks/results/gpu-*.json benchmarks/results/gpu-*.md "$OUT"/ 2>/dev/null || true
    cp "$LOGDIR"/*.txt "$OUT"/ 2>/dev/null || true
    echo "copied results and logs to $OUT"
fi
echo "== done after $(elapsed) s"
