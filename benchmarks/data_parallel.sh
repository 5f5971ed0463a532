#!/usr/bin/env bash
# Data-parallel FlatQuant calibration of SmolLM2-135M-Instruct at the paper's budget
# (128 x 2048 tokens, 15 epochs): 1 process vs 2 processes on one host, then the
# largest differences between the two models. Needs 2 GPUs (or runs on CPU, slowly).
#   bash benchmarks/data_parallel.sh [OUT_DIR]
# Extra arguments of the example go in $ARGS (e.g. ARGS="--calib-data ... --test-data ...").
set -euo pipefail
out=${1:-outputs/data-parallel}
mkdir -p "$out"
common="--num-samples 128 --seq-len 2048 --full-eval --format compressed-tensors --skip-fp-eval ${ARGS:-}"
for n in 1 2; do
  python -m torch.distributed.run --nproc_per_node "$n" --master_port $((29500 + n)) \
    examples/flatquant_smollm2.py $common --output-dir "$out/nproc$n" | tee "$out/nproc$n.log"
done
python benchmarks/compare_checkpoints.py "$out/nproc1" "$out/nproc2" --json "$out/compare.json"
