#!/usr/bin/env bash
# Every GPU check (device time is scarce), in parts that each fit one device
# call of at most 10 minutes; PARTS picks them (default: all, ~20 minutes):
#   demo        the default synthetic experiment with the vmap strategy (~3 min)
#   throughput  round throughput of the paper's ResNet-50 at 256x128 per strategy (~5 min)
#   round       the paper round in bf16 and f32 against a plain ResNet-50 step (~10 min)
#   eval        streamed evaluation at MSMT17 size, 11,659 x 82,161 images (~5 min)
# e.g. PARTS="demo throughput" bash benchmarks/gpu_check.sh, then PARTS=round, then PARTS=eval.
# Writes logs under $OUT. Needs the cp312 wheels of ml_collections and
# tensorboardX in .whl/ (carried; see the device README for `pip download`).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
PARTS=${PARTS:-demo throughput round eval}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

timed() {  # name timeout command...: runs it, logs rc and wall time to gpu.txt
  local name=$1 limit=$2 start; shift 2
  start=$(date +%s)
  timeout "$limit" "$@" 2>&1 | grep -v "it/s\|s/it" | tee "$OUT/$name.txt"
  echo "$name rc=${PIPESTATUS[0]} wall=$(( $(date +%s) - start ))s" | tee -a "$OUT/gpu.txt"
}

for part in $PARTS; do
  case $part in
    demo)
      timed demo_gpu "${DEMO_TIMEOUT:-200}" python3 -m fedreid_jax.main \
        --config configs/synthetic.py --workdir /tmp/demo --config.data.root=/tmp/data \
        --config.fed.strategy=vmap --config.fed.chunk_steps=8
      cp /tmp/demo/results.md "$OUT/demo_results.md" 2>/dev/null ;;
    throughput)
      timed throughput_paper "${BENCH_TIMEOUT:-300}" python3 benchmarks/round_throughput.py \
        --paper --strategies "${STRATEGIES:-vmap:16,serial:16}" --rounds 2 ;;
    round)
      timed gpu_round "${ROUND_TIMEOUT:-540}" python3 benchmarks/gpu_round.py \
        --dtypes bfloat16,float32 ;;
    eval)
      timed streamed_eval_paper "${EVAL_TIMEOUT:-300}" python3 benchmarks/streamed_eval.py \
        --paper ;;
    *) echo "unknown part $part (demo, throughput, round, eval)"; exit 2 ;;
  esac
done
