#!/usr/bin/env bash
# Channels-last for the probes on a lent GPU machine (the `device` tool; see docs/gpu.md), as one bounded script:
#   1. benchmarks/scan_speed.py at $SIZE px, ResNet18 x$WIDTH, per-step costs in each layout (probes included);
#   2. whole `default`-profile scans of one untrained model, D_be = $NBENIGN synthetic images, in each layout
#      (a warm-up scan first), with the time of each phase.
# Output: $OUT (default .bench/device): run.log, speed-<layout>.json, scans.json.
# Dry run on a CPU box: DEV=cpu SIZE=32 WIDTH=0.25 NBENIGN=40 STEPS=2
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-.bench/device}
BUDGET=${BUDGET:-200}
PY=${PY:-python3}
DEV=${DEV:-cuda} SIZE=${SIZE:-224} WIDTH=${WIDTH:-1.0} NBENIGN=${NBENIGN:-400} STEPS=${STEPS:-10}
. benchmarks/device_common.sh

for fmt in contiguous channels_last; do
  say "per-step cost at $SIZE px, ResNet18 x$WIDTH, $fmt"
  timeout 60 $PY benchmarks/scan_speed.py --device "$DEV" --size "$SIZE" --width "$WIDTH" --steps "$STEPS" \
    --memory-format $fmt > "$OUT/speed-$fmt.json" || say "scan_speed ($fmt) cut or failed (rc $?)"
  cat "$OUT/speed-$fmt.json"
done
say "whole default scans, both layouts"
timeout $(( $(left) - 5 )) $PY - "$DEV" "$SIZE" "$WIDTH" "$NBENIGN" "$OUT/scans.json" <<'PYEOF'
import json, sys, time
import torch
from drmguard_engine.data.benign import BenignSet
from drmguard_engine.data.synthetic import make_dataset
from drmguard_engine.models import build_model
from drmguard_engine.scan import get_profile, scan
dev, size, width, n, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
x, _ = make_dataset("gaze", n, size=size, seed=7)
benign = BenignSet(torch.from_numpy(x).float() / 255.0, None)
model = build_model("resnet18", "gaze", input_size=size, width=width, seed=0).eval()
rows = []
for fmt in ("warm-up", "contiguous", "channels_last", "contiguous", "channels_last"):
    layout = "auto" if fmt == "warm-up" else fmt
    cfg = get_profile("fast" if fmt == "warm-up" else "default", "gaze", memory_format=layout,
                      probe_memory_format=layout)
    t0 = time.perf_counter()
    r = scan(model, benign, "gaze", cfg, device=dev)
    row = {"layout": fmt, "seconds": round(time.perf_counter() - t0, 2), "timings": r.timings,
           "verdict": r.verdict, "score": r.score}
    rows.append(row)
    print(json.dumps(row), flush=True)
json.dump(rows, open(out, "w"), indent=1)
PYEOF
say "end"
