#!/usr/bin/env bash
# The clean-error check of a mitigation, one hold-out split against 5-fold cross-validation, on a 64 px zoo trained
# on a lent GPU machine (the `device` tool; see docs/gpu.md), as one bounded script:
#
#   1. benchmarks/zoo.py --device cuda: one backdoored model per entry of MODELS (task/attack@seed; default: every
#      attack in ATTACKS for every task in TASKS, at SEED), each in its own zoo folder and process;
#   2. one process per model, MODE=cost: benchmarks/clean_cost.py (the default scan, then the hold-out rise, the
#      cross-validated rise and the final model's rise on 2,000 test images; docs/scan.md), or MODE=service:
#      benchmarks/service_path.py (the service's own worker, with the new cross-validated check, then the served
#      model's AE / DAE / RE with the real trigger).
#
# Output: $OUT (default .bench/device): run.log, $MODE.jsonl (a line per model), logs.tgz (logs, each meta.json).
# Whole run bounded by BUDGET seconds (default 540); training stops at ZOO_SHARE percent of it.
# Dry run on a CPU box: DEV=cpu ZOO_ARGS="--steps 30 --n-train 300 --n-test 60" COST_ARGS="--profile fast
#   --mitigate-steps 5 --n-test 60" MODELS=gaze/badnets@300
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-.bench/device}
BUDGET=${BUDGET:-540}
PY=${PY:-python3}
DEV=${DEV:-cuda}
MODE=${MODE:-cost}
ZOO_ARGS=${ZOO_ARGS:-}
COST_ARGS=${COST_ARGS:-}
ZOO_SHARE=${ZOO_SHARE:-45}
SEED=${SEED:-300}
if [ -z "${MODELS:-}" ]; then
  MODELS=""
  for task in ${TASKS:-gaze headpose}; do
    for kind in ${ATTACKS:-badnets badnets_small clean_label input_aware adaptive wanet blend wanet_multi}; do
      MODELS="$MODELS $task/$kind@$SEED"
    done
  done
fi
W=${W:-/tmp/zcost}
export OMP_NUM_THREADS=1
. benchmarks/device_common.sh
mkdir -p "$W/logs"

say "training:$MODELS, on $DEV, one process each"
pids=()
for m in $MODELS; do
  task=${m%%/*}; rest=${m#*/}; kind=${rest%@*}; seed=${rest#*@}; tag="$task-$kind-s$seed"
  $PY benchmarks/zoo.py --tasks "$task" --benign-count 0 --attacks "$kind" --seed "$seed" --device "$DEV" \
    --threads 1 --out "$W/zoo/$tag" $ZOO_ARGS > "$W/logs/zoo-$tag.log" 2>&1 & pids+=($!)
done
# (the pids, not `jobs`: the log's tee is a job too)
stop_at=$((BUDGET * ZOO_SHARE / 100))
while :; do
  alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  if [ $(( $(date +%s) - T0 )) -ge $stop_at ]; then say "training cut at ${stop_at}s"; kill "${pids[@]}"; break; fi
  sleep 5
done
say "built: $(find "$W/zoo" -name meta.json | wc -l) models"
tail -q -n 1 "$W"/logs/zoo-*.log

say "$MODE: one process per model"
pids=()
for z in "$W"/zoo/*; do
  [ -n "$(find "$z" -name meta.json)" ] || continue
  tag=$(basename "$z")
  if [ "$MODE" = service ]; then
    cmd="$PY benchmarks/service_path.py --zoo $z --out $W/sp/$tag --device $DEV"
  else
    cmd="$PY benchmarks/clean_cost.py --zoo $z --device $DEV --threads 1 --out $W/res-$tag.jsonl $COST_ARGS"
  fi
  ( timeout $(( $(left) - 15 )) $cmd > "$W/logs/$MODE-$tag.log" 2>&1 ) & pids+=($!)
done
wait "${pids[@]}"
say "done"
if [ "$MODE" = service ]; then
  cat "$W"/logs/service-*.log | grep '^{' > "$OUT/service.jsonl"
else
  cat "$W"/res-*.jsonl > "$OUT/cost.jsonl" 2>/dev/null
fi
cat "$OUT/$MODE.jsonl"
for f in "$W"/logs/$MODE-*.log; do grep -q "Error\|Traceback" "$f" && { echo "== $f"; tail -n 5 "$f"; }; done
tar czf "$OUT/logs.tgz" -C "$W" logs $(cd "$W" && find zoo -name meta.json) 2>/dev/null
say "end"
