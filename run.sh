#!/usr/bin/env bash
# The whole medko curriculum: s0 data, s1 gate (s1.1 when the gate asks for it), s2 to s5 with the
# English guard, the test split scored once, then the report.
#
#   bash run.sh                                  # embedded 270M, bundled sample data, offline, CPU
#   bash run.sh --size 27b --run-dir runs/27b    # MedGemma 27B from the hub, on a GPU
#   bash run.sh --smoke                          # a few minutes: every stage and the report, numbers meaningless
#   bash run.sh --size 27b --nproc 4             # s1 to s5 under torchrun on 4 GPUs of one machine
#   bash run.sh --recipe lora-sft                # the baseline: s0, s1, then plain LoRA SFT (runs/lora-sft)
#
# Every option goes to every stage (see `python stages/s3_korean.py --help`); options of one stage go in
# S0_ARGS, S1_ARGS, S1_1_ARGS, S2_ARGS, S3_ARGS, S4_ARGS, S5_ARGS or SFT_ARGS, e.g. S2_ARGS=--korean-delta.
set -euo pipefail
cd "$(dirname "$0")"

run_dir=
nproc=1
recipe=curriculum
smoke=
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) nproc="$2"; shift 2; continue ;;  # run.sh's own option: not passed to the stages
    --nproc=*) nproc="${1#--nproc=}"; shift; continue ;;
    --recipe) recipe="$2"; shift 2; continue ;;  # run.sh's own option too
    --recipe=*) recipe="${1#--recipe=}"; shift; continue ;;
    --run-dir) run_dir="$2" ;;
    --run-dir=*) run_dir="${1#--run-dir=}" ;;
    --smoke) smoke=1 ;;  # a smoke run keeps out of the real run's directory
  esac
  args+=("$1")
  shift
done
case "$recipe" in
  curriculum) default_dir=runs/default ;;
  lora-sft) default_dir=runs/lora-sft ;;
  *) echo "run.sh: unknown --recipe '$recipe'; use curriculum (the default) or lora-sft" >&2; exit 2 ;;
esac
if [ -z "$run_dir" ]; then
  run_dir=$default_dir
  [ -n "$smoke" ] && run_dir=${default_dir/runs\//runs/smoke-}
  [ "$run_dir" = runs/smoke-default ] && run_dir=runs/smoke
  args+=(--run-dir "$run_dir")
fi
mkdir -p "$run_dir"

report() { python medko.py report "$run_dir" || true; }
trap 'status=$?; if [ $status -ne 0 ]; then echo "run.sh: stopped (exit $status); report of what finished:" >&2; report; fi' EXIT

start=$(date +%s)
stage() {  # stage SCRIPT EXTRA_ARGS_VAR: s1 to s5 run under torchrun with --nproc above 1, s0 in one process
  local extra="${!2:-}" launch=(python)
  if [ "$nproc" -gt 1 ] && [ "$1" != s0_data ]; then
    launch=(torchrun --standalone --nproc_per_node "$nproc")
  fi
  echo "== $1 ==" >&2
  # shellcheck disable=SC2086
  "${launch[@]}" "stages/$1.py" "${args[@]}" $extra
}

# s0 and s1 may take --size; later stages read the run's base from s1.
stage s0_data S0_ARGS
stage s1_gate S1_ARGS
if [ "$recipe" = lora-sft ]; then
  stage lora_sft SFT_ARGS
  python medko.py test --run-dir "$run_dir"
  python medko.py report "$run_dir"
  echo "run.sh: finished in $(( $(date +%s) - start )) s; report: $run_dir/report.md" >&2
  exit 0
fi
needs_english=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['needs_english'])" "$run_dir/s1_gate/meta.json")
if [ "$needs_english" = "True" ]; then
  stage s1_1_english S1_1_ARGS
fi
stage s2_embed S2_ARGS
stage s3_korean S3_ARGS
stage s4_translate S4_ARGS
stage s5_reasoning S5_ARGS
python medko.py test --run-dir "$run_dir"
python medko.py report "$run_dir"
echo "run.sh: finished in $(( $(date +%s) - start )) s; report: $run_dir/report.md" >&2
