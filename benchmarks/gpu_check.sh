#!/usr/bin/env bash
# The GPU checks of issue 14 in one go, on a machine with CUDA (repository root, fl-sim installed):
# the CUDA-marked tests of tests/test_device.py, then benchmarks/bench_gpu.py (its last line is one JSON object).
# About 5-8 minutes on a 16-core machine with one GPU. PY=/path/to/python to choose the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE FLWR_TELEMETRY_ENABLED=0
"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('CUDA:', torch.cuda.get_device_name(0) if ok else 'none'); sys.exit(0 if ok else 1)" || exit 1
timeout 300 "$PY" -m pytest -q -rs tests/test_device.py -k "cuda"
tests=$?
timeout 540 "$PY" benchmarks/bench_gpu.py --rounds "${ROUNDS:-8}" --ig-iterations "${IG_ITERATIONS:-300}"
bench=$?
echo "gpu_check: tests exit $tests, bench exit $bench"
exit $(( tests != 0 || bench != 0 ))
