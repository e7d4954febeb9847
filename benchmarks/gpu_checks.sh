#!/usr/bin/env bash
# The GPU checks and benchmarks, in one go, for a machine lent for a few minutes (no Hub access):
#   bash benchmarks/gpu_checks.sh [SECTION ...]     # default: all of them, in this order
#   train     bench_train.py, fp32 and bf16 autocast
#   tests     tests/test_trainer.py on CUDA (SAE_TEST_DEVICE=cuda; the encoder Function's CUDA paths),
#             and tests/test_jumprelu.py (CPU tensors) under the machine's torch
#   harvest   bench_harvest.py on random-weight SmolLM2-135M and Gemma-2-2B models (bf16)
#   crossover bench_train.py --crossover: where the sparse backward stops paying on the GPU
#   demo      a short demo.py run on CUDA (random-weight SmolLM2: the pipeline, not the metrics)
# Needs python3 with torch + transformers; nnsight and its missing dependencies as wheels in .whl/,
# and SmolLM2's config and tokenizer files in .gpu/smollm2/ (see README, "GPU checks").
# Writes log.txt, tests.txt and the benchmarks' JSON to $OUT (default /tmp/gpu_out); harvest.json
# holds one JSON object per line (SmolLM2, then Gemma).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
exec > >(tee -a "$OUT/log.txt") 2>&1
step() { echo; echo "=== $1 ($(date +%T))"; }
smol() {
  [ -f /tmp/smol/config.json ] && return
  rm -rf /tmp/smol
  timeout 60 python3 benchmarks/random_model.py smollm2 /tmp/smol --tokenizer .gpu/smollm2 || rm -rf /tmp/smol
}

train() {
  step "bench_train fp32 and bf16 autocast"
  local cfgs="576,4608,4096;2304,16384,1024;2304,65536,4096"
  timeout 120 python3 benchmarks/bench_train.py --json --device cuda --reps ${REPS:-15} --configs "$cfgs" | tee "$OUT/train_fp32.json"
  timeout 120 python3 benchmarks/bench_train.py --json --device cuda --reps ${REPS:-15} --configs "$cfgs" --autocast bfloat16 | tee "$OUT/train_bf16.json"
}
tests() {
  step "trainer and JumpReLU tests on CUDA"
  SAE_TEST_DEVICE=cuda timeout 150 python3 -m pytest tests/test_trainer.py tests/test_jumprelu.py -q -rf --tb=short \
    -p no:cacheprovider > "$OUT/tests.txt" 2>&1
  tail -15 "$OUT/tests.txt"
}
harvest() {
  step "bench_harvest: random-weight SmolLM2-135M (bf16) and Gemma-2-2B (bf16, layer 20)"
  smol
  timeout 90 python3 benchmarks/bench_harvest.py --json --device cuda --dtype bfloat16 --model /tmp/smol \
    --lm-batch 32 --positions 262144 --padded-texts 64 | tee "$OUT/harvest.json"
  timeout 90 python3 benchmarks/random_model.py gemma-2-2b /tmp/gemma --tokenizer .gpu/smollm2
  timeout 120 python3 benchmarks/bench_harvest.py --json --device cuda --dtype bfloat16 --model /tmp/gemma \
    --layer 20 --ctx-len 1024 --lm-batch 8 --positions 65536 --padded-texts 32 | tee -a "$OUT/harvest.json"
  rm -rf /tmp/gemma
}
crossover() {
  step "sparse vs dense crossover on the GPU"
  timeout 90 python3 benchmarks/bench_train.py --crossover --device cuda --reps 6 --configs "2304,65536,4096" | tee "$OUT/crossover_fp32.json"
  timeout 90 python3 benchmarks/bench_train.py --crossover --device cuda --reps 6 --configs "2304,65536,4096" --autocast bfloat16 | tee "$OUT/crossover_bf16.json"
}
demo() {
  step "demo.py on CUDA (random-weight SmolLM2: checks the pipeline, not the metrics)"
  smol
  timeout 150 python3 dictionary_learning/demo.py --model /tmp/smol --device cuda --dtype bfloat16 \
    --set sae_autocast=bfloat16 --save-dir /tmp/runs --quiet
  find /tmp/runs -name eval_summary.md | head -1 | xargs -r cat
}

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
for section in "${@:-train tests harvest crossover demo}"; do
  for s in $section; do "$s"; done
done
step "done"
sleep 1  # let tee write the last lines to log.txt
