#!/usr/bin/env bash
# The GPU figures `python medko.py plan --hours` lacks, in one lease, each step under its own time limit: CUDA
# generation at 4B shape against transformers' generate (same batch, greedy), bf16 LoRA training at 4B shape against
# transformers + peft, medko alone at 27B shape (decoding, scoring, training), and the curriculum end to end at 4B
# shape on random weights through the hub fixture, a few steps, timing each stage. Logs go to $OUT (or ./gpu_out). Needs, beside the repository (as bench/gpu_checks.sh):
#   MEDKO_CACHE=.devcache  a folder holding gemma3-270m/tokenizer.json (the random-weight shapes use its tokenizer)
#   transformers and peft (requirements-dev.txt) for the peers; bitsandbytes is not needed (bf16 throughout)
#
#   bash bench/gpu_cost.sh                                                 # all of it: about 8 minutes
#   VOLUME=0.005 EVAL_LIMIT=50 CURRICULUM_S=320 bash bench/gpu_cost.sh curriculum   # the curriculum alone
#   bash bench/gpu_cost.sh 27b                                             # step 3 alone: about 2 minutes
# Then copy its figures into engine/costs.py's THROUGHPUTS with device, shape, date and this command.
set -u -o pipefail
export PYTHONUNBUFFERED=1 MEDKO_CACHE=${MEDKO_CACHE:-$PWD/.devcache}
source "$(dirname "$0")/gpu_step.sh"
model=${MODEL_DIR:-/tmp/random-4b}  # 8 GB of random weights: outside $OUT, which comes back
work=${WORK_DIR:-/tmp/volumes}
volume=${VOLUME:-0.02}  # the sources' share of their real row counts in step 3
only=${1:-all}  # `bash bench/gpu_cost.sh curriculum`: steps 0 and 4 alone; `27b`: step 3 alone

nvidia-smi -L
$py -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
# 0. One random bf16 checkpoint of the 4B shape, for steps 1, 2 and 4.
[ "$only" = 27b ] || step random_4b 80 $py -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; \
from common import random_checkpoint; from engine.embedded_270m import default_270m_dir; \
print(random_checkpoint('4b', Path('$model'), tokenizer_dir=default_270m_dir()))"
# 1. Decoding: s1's batch (16 rows) and s5's (64 rows), 128 new tokens each, medko against transformers.
if [ "$only" = all ]; then
step generate_16 80 $py bench/gpu_generate.py --model-dir "$model" --rows 16 --new-tokens 128
step generate_64 80 $py bench/gpu_generate.py --model-dir "$model" --rows 64 --new-tokens 128
# 2. Training: bf16 LoRA at 4B shape (the plan's choice for 4B on an H200), medko against transformers + peft.
step train_bf16 90 $py bench/train.py --shape 4b --model-dir "$model" --steps 6 --warmup 2
fi
# 3. medko alone at 27B shape, the random model built in GPU memory (no 54 GB checkpoint on disk): decoding at 16
# and 64 rows, letter scoring, bf16 LoRA training at bench/train.py's shape.
if [ "$only" = all ] || [ "$only" = 27b ]; then
step shape_27b 200 $py bench/gpu_shape.py --shape 27b
fi
[ "$only" = 27b ] && exit 0
# 4. The curriculum at 4B shape: the random weights served as google/medgemma-4b-it by the hub fixture (sources at
# $volume of their real volume), s1 scoring 4b alone, 3 steps a phase; the table gives each stage's seconds.
# Cut short, steps-$volume.jsonl and run-$volume.log still hold the stages that finished.
step curriculum_4b ${CURRICULUM_S:-230} env S1_ARGS="--candidates 4b --translate-tokens 32" S4_ARGS="--translate-tokens 32" S5_ARGS="--reasoning-tokens 64" \
    $py bench/volumes.py --volumes "$volume" --model-dir "$model" --work "$work" --json "$out/curriculum_4b.json" \
    --run-args "--max-steps 3 --eval-limit ${EVAL_LIMIT:-200}"
cp "$work/steps-$volume.jsonl" "$work/run-$volume.log" "$out/" 2>/dev/null
cat "$out/steps-$volume.jsonl"; tail -n 30 "$out/run-$volume.log"
(cd "$work" && find "run-$volume" -name '*.json' -o -name '*.jsonl' | tar -czf "$out/run-$volume.tgz" -T -)
