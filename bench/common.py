"""Shared benchmark plumbing: each side runs in its own process so peak memory is its own."""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_side(script: str, side: str, args: list[str]) -> dict:
    """Runs `script --side SIDE ARGS` in a fresh process and returns the JSON it prints last."""
    out = subprocess.run([sys.executable, script, "--side", side, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of each call after warm-up, synchronising the GPU around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def summary(times: list[float], work: float) -> dict:
    median = statistics.median(times)
    return {"median_s": median, "min_s": min(times), "max_s": max(times), "per_s": work / median}


def print_table(rows: list[tuple[str, dict]], unit: str) -> None:
    print(f"{'side':8} {unit + '/s':>12} {'median s':>9} {'min s':>7} {'max s':>7} {'peak MiB':>9}")
    for name, r in rows:
        print(f"{name:8} {r['per_s']:12.1f} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} "
              f"{r['peak_mb']:9.0f}")
