#!/usr/bin/env bash
# The `paper` profile at 224x224 on a lent GPU machine (the `device` tool; see docs/gpu.md), as one bounded script:
#
#   1. benchmarks/scan_speed.py --size 224 --width 1.0: the per-step cost of each profile on a full-width ResNet18,
#      in the default layout and in channels-last (the scan's CUDA layout since this script was written);
#   2. a whole `paper`-profile scan, end to end, of each model under $MODELS (224 px zoo models carried in with
#      the `carry` argument), with the engine's command line on CUDA, one after the other while time is left.
#
# Output: $OUT (default .bench/device): run.log, speed-*.json and paper224-<name>.json/.log.
# Whole run bounded by BUDGET seconds (default 560).
# Dry run on a CPU box: DEV=cpu SIZE=32 WIDTH=0.25 NBENIGN=40 SCAN_SET="--set pretrain_steps=5 --set steps=5"
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-.bench/device}
BUDGET=${BUDGET:-560}
PY=${PY:-python3}
DEV=${DEV:-cuda} SIZE=${SIZE:-224} WIDTH=${WIDTH:-1.0} NBENIGN=${NBENIGN:-400}
MODELS=${MODELS:-.gz224/gaze}  # <attack>/<model>/{model.onnx,meta.json}, scanned in the order $ORDER
SCAN_SET=${SCAN_SET:-}
. benchmarks/device_common.sh

for fmt in contiguous channels_last; do
  say "per-step cost at $SIZE px, ResNet18 x$WIDTH, $fmt"
  timeout 90 $PY benchmarks/scan_speed.py --device "$DEV" --size "$SIZE" --width "$WIDTH" --steps 10 \
    --memory-format $fmt > "$OUT/speed-$fmt.json" || say "scan_speed ($fmt) cut or failed (rc $?)"
  cat "$OUT/speed-$fmt.json"
done

say "benign set: $NBENIGN synthetic gaze images at $SIZE px"
$PY -m drmguard_engine make-data --task gaze --n "$NBENIGN" --size "$SIZE" --seed 7 --out "$OUT/be.npz" >/dev/null

for name in ${ORDER:-badnets benign sig blend}; do
  meta=$(ls "$MODELS/$name"/*/meta.json 2>/dev/null | head -1)
  [ -n "$meta" ] || { say "no $name model under $MODELS"; continue; }
  d=$(dirname "$meta")
  if [ "$(left)" -lt 60 ]; then say "no time left for $name"; continue; fi
  say "paper profile on $name ($d), at most $(( $(left) - 10 ))s"
  timeout "$(( $(left) - 10 ))" $PY -m drmguard_engine scan --model "$d/model.onnx" --benign "$OUT/be.npz" \
    --task gaze --profile paper --device "$DEV" $SCAN_SET --report "$OUT/paper224-$name.json" \
    > "$OUT/paper224-$name.log" 2>&1 || say "scan of $name cut or failed (rc $?)"
  tail -c 600 "$OUT/paper224-$name.log" | tr '\r' '\n' | tail -3
done
rm -f "$OUT/be.npz"
say "done"
