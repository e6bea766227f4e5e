#!/usr/bin/env bash
# Every GPU check, in parts; PARTS picks them, in order of what is still
# unmeasured (a lent machine gives a session 15 minutes of device time, the
# start included, and one call at most 10):
#   round       the paper round (ResNet-50, 256x128, bf16, the paper's clients / 4,
#               prepared TFDS JPEGs) decoded once into memory and streamed through the
#               real input pipeline (threads, and worker processes now that one loader
#               serves the run), against a plain ResNet-50 step, and where a traced
#               in-memory round's device time went (busy, idle gaps, per module);
#               stopped at 330 s (issue 11). The first H200 run (RESULTS.md) measured
#               bf16 and f32 at /16: ROUND_ARGS="--dtypes bfloat16,float32
#               --input tfds,memory --rounds 3 --scale 16"
#   eval        streamed evaluation at MSMT17 size, 11,659 x 82,161 images (stopped
#               at 200 s; issues 9 and 11)
#   demo        the default synthetic experiment with the vmap strategy (~3 min)
#   throughput  round throughput of ResNet-50 at 256x128 per strategy, random data (~5 min)
#   flags       the plain bf16 step under other XLA_FLAGS (FLAG_SETS, ';'-separated),
#               one process each, the compilation cache off; compare with round's plain step
# Default PARTS="round flags" (eval met its target on the first H200 run): one
# device call of under 10 minutes. Each part stops at its own limit or where TOTAL (570 s from the start) would be passed,
# whichever comes first; a part with under 30 s left is skipped. E.g.
#   run(command="OUT=$OUT bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Each part's log and rc line are written as it goes, so a part cut off still
# leaves what it printed.
# Writes logs under $OUT. Needs the cp312 wheels in .whl/ (`bash
# benchmarks/gpu_wheels.sh` here, then carry .whl).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
PARTS=${PARTS:-round flags}
ROUND_ARGS=${ROUND_ARGS:---dtypes bfloat16 --input memory,tfds --scale 4 --rounds 2 --loaders 8:0,4:4,8:8 --trace /tmp/round_trace}
TOTAL=${TOTAL:-570}; T0=$(date +%s)
FLAG_SETS=${FLAG_SETS:---xla_gpu_enable_command_buffer=}  # CONCURRENT scheduling: measured, 15% slower
# a round's second input mode compiles the same functions: take them from the cache
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import tensorflow_datasets, grain, array_record, ml_collections, tensorboardX" \
  || { echo "the carried wheels do not import (see above): rerun benchmarks/gpu_wheels.sh"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

timed() {  # name timeout command...: runs it, logs rc and wall time to gpu.txt
  local name=$1 limit=$2 start left; shift 2
  start=$(date +%s); left=$(( TOTAL - (start - T0) ))
  (( left < limit )) && limit=$left
  (( limit < 30 )) && { echo "$name skipped: ${left}s of TOTAL=${TOTAL}s left" | tee -a "$OUT/gpu.txt"; return; }
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v "it/s\|s/it" | tee "$OUT/$name.txt"
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
      # shellcheck disable=SC2086  # ROUND_ARGS is a list of arguments
      timed gpu_round "${ROUND_TIMEOUT:-330}" python3 benchmarks/gpu_round.py $ROUND_ARGS ;;
    eval)
      timed streamed_eval_paper "${EVAL_TIMEOUT:-200}" python3 benchmarks/streamed_eval.py \
        --paper --dtypes bfloat16,float32 --threads 16 ;;
    flags)
      IFS=';' read -ra sets <<< "$FLAG_SETS"
      for i in "${!sets[@]}"; do
        echo "flags$i: XLA_FLAGS=${sets[$i]}" | tee -a "$OUT/gpu.txt"
        XLA_FLAGS="${sets[$i]}" JAX_ENABLE_COMPILATION_CACHE=false timed "flags$i" \
          "${FLAGS_TIMEOUT:-120}" python3 benchmarks/gpu_round.py --plain_only --dtypes bfloat16
      done ;;
    *) echo "unknown part $part (demo, throughput, round, eval, flags)"; exit 2 ;;
  esac
done
