#!/usr/bin/env bash
# The GPU checks, as one bounded script for a lent GPU machine (the `device` tool; see docs/gpu.md).
#
#   1. environment: GPU, torch, onnxruntime and its providers;
#   2. CPU/CUDA parity at 64 px: the default-profile scan of carried zoo models on CUDA (compare the reports
#      with CPU scans of the same files and benign set);
#   3. the service on the GPU: drmguard-server --device cuda vets a carried BadNets model (scan, mitigation,
#      re-scan on CUDA), serves it through ONNX Runtime with the default providers (TensorRT -> CUDA -> CPU)
#      and reports the provider in use; then benchmarks/predict.py with the server and the bare session on CUDA;
#   4. a 224x224 ResNet18 (width 1.0) BadNets gaze model trained on CUDA, per-step scan cost of the `paper`
#      and `default` profiles at 224 px (cuDNN autotuning off and on), then a whole scan at 224 px:
#      the `paper` profile if its estimate fits the time left, else the `default` profile.
#
# Inputs (CARRY, default .gpucarry): whl/*.whl (grpcio, protobuf ... of this project's pins, installed to
# /tmp/site), zoo/*.onnx (gaze 64 px models), benign64.npz; an onnxruntime-gpu wheel assembled from
# /tmp/ortchunks/part.* + $CARRY/ort/part.* when its sha256 ($CARRY/ort/sha256) matches.
# Output: $OUT (default .bench/device): run.log and results.tgz. Whole run bounded by BUDGET seconds (default 470).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-.bench/device}
CARRY=${CARRY:-.gpucarry}
BUDGET=${BUDGET:-470}
PY=${PY:-python3}
W=/tmp/dc
mkdir -p "$OUT" "$W/res"
exec > >(tee -a "$OUT/run.log") 2>&1
T0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - T0))); }
say() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
cap() { local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo $((l > 5 ? l - 5 : 1)); }
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Knobs for a dry run on a CPU box: DEV=cpu SIZE=32 N=200 TSTEPS=5 WIDTH=0.25 PPROFILE=fast.
DEV=${DEV:-cuda} SIZE=${SIZE:-224} N=${N:-2500} TSTEPS=${TSTEPS:-1200} WIDTH=${WIDTH:-1.0} PPROFILE=${PPROFILE:-default}

say "packages"
if compgen -G "$CARRY/whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
if [ -f "$CARRY/ort/sha256" ]; then
  cat /tmp/ortchunks/part.* "$CARRY"/ort/part.* > "$W/ort.whl" 2>/dev/null
  if [ "$(sha256sum "$W/ort.whl" | cut -d' ' -f1)" = "$(cat "$CARRY/ort/sha256")" ]; then
    cp "$W/ort.whl" "$W/$(cat "$CARRY/ort/name")"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-ort "$W/$(cat "$CARRY/ort/name")" \
      && export PYTHONPATH=/tmp/site-ort:${PYTHONPATH:-}
  else
    say "onnxruntime-gpu chunks incomplete or corrupt: serving stays on the image's onnxruntime"
  fi
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/clients
nvidia-smi -L
$PY - <<'EOF'
import grpc, google.protobuf, numpy, onnx, onnxruntime as ort, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
print("grpc", grpc.__version__, "protobuf", google.protobuf.__version__, "numpy", numpy.__version__, "onnx", onnx.__version__)
EOF
ENG="$PY -m drmguard_engine"
# ONLY="service predict" runs a subset of: train224 parity service mitigate predict speed scan224.
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }

say "data and a 224 px BadNets ResNet18 (background, CPU then CUDA)"
want train224 && (
  $ENG make-data --task gaze --n $N --size $SIZE --seed 3 --out "$W/d224.npz" --split --quiet \
  && $ENG train --task gaze --data "$W/d224.train.npz" --test-data "$W/d224.test.npz" --arch resnet18 --width $WIDTH \
       --steps $TSTEPS --batch-size 64 --device $DEV --attack badnets --out "$W/bd224.onnx" --json --quiet \
       > "$W/res/train224.json"
) > "$W/train224.log" 2>&1 &
TRAIN=$!
want train224 || TRAIN=

say "CPU/CUDA parity at 64 px: default profile on CUDA"
want parity && for m in "$CARRY"/zoo/*.onnx; do
  b=$(basename "$m" .onnx)
  s=$(date +%s.%N)
  timeout "$(cap 90)" $ENG scan --model "$m" --benign "$CARRY/benign64.npz" --task gaze --device $DEV \
    --profile $PPROFILE --report "$W/res/cuda64-$b.json" --json --quiet > /dev/null || say "scan of $b failed (rc $?)"
  $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], r['verdict'], 'score', r['score'], 'ratio', r['perturbation_ratio'], 'seconds', r['seconds'])" \
    "$W/res/cuda64-$b.json" "$b" 2>/dev/null
done

bd=$(ls "$CARRY"/zoo/*badnets*.onnx | head -1)
if want service; then
say "the service on the GPU"
SRV=($PY -c 'import sys; from guard_server.cli import main; sys.exit(main())')
CLI="$PY -c 'import sys; from guard_client.cli import main; sys.exit(main())'"
"${SRV[@]}" --listen 127.0.0.1:50151 --metrics-port 9109 --data-dir $W/gd --device $DEV --log-level INFO > "$W/server.log" 2>&1 &
SPID=$!
for i in $(seq 60); do eval "$CLI --server 127.0.0.1:50151 health" >/dev/null 2>&1 && break; sleep 1; done
s=$(date +%s)
timeout "$(cap 150)" bash -c "$CLI --server 127.0.0.1:50151 vet --model $bd --benign $CARRY/benign64.npz --name gaze-bd --version 1 --task gaze --profile $PPROFILE --wait --json --quiet" \
  > "$W/res/vet-gpu.json" || say "vet failed (rc $?)"
say "vet took $(( $(date +%s) - s )) s"; cat "$W/res/vet-gpu.json"; echo
$PY -c "import numpy as np; d=np.load('$CARRY/benign64.npz'); np.savez('$W/x.npz', images=d['images'][:8])"
eval "$CLI --server 127.0.0.1:50151 predict --name gaze-bd --input $W/x.npz --json" > "$W/res/predict-gpu.json" || say "predict failed"
head -c 600 "$W/res/predict-gpu.json"; echo
$PY -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9109/metrics').read().decode())" > "$W/res/metrics.txt"
grep -E "^drmguard_(inference_execution_provider_info|served_model_info|scans_total|scan_duration_seconds_sum|mitigation_duration_seconds_sum)" "$W/res/metrics.txt"
kill -TERM $SPID; wait $SPID
grep -iE "provider|runs on|warn|error" "$W/server.log" | head -20
cp "$W/server.log" "$W/res/"
fi

if want mitigate; then
  say "drmguard-engine mitigate on $DEV"
  timeout "$(cap 120)" $ENG mitigate --model "$bd" --benign "$CARRY/benign64.npz" --task gaze --device $DEV \
    --profile $PPROFILE --out "$W/bd-mitigated.onnx" --report "$W/res/mitigate-$DEV.json" --json --quiet \
    > "$W/res/mitigate-$DEV.stdout.json" || say "mitigate failed (rc $?)"
  head -c 1500 "$W/res/mitigate-$DEV.stdout.json"; echo
fi

say "Predict vs bare ORT on CUDA (benchmarks/predict.py)"
for dt in ${PREDICT_DTYPES:-uint8 float32}; do
  want predict || break
  timeout "$(cap 100)" $PY benchmarks/predict.py --train-steps 20 --seconds 3 --skip-scan --input-dtype $dt \
    --bare-providers CUDAExecutionProvider,CPUExecutionProvider --device $DEV \
    --json "$W/res/predict-bench-cuda-$dt.json" 2>&1 | grep -v "^  batch\|^\[" || say "predict benchmark failed or cut"
done

if [ -n "$TRAIN" ]; then wait $TRAIN; say "train224 rc $?"; tail -3 "$W/train224.log"; cat "$W/res/train224.json"; echo; fi

say "per-step scan cost at 224 px on CUDA"
want speed && for flag in "" --cudnn-benchmark; do
  timeout "$(cap 90)" $PY benchmarks/scan_speed.py --width $WIDTH --size $SIZE --steps ${SPEED_STEPS:-10} --device $DEV $flag \
    > "$W/res/speed224${flag:+-bench}.json" 2>/dev/null || say "scan_speed $flag failed or cut"
  cat "$W/res/speed224${flag:+-bench}.json"; echo
done

say "a whole scan at 224 px"
est=$($PY -c "import json; print(int(json.load(open('$W/res/speed224.json'))['paper']['estimated_scan_seconds']))" 2>/dev/null || echo 99999)
profile=default; [ "$est" -lt $(( $(left) - 30 )) ] && profile=paper
say "paper profile estimate ${est}s, $(left)s left: running the $profile profile"
if want scan224 && [ -f "$W/bd224.onnx" ]; then
  timeout "$(cap 400)" $ENG scan --model "$W/bd224.onnx" --benign "$W/d224.benign.npz" --task gaze --device $DEV \
    --profile $profile --report "$W/res/scan224-$profile.json" --json > "$W/res/scan224-$profile.stdout.json" 2> "$W/scan224.log" \
    || say "scan at 224 failed or cut (rc $?)"; tail -c 1500 "$W/scan224.log"; echo
  $PY -c "import json; r=json.load(open('$W/res/scan224-$profile.json')); print({k: r.get(k) for k in ('verdict','score','score_threshold','perturbation_ratio','seconds','device','decision')})" 2>/dev/null
fi
tar czf "$OUT/results.tgz" -C "$W/res" . && say "done; results in $OUT/results.tgz"
