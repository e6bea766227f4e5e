#!/usr/bin/env bash
# Every GPU check in one run (device time is scarce): the default synthetic
# experiment with the vmap strategy, round throughput of the paper's
# ResNet-50 at 256x128 under each strategy, then the paper round in bf16 and
# f32 against a plain ResNet-50 step (gpu_round.py). Writes logs under $OUT.
# Needs the cp312 wheels of ml_collections and tensorboardX in .whl/ (README).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
timeout "${DEMO_TIMEOUT:-200}" python3 -m fedreid_jax.main --config configs/synthetic.py \
  --workdir /tmp/demo --config.data.root=/tmp/data --config.fed.strategy=vmap \
  --config.fed.chunk_steps=8 > "$OUT/demo_gpu.log" 2>&1
echo "demo rc=$? wall=$(( $(date +%s) - start ))s" | tee -a "$OUT/gpu.txt"
tail -n 25 "$OUT/demo_gpu.log"
cp /tmp/demo/results.md "$OUT/demo_results.md" 2>/dev/null
start=$(date +%s)
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/round_throughput.py --paper \
  --strategies "${STRATEGIES:-vmap:16,serial:16}" --rounds 2 2>&1 \
  | grep -v "it/s\|s/it" | tee "$OUT/throughput_paper.txt"
echo "bench wall=$(( $(date +%s) - start ))s" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
timeout "${ROUND_TIMEOUT:-600}" python3 benchmarks/gpu_round.py --dtypes bfloat16,float32 2>&1 \
  | grep -v "it/s\|s/it" | tee "$OUT/gpu_round.txt"
echo "gpu_round wall=$(( $(date +%s) - start ))s" | tee -a "$OUT/gpu.txt"
