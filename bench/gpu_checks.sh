#!/usr/bin/env bash
# The GPU checks of one lease, in order of what they settle, each under its own time limit so that one hang
# costs only its own part. Logs go to $OUT (or ./gpu_out). Needs, beside the repository:
#   MEDKO_CACHE=.devcache  a folder holding gemma3-270m/tokenizer.json (the random-weight shapes use its tokenizer)
#   PYTHONPATH=.devsite    bitsandbytes (pip install --target), for the NF4 rows
#
#   bash bench/gpu_checks.sh
set -u -o pipefail
export PYTHONUNBUFFERED=1 MEDKO_CACHE=${MEDKO_CACHE:-$PWD/.devcache} PYTHONPATH=${PYTHONPATH:-$PWD/.devsite}
source "$(dirname "$0")/gpu_step.sh"

nvidia-smi -L
$py -c "import torch, bitsandbytes; print('torch', torch.__version__, 'bitsandbytes', bitsandbytes.__version__)"
# 1. The memory plan against CUDA's allocator: 4B and 27B whole, bf16, then with the NF4 base.
step plan_bf16 140 $py bench/plan_check.py --device cuda --save "$out/plan_bf16.json"
step plan_nf4_27b 60 $py bench/plan_check.py --device cuda --quantize --case 27b:62:s3:1:512
step plan_nf4_4b 40 $py bench/plan_check.py --device cuda --quantize --case 4b:34:s3:4:512
# 2. NF4 numerics: medko's NF4 base against bitsandbytes' Linear4bit in transformers' model, both against float32.
step parity_nf4 50 $py bench/bf16_parity.py --quantize 4bit
# 3. NF4 LoRA training speed against transformers + peft + bitsandbytes, 4B shape.
step train_nf4 100 $py bench/train.py --shape 4b --quantize 4bit --steps 6 --warmup 2
# 4. Multiple-choice evaluation on a 4B shape against the lm-eval-style loop.
step eval_4b 200 $py bench/eval.py --shape 4b --questions 300
