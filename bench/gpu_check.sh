#!/usr/bin/env bash
# The day a GPU is lent: the test suite on the real GPU (no simulator), then
# the GPU benchmarks, with their results in bench/results/gpu-*. Run from
# anywhere, in an environment where `pip install -e ".[test]"` was done:
#
#     bash bench/gpu_check.sh            # tests, then benchmarks
#     bash bench/gpu_check.sh --bench    # benchmarks only
#
# Budget: under 8 minutes on an H100/H200-class machine (the CPU kernels
# come from the warmup's cache; most of the time is NVVM compiling each GPU
# kernel on its first launch).
set -euo pipefail
cd "$(dirname "$0")/.."
export NUMBA_ENABLE_CUDASIM=0
results=bench/results
mkdir -p "$results"

python - <<'PY'
import sys
from numba import cuda
if not cuda.is_available():
    sys.exit("bench/gpu_check.sh: no CUDA GPU found (this check needs a real one)")
device = cuda.get_current_device()
print(f"GPU: {device.name.decode() if isinstance(device.name, bytes) else device.name}, "
      f"compute capability {device.compute_capability}")
PY

start=$(date +%s)
python -m softkern warmup
tests=0
if [[ "${1:-}" != "--bench" ]]; then
    # Every test, its GPU kernels on the GPU; the PTX tests compile without
    # a GPU and run in CI already. A failure still lets the benchmarks run
    # (device time is scarce); the script exits with the tests' status.
    python -m pytest tests -m "not ptx" -q -p no:cacheprovider --durations=15 \
        > "$results/gpu-tests.txt" 2>&1 || tests=$?
    tail -n 25 "$results/gpu-tests.txt"
fi
python -m pytest bench/bench_reduce.py bench/bench_gpu.py -k gpu --benchmark-only \
    --benchmark-json="$results/gpu.json" -q -p no:cacheprovider
python bench/table.py "$results/gpu.json" --device gpu > "$results/gpu.md"
echo "bench/gpu_check.sh: done in $(( $(date +%s) - start )) s; $results/gpu.md:"
cat "$results/gpu.md"
exit "$tests"
