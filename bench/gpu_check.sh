#!/usr/bin/env bash
# The GPU check, in one run of a few minutes: the GPU pytest suite (bench/test_bench_gpu.py:
# correctness against the torch reference, then timings), the CUDA parts of the test suite
# (device pipeline, CUDA graphs, tf32; their CPU parts run too) and `ifad-fast bench speed`.
# Each part runs under its own time limit; every report lands in one folder.
#
#   bash bench/gpu_check.sh [OUT]     # OUT: the report folder (default: $OUT, else gpu_check_<UTC time>)
#
# Settings (environment):
#   PYTHON        the interpreter with ifad-fast installed (default: python)
#   DEVICE        cuda (default) or cpu: DEVICE=cpu QUICK=1 is a dry run of the same steps on a CPU
#   QUICK=1       bench speed --quick (small sizes; not comparable)
#   LIMIT_SUITE, LIMIT_TESTS, LIMIT_SPEED   seconds for each part (default 240, 240, 480)
#
# Writes OUT/env.txt (GPU, driver, torch, Triton, commit), OUT/gpu_suite.txt and
# OUT/gpu_suite.json (pytest-benchmark), OUT/cuda_tests.txt, OUT/speed.txt and OUT/speed/speed.json,
# and OUT/summary.txt: one line per part with its exit status (0 passed, 124 timed out).
# Exits 0 when every part passed, 1 when one failed, 2 when it cannot run here.
set -u

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${1:-${OUT:-gpu_check_$(date -u +%Y%m%d_%H%M%S)}}"
PYTHON="${PYTHON:-python}"
DEVICE="${DEVICE:-cuda}"
LIMIT_SUITE="${LIMIT_SUITE:-240}"
LIMIT_TESTS="${LIMIT_TESTS:-240}"
LIMIT_SPEED="${LIMIT_SPEED:-480}"

if [ "$DEVICE" != "cuda" ] && [ "$DEVICE" != "cpu" ]; then
    echo "gpu_check: DEVICE must be cuda or cpu, got '$DEVICE'" >&2
    exit 2
fi
if ! "$PYTHON" -c "import ifad_fast" 2>/dev/null; then
    echo "gpu_check: '$PYTHON' cannot import ifad_fast; install it (pip install -e '.[dev]') or set PYTHON" >&2
    exit 2
fi
if [ "$DEVICE" = "cuda" ] && ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA GPU here; run it on a GPU machine (or DEVICE=cpu QUICK=1 for a dry run)" >&2
    exit 2
fi
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT" || exit 2
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
failed=0

# run NAME LIMIT REPORT COMMAND...: COMMAND under `timeout LIMIT`, output to REPORT, status to the summary
run() {
    local name="$1" limit="$2" report="$3"
    shift 3
    local t0=$SECONDS
    echo "== $name (limit ${limit} s) -> $report"
    timeout --kill-after=15 "$limit" "$@" > "$report" 2>&1
    local rc=$?
    local note=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        note=" (timed out)"
    elif [ "$rc" -eq 5 ] && [ "$DEVICE" = "cpu" ]; then
        note=" (no tests ran: the GPU suite skips itself without CUDA)"
        rc=0
    fi
    echo "$name: exit $rc$note, $((SECONDS - t0)) s" | tee -a "$SUMMARY"
    [ "$rc" -eq 0 ] || failed=1
    tail -n 5 "$report"
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PYTHON" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA runtime {torch.version.cuda}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as exc:
    print(f"triton not importable: {exc}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, cc {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
from ifad_fast.backends.triton import triton_unavailable_reason
print("triton backend:", triton_unavailable_reason("cuda" if torch.cuda.is_available() else "cpu") or "usable")
EOF
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

if [ -f bench/test_bench_gpu.py ] && [ -d tests ]; then
    run "GPU suite (bench/test_bench_gpu.py)" "$LIMIT_SUITE" "$OUT_DIR/gpu_suite.txt" \
        "$PYTHON" -m pytest -q -rA -p no:cacheprovider bench/test_bench_gpu.py \
        --benchmark-json "$OUT_DIR/gpu_suite.json" --benchmark-min-rounds 3 --benchmark-max-time 0.5
    # the CUDA-only tests (device pipeline, CUDA graphs, tf32) and their CPU counterparts
    run "CUDA tests (tests/)" "$LIMIT_TESTS" "$OUT_DIR/cuda_tests.txt" \
        "$PYTHON" -m pytest -q -rA -p no:cacheprovider tests/test_device_pipeline.py tests/test_backends.py \
        tests/test_restorer.py
else
    echo "no source checkout at $ROOT (bench/, tests/): the pytest parts are skipped" | tee -a "$SUMMARY"
fi

quick=()
[ "${QUICK:-0}" = "1" ] && quick=(--quick)
run "bench speed --device $DEVICE ${quick[*]}" "$LIMIT_SPEED" "$OUT_DIR/speed.txt" \
    "$PYTHON" -m ifad_fast.cli bench speed --device "$DEVICE" -o "$OUT_DIR/speed" ${quick[@]+"${quick[@]}"}

echo "reports in $OUT_DIR"
exit "$failed"
