#!/usr/bin/env bash
# The prepared GPU run, for a GPU machine with torch installed (no pip needed there).
# Here first: python benchmarks/prepare_device.py (copies what it needs into .device/);
# then, on the GPU machine, from the checkout with .device/: bash benchmarks/device.sh
# Results go to $OUT (default benchmarks/results/device): gpu.json (saved after every stage,
# so a run cut short keeps what it did), gpu.log, distill.json/log. On the GPU the two parts
# have their own time limits (200 s, 75 s; an H200 took 55 s and 60 s; COMPILE=1 adds about
# 60 s, DISTILL=0 skips the second).
# QUICK=1 runs the same steps at test sizes on the CPU, without time limits (how the tests
# keep it working).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/device}
GOLDEN=${GOLDEN:-.device/golden}
mkdir -p "$OUT"
export PYTHONPATH=src:batch PYTHONUNBUFFERED=1
# the original code that prepare_device.py copied beside the golden folder (when it did;
# else benchmarks/original.py looks in .original)
ORIGINAL="$(dirname "$GOLDEN")/original"
[ -d "$ORIGINAL" ] && export MOBILESAM_ORIGINAL=${MOBILESAM_ORIGINAL:-$ORIGINAL}
PY=${PYTHON:-python3}
if [ "${QUICK:-0}" = 1 ]; then
    gpu_args=(--quick --device cpu --precisions bf16)
    distill_args=(--device cpu --steps 1 --batch-size 1 --image-size 128)
    gpu_limit=0 distill_limit=0  # no limit: the tests must not depend on the machine's load
else
    # the torch.compile study (--compile: 60 s) ran once, 2026-11-28 (docs/speed.md); COMPILE=1 again
    gpu_args=()
    [ "${COMPILE:-0}" = 1 ] && gpu_args=(--compile)
    distill_args=(--teacher vit_h --device cuda)
    gpu_limit=200 distill_limit=75
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout "$gpu_limit" "$PY" benchmarks/gpu.py --golden "$GOLDEN" --out "$OUT" "${gpu_args[@]}" \
    2>&1 | tee "$OUT/gpu.log"
gpu=${PIPESTATUS[0]}
[ "${DISTILL:-1}" = 0 ] && { echo "gpu.py exit $gpu (DISTILL=0)"; exit "$gpu"; }
timeout "$distill_limit" "$PY" benchmarks/bench_distill.py "${distill_args[@]}" \
    --json "$OUT/distill.json" 2>&1 | tee "$OUT/distill.log"
distill=${PIPESTATUS[0]}
echo "gpu.py exit $gpu, bench_distill.py exit $distill"
[ "$gpu" = 0 ] && [ "$distill" = 0 ]
