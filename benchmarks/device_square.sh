#!/usr/bin/env bash
# The square search (in the `default` profile since 2026-11-27) and bfloat16 probes on a lent GPU machine (the
# `device` tool; see docs/gpu.md), as one bounded script:
#   1. the `gpu` tests (tests/engine/test_gpu.py: the square search and a default scan on CUDA against the CPU,
#      float32 and bfloat16 probes);
#   2. whole `default` scans at $SIZE px of one untrained ResNet18 x$WIDTH ($NBENIGN synthetic images), after a
#      warm-up: float32, float32 without the square search, bfloat16 probes, then float32 and bfloat16 again;
#   3. 64 px parity: the `default` profile on CUDA, float32 and bfloat16 probes, on the carried models
#      ($CARRY/*.onnx with the benign set $CARRY/be.npz; compare with the CPU reports in docs/results/screen/).
# Output: $OUT (default .bench/device): run.log, pytest.log, scans224.jsonl, cuda64-*.json.
# PARTS (default "tests 224 parity") picks the parts; MODELS (default all) the carried models of part 3.
# Dry run on a CPU box: DEV=cpu SIZE=32 WIDTH=0.25 NBENIGN=40 CARRY=/nonexistent
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-.bench/device}
BUDGET=${BUDGET:-420}
PY=${PY:-python3}
CARRY=${CARRY:-.gpucarry}
DEV=${DEV:-cuda} SIZE=${SIZE:-224} WIDTH=${WIDTH:-1.0} NBENIGN=${NBENIGN:-400}
. benchmarks/device_common.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

PARTS=${PARTS:-tests 224 parity}
part() { [[ " $PARTS " == *" $1 "* ]]; }

if part tests; then
  say "gpu tests"
  timeout 150 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/engine/test_gpu.py \
    tests/engine/test_patch_grid.py > "$OUT/pytest.log" 2>&1
  say "pytest rc $?"; tail -5 "$OUT/pytest.log"
fi

if part 224; then
say "whole default scans at $SIZE px, ResNet18 x$WIDTH"
timeout $(( $(left) > 220 ? 200 : $(left) / 2 )) \
  $PY - "$DEV" "$SIZE" "$WIDTH" "$NBENIGN" "$OUT/scans224.jsonl" <<'PYEOF'
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
runs = [("warm-up", "fast", {}), ("float32", "default", {}),
        ("float32, no square search", "default", {"probe_patch_grid": False}),
        ("bfloat16", "default", {"probe_precision": "bfloat16"}), ("float32", "default", {}),
        ("bfloat16", "default", {"probe_precision": "bfloat16"})]
with open(out, "w") as f:
    for label, profile, over in runs:
        cfg = get_profile(profile, "gaze", **over)
        t0 = time.perf_counter()
        r = scan(model, benign, "gaze", cfg, device=dev)
        row = {"run": label, "seconds": round(time.perf_counter() - t0, 2),
               "timings": {k: round(v, 2) for k, v in r.timings.items()}, "verdict": r.verdict,
               "score": round(r.score, 4), "decision": r.decision}
        print(json.dumps(row), flush=True)
        f.write(json.dumps(row) + "\n")
PYEOF
say "224 rc $?"
fi

say "64 px parity on the carried models"
for m in "$CARRY"/*.onnx; do
  [ -f "$m" ] && part parity || continue
  b=$(basename "$m" .onnx)
  [ -z "${MODELS:-}" ] || [[ " $MODELS " == *" $b "* ]] || continue
  for prec in float32 bfloat16; do
    [ "$(left)" -gt 20 ] || { say "out of time before $b $prec"; break 2; }
    timeout "$(( $(left) - 10 ))" $PY -m drmguard_engine scan --model "$m" --benign "$CARRY/be.npz" --task gaze \
      --device "$DEV" --set probe_precision=$prec --report "$OUT/cuda64-$b-$prec.json" --quiet > /dev/null \
      || say "scan of $b ($prec) failed (rc $?)"
    $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], r['verdict'], 'score',
round(r['score'], 4), '|', r['decision'], '| s', round(r['seconds'], 1))" "$OUT/cuda64-$b-$prec.json" "$b $prec" \
      2>/dev/null
  done
done
say "end"
