#!/bin/bash
# One demo LDM variant, scored as in BENCHMARKS.md ("How the demo recipe was
# chosen"): trains the demo LDM with the given overrides on an existing first
# stage, then prints the mask mIoU over 64 masks (seeds 0 and 1) and over the
# default 16 masks.
#
#   benchmarks/demo_variant.sh FIRST_STAGE_DIR WORKDIR [--config.x.y=v ...]
#   e.g. benchmarks/demo_variant.sh workdirs/demo/first_stage workdirs/b32 \
#          --config.train.batch_size=32 --config.train.steps=450
# Several can run at once on one GPU (XLA_PYTHON_CLIENT_PREALLOCATE=false).
set -euo pipefail
fs=$1 wd=$2; shift 2
py=${PYTHON:-python}
$py train.py --config configs/seg_f4.py:demo --workdir "$wd" \
  --config.first_stage.checkpoint="$(realpath "$fs")" "$@" > "$wd.train.log" 2>&1
score() { $py sample.py --workdir "$wd" "$@" 2>/dev/null | tail -1 |
          $py -c "import json,sys; print(round(json.load(sys.stdin)['mask_miou'], 3))"; }
echo "$wd: $(score --num_masks 64 --seed 0 --out "$wd/s0") /" \
     "$(score --num_masks 64 --seed 1 --out "$wd/s1") / $(score --out "$wd/d")"
