#!/usr/bin/env bash
# The GPU figures `python medko.py plan --hours` lacks, in one lease, each step under its own time limit: CUDA
# generation at 4B shape against transformers' generate (same batch, greedy), and the curriculum end to end at 4B
# shape on random weights through the hub fixture, a few steps, timing each stage. Logs go to $OUT (or ./gpu_out).
# Needs, beside the repository (as bench/gpu_checks.sh):
#   MEDKO_CACHE=.devcache  a folder holding gemma3-270m/tokenizer.json (the random-weight shapes use its tokenizer)
#   transformers (requirements-dev.txt) for the peer; bitsandbytes is not needed (bf16 throughout)
#
#   bash bench/gpu_cost.sh
# Then copy its figures into engine/costs.py's THROUGHPUTS with device, shape, date and this command.
set -u -o pipefail
export PYTHONUNBUFFERED=1 MEDKO_CACHE=${MEDKO_CACHE:-$PWD/.devcache}
source "$(dirname "$0")/gpu_step.sh"

nvidia-smi -L
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# 1. Decoding: s1's batch (16 rows) and s5's (64 rows), 128 new tokens each, medko against transformers.
step generate_16 150 $py bench/gpu_generate.py --shape 4b --rows 16 --new-tokens 128
step generate_64 150 $py bench/gpu_generate.py --shape 4b --rows 64 --new-tokens 128
# 2. The curriculum at 4B shape: random bf16 weights served as google/medgemma-4b-it by the hub fixture (sources at
# a tenth of their real volume), s1 scoring 4b alone, 3 steps a phase; the table gives each stage's seconds.
model_dir=$out/random-4b
step random_4b 120 $py -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; \
from common import bench_model_dir; print(bench_model_dir(None, '4b', Path('$out').resolve()))"
step curriculum_4b 420 env S1_ARGS="--candidates 4b --translate-tokens 32" S5_ARGS="--reasoning-tokens 64" \
    $py bench/volumes.py --volumes 0.1 --model-dir "$out/model" --json "$out/curriculum_4b.json" \
    --run-args "--max-steps 3 --eval-limit 200"
