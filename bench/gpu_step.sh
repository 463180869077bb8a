# Sourced by the GPU scripts (bench/gpu_checks.sh, bench/gpu_cost.sh): one step of a lease under its own time limit.
out=${OUT:-gpu_out}
mkdir -p "$out"
py=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run it, keep its log, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 14 "$out/$name.log"
    echo "== $name: rc $rc in $((SECONDS - start)) s"
}
