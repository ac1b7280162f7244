#!/usr/bin/env bash
# Every GPU measurement of the accelerator-efficiency issue, in one command,
# within 10 minutes on one GPU (H100 80 GB / H200 141 GB):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default gpu_check_out/
#
# 1. XLA's compiled memory analysis of the reference train step at batch 16
#    bf16, for train.remat none / block / dots_saveable (benchmarks/memory.py)
# 2. the train step at batch 16 bf16 (each remat policy): measured peak
#    device memory, images/s, MFU; beside the PyTorch peer when torch and
#    diffusers are installed (benchmarks/requirements-torch.txt)
# 3. the batch that fills the device (from the memory analysis at batch 16
#    and 32: bytes per image), and images/s and MFU there
# 4. sampling at batch 16 bf16: DPM-Solver++(2M) 25 steps and DDIM 50
#    steps (+ VQ decode), images/s, beside the peer
# 5. a jax.profiler trace of 5 train steps, summarised by op kind
#
# Everything is written to OUT_DIR (*.txt as printed, *.json raw) and the
# summary tables to OUT_DIR/summary.md, ready for BENCHMARKS.md. Each step
# has its own time limit so that one hang cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
# Allocate on demand: the allocator's peak is then what the program needs,
# not a preallocated pool; two workers (JAX, PyTorch) share the device.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PEER=""
if $PY -c "import torch, diffusers; assert torch.cuda.is_available()" 2>/dev/null; then
  PEER="--peer"
fi
START=$(date +%s)
run() {  # run NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)" | tee -a "$OUT/summary.md"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  grep -E '^\||peak memory|MFU|FLOPs|compile s|device ops|^to feed' "$OUT/$name.txt" >> "$OUT/summary.md"
  [ $rc -ne 0 ] && echo "($name: exit $rc, see $OUT/$name.txt)" | tee -a "$OUT/summary.md"
  return 0
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt" >> "$OUT/summary.md"

# 1. Compiled memory (no run): ~40 s of compile per policy.
run memory_b16 150 $PY benchmarks/memory.py --size seg_f4 --batch 16 \
    --dtype bfloat16 --remat none,block,dots_saveable --json "$OUT/memory_b16.json"
run memory_b32 70 $PY benchmarks/memory.py --size seg_f4 --batch 32 \
    --dtype bfloat16 --remat block --json "$OUT/memory_b32.json"

# 2. Batch 16: measured peak, speed, MFU, with and without remat.
run train_b16_none 120 $PY benchmarks/bench.py --size seg_f4 --batch 16 \
    --dtype bfloat16 --workloads train $PEER --repeats 3 --iters 5 \
    --json "$OUT/train_b16_none.json"
run train_b16_block 90 $PY benchmarks/bench.py --size seg_f4 --batch 16 \
    --dtype bfloat16 --workloads train --remat block --repeats 3 --iters 5 \
    --json "$OUT/train_b16_block.json"

# 3. The batch that fills the device: temporaries grow linearly in the
#    batch; keep 10% of the device free, round down to a multiple of 8.
FILL=$($PY - "$OUT" <<'EOF'
import json, subprocess, sys
out = sys.argv[1]
try:
  b16 = json.load(open(f"{out}/memory_b16.json"))["bytes"]["block"]
  b32 = json.load(open(f"{out}/memory_b32.json"))["bytes"]["block"]
  total = int(subprocess.run(
      ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
      capture_output=True, text=True).stdout.split()[0]) * 2**20
  per_image = (b32["peak"] - b16["peak"]) / 16
  fixed = b16["peak"] - 16 * per_image
  print(max(16, int((0.9 * total - fixed) / per_image) // 8 * 8))
except Exception:  # no analysis: a batch that fits 80 GB with remat
  print(128)
EOF
)
echo "batch that fills the device (remat block): $FILL" | tee -a "$OUT/summary.md"
run train_fill 150 $PY benchmarks/bench.py --size seg_f4 --batch "$FILL" \
    --dtype bfloat16 --workloads train --remat block $PEER --repeats 2 \
    --iters 3 --json "$OUT/train_fill.json"

# 4. Sampling throughput at batch 16.
run sampling_b16 120 $PY benchmarks/bench.py --size seg_f4 --batch 16 \
    --dtype bfloat16 --workloads dpmpp,ddim $PEER --repeats 2 \
    --json "$OUT/sampling_b16.json"

# 5. Where the step's time goes.
run profile_b16 75 $PY benchmarks/profile_step.py --size seg_f4 --batch 16 \
    --dtype bfloat16 --steps 5 --out "$OUT/trace" --json "$OUT/profile_b16.json"

echo "done in $(( $(date +%s) - START ))s; summary: $OUT/summary.md"
