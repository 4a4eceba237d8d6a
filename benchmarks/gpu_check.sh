#!/usr/bin/env bash
# The GPU checks in one short run (~5 min on an H100):
#   1. the card (nvidia-smi);
#   2. benchmarks/train_throughput.py --device cuda: reference vs LoRA vs full fine-tune under the rtx3050_4gb
#      profile (fp16, 8-bit AdamW): trained tokens/s, peak VRAM, projected time for 3 epochs of alpaca-gpt4;
#   3. benchmarks/plan_gpu_validation.py: convobot-plan's memory estimates against what the GPU allocates.
# On an offline GPU machine whose Python has torch but not the rest of the stack, first `make gpu-carry` (the
# pinned wheels and the ../shared inputs, into the git-ignored .gpu/), bring .gpu/ along, then run this script.
# Results go to $OUT if it is set, else to benchmarks/results/; they name the card.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
day=$(date +%F)
mkdir -p "$out"
if [ -d .gpu/wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/wheels/*.whl
    export PYTHONPATH=/tmp/site:$PWD CONVOBOT_SHARED_DATA=$PWD/.gpu/shared/data
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_$day.txt"
python3 benchmarks/train_throughput.py --device cuda --out "$out/train_throughput_cuda_$day" 2>&1 \
    | tee "$out/train_throughput_cuda_$day.log"
python3 benchmarks/plan_gpu_validation.py --out "$out/plan_gpu_validation_$day.json" 2>&1 \
    | tee "$out/plan_gpu_validation_$day.log"
