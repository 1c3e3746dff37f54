#!/usr/bin/env bash
# The prepared GPU run, for a lent device machine (torch is installed there; no pip).
# Here first: python benchmarks/prepare_device.py; then the device tool's run with
# command "bash benchmarks/device.sh", carry [".device"], timeout_s 300.
# Results go to $OUT (the device tool's folder; benchmarks/results/device elsewhere):
# gpu.json (saved after every stage, so a run cut short keeps what it did), gpu.log,
# distill.json/log. The two parts have their own time limits (200 s, 75 s) inside the 300 s
# (an H200 took 55 s and 60 s; COMPILE=1 adds about 60 s, DISTILL=0 skips the second).
# QUICK=1 runs the same steps at test sizes on the CPU (how the tests keep it working).
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
else
    # the torch.compile study (--compile: 60 s) ran once, 2026-11-28 (README); COMPILE=1 again
    gpu_args=()
    [ "${COMPILE:-0}" = 1 ] && gpu_args=(--compile)
    distill_args=(--teacher vit_h --device cuda)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout 200 "$PY" benchmarks/gpu.py --golden "$GOLDEN" --out "$OUT" "${gpu_args[@]}" 2>&1 \
    | tee "$OUT/gpu.log"
gpu=${PIPESTATUS[0]}
[ "${DISTILL:-1}" = 0 ] && { echo "gpu.py exit $gpu (DISTILL=0)"; exit "$gpu"; }
timeout 75 "$PY" benchmarks/bench_distill.py "${distill_args[@]}" --json "$OUT/distill.json" 2>&1 \
    | tee "$OUT/distill.log"
distill=${PIPESTATUS[0]}
echo "gpu.py exit $gpu, bench_distill.py exit $distill"
[ "$gpu" = 0 ] && [ "$distill" = 0 ]
