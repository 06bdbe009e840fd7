# Sourced by the benchmarks/device_*.sh scripts (after they set OUT, BUDGET and PY): the run log under $OUT, a
# clock bounded by BUDGET seconds (`left`, `say`), unbuffered Python, and what the machine has.
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
T0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - T0))); }
say() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
nvidia-smi -L 2>/dev/null
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
