"""The real path at the real data volumes, on a CPU with the tiny model: what the run costs that is not the model's
arithmetic (reading, overlap detection, held-out sets, translation bookkeeping and caches, measurements, the report).

    python bench/volumes.py                       # volumes 1 and 10: every source at its real row count, then x10
    python bench/volumes.py --volumes 0.01 0.1    # a quick look

For each volume it writes a hub cache (tests/hub_cache.py, every source at REAL_ROWS x volume with realistic
lengths), runs `bash run.sh --size 4b --max-steps 2` offline on it with the tiny model (the rehearsal's limits,
translation and reasoning capped at 2 new tokens), and prints each stage's wall seconds and peak RSS (MiB), then
the ratio of the last volume to the first: linear growth is the volumes' ratio in seconds and 1 in memory.
Each `python` that run.sh starts goes through a shim that records its wall time and its peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
# The rehearsal's limits (tests/conftest.py rehearsed_run): the tiny tokenizer spells Korean in bytes.
TINY_ARGS = ("--max-steps", "2", "--max-len", "1024", "--batch-size", "2")

SHIM = """#!{python}
import json, os, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call([{python!r}, *sys.argv[1:]])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
with open(os.environ["MEDKO_VOLUME_LOG"], "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:3], "seconds": time.perf_counter() - start, "mib": peak}}) + "\\n")
sys.exit(code)
"""


def step_name(argv: list[str]) -> str:
    """stages/s3_korean.py -> s3_korean; medko.py test -> test; medko.py report -> report."""
    return Path(argv[0]).stem if argv[0].startswith("stages/") else argv[1] if len(argv) > 1 else argv[0]


def run_volume(volume: float, work: Path, model_dir: str | None = None,
               run_args: tuple[str, ...] = TINY_ARGS) -> dict[str, tuple[float, float]]:
    """{step: (seconds, peak MiB)} of one run.sh at this volume; model_dir: a checkpoint served as MedGemma 4B."""
    from hub_cache import build_hub_cache, model_from_dir

    cache = build_hub_cache(work / f"cache-{volume}", volume)
    if model_dir:
        model_from_dir(cache, "google/medgemma-4b-it", Path(model_dir))
    shim_dir = work / "shim"
    shim_dir.mkdir(exist_ok=True)
    shim = shim_dir / "python"
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    log = work / f"steps-{volume}.jsonl"
    env = {**os.environ, "PATH": f"{shim_dir}:{os.environ['PATH']}", "MEDKO_VOLUME_LOG": str(log),
           "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(work / "hf"),
           "S1_ARGS": os.environ.get("S1_ARGS", "--translate-tokens 2"),
           "S5_ARGS": os.environ.get("S5_ARGS", "--reasoning-tokens 2")}
    start = time.perf_counter()
    with open(work / f"run-{volume}.log", "w") as run_log:  # run.sh's output, readable while it runs
        out = subprocess.run(["bash", "run.sh", "--size", "4b", *run_args, "--run-dir", str(work / f"run-{volume}")],
                             cwd=ROOT, env=env, stdout=run_log, stderr=subprocess.STDOUT)
    if out.returncode != 0:
        raise SystemExit(f"run.sh at volume {volume} failed:\n{(work / f'run-{volume}.log').read_text()[-3000:]}")
    steps = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry["argv"][0].startswith(("stages/", "medko.py")):
            steps[step_name(entry["argv"])] = (entry["seconds"], entry["mib"])
    steps["run.sh"] = (time.perf_counter() - start, max(m for _, m in steps.values()))
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volumes", type=float, nargs="+", default=[1.0, 10.0], help="multiples of the real row counts")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--model-dir", default=None, help="a checkpoint served as MedGemma 4B (e.g. random 4B weights)")
    p.add_argument("--run-args", default=None, help="run.sh's options in place of the tiny model's limits")
    p.add_argument("--work", default=None, help="keep the caches, runs and step logs (steps-VOLUME.jsonl) here, "
                   "so a run cut short still shows the stages it finished; default: a temporary folder")
    args = p.parse_args()
    run_args = tuple(args.run_args.split()) if args.run_args else TINY_ARGS
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {v: run_volume(v, work, args.model_dir, run_args) for v in args.volumes}
    first, last = args.volumes[0], args.volumes[-1]
    header = "step".ljust(16) + "".join(f"{f'{v:g}x s':>10}{f'{v:g}x MiB':>10}" for v in args.volumes)
    print(header + (f"{'s ratio':>9}{'MiB ratio':>10}" if len(args.volumes) > 1 else ""))
    for step in results[first]:
        row = step.ljust(16) + "".join(f"{results[v][step][0]:>10.1f}{results[v][step][1]:>10.0f}"
                                       for v in args.volumes)
        if len(args.volumes) > 1:
            row += (f"{results[last][step][0] / results[first][step][0]:>9.2f}"
                    f"{results[last][step][1] / results[first][step][1]:>10.2f}")
        print(row)
    if args.json:
        Path(args.json).write_text(json.dumps({str(v): r for v, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
