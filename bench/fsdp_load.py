"""Per-rank resident memory of FSDP2's shard-at-load (engine.shard_load) with 4 CPU processes (gloo): the random
Gemma 3 of tests/shard_load_worker.py (8 layers of 58 MiB, float32 safetensors in two shards), loaded with s3's
additions and trained two updates of s3's loss; each rank's peak above its runtime at load and through the first
update, against base/N + two layers (FSDP_LAYERS), with 10% on top, at load and through the step.

The worker's own one-process reference is not run here: tests/test_shard_load.py checks the training against it.
glibc's mmap threshold is fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so that what is resident is what is held.

    nice -n 10 python bench/fsdp_load.py [--nproc 4]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import shard_load_worker as worker  # noqa: E402
from engine.plan import FSDP_LAYERS, base_params, layer_params  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4)
    args = parser.parse_args(argv)
    config = worker.big_config()
    base, layer = base_params(config) * 4, layer_params(config) * 4
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDKO_FSDP": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    with tempfile.TemporaryDirectory() as tmp:
        model = worker.write_model(Path(tmp) / "model")
        out = Path(tmp) / "out"
        out.mkdir()
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(args.nproc), str(ROOT / "tests" / "shard_load_worker.py"), str(model), str(out)],
                              capture_output=True, text=True, cwd=ROOT, env=env)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        figures = json.loads((out / "figures.json").read_text())
    mib = worker.MIB
    n = args.nproc
    load_bound, step_bound = 1.1 * (base / n + 2 * layer), 1.1 * (base / n + FSDP_LAYERS * layer)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch gloo, {n} ranks; base "
          f"{base / mib:.1f} MiB ({config.num_layers} layers of {layer / mib:.1f} MiB), base/N {base / n / mib:.1f} MiB")
    print(f"bounds above the runtime: load {load_bound / mib:.1f} MiB (base/N + 2 layers + 10%), first step "
          f"{step_bound / mib:.1f} MiB (base/N + {FSDP_LAYERS} layers + 10%)")
    print("| rank | runtime MiB | load MiB | load − base/N, layers | first step MiB | step − base/N, layers |")
    print("| --- | --- | --- | --- | --- | --- |")
    for f in figures:
        print(f"| {f['rank']} | {f['runtime'] / mib:.1f} | {f['load'] / mib:.1f} | {(f['load'] - base / n) / layer:.2f} "
              f"| {f['step'] / mib:.1f} | {(f['step'] - base / n) / layer:.2f} |")
    within = all(f["load"] <= load_bound and f["step"] <= step_bound for f in figures)
    print("every rank within its bounds" if within else "A RANK EXCEEDS ITS BOUND")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
