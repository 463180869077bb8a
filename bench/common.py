"""Shared benchmark plumbing: each side runs in its own process so peak memory is its own."""
from __future__ import annotations

import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.embedded_270m import default_270m_dir, ensure_270m
from engine.model import Gemma3, PRESETS, config_to_hf


def run_side(script: str, side: str, args: list[str]) -> dict:
    """Runs `script --side SIDE ARGS` in a fresh process and returns the JSON it prints last."""
    out = subprocess.run([sys.executable, script, "--side", side, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)  # the side's traceback, which capture_output would otherwise hide
        raise subprocess.CalledProcessError(out.returncode, out.args, out.stdout, out.stderr)
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


def reset_peak_memory(device: str) -> None:
    """Starts a new peak for peak_memory_mb, so the peak of a phase leaves out loading."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the RSS high-water mark ru_maxrss reads


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def summary(times: list[float], work: float) -> dict:
    median = statistics.median(times)
    return {"median_s": median, "min_s": min(times), "max_s": max(times), "per_s": work / median}


def print_table(rows: list[tuple[str, dict]], unit: str) -> None:
    width = max(8, *(len(name) for name, _ in rows))
    print(f"{'side':{width}} {unit + '/s':>12} {'median s':>9} {'min s':>7} {'max s':>7} {'peak MiB':>9}")
    for name, r in rows:
        print(f"{name:{width}} {r['per_s']:12.1f} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} "
              f"{r['peak_mb']:9.0f}")


def random_checkpoint(shape: str, directory: Path, tokenizer_dir: Path | None = None,
                      shard_bytes: int = 4 * 2**30, device: str = "cuda") -> Path:
    """A random bf16 HF-layout checkpoint of a preset's shape, in shards, made one tensor at a time on `device`.

    Never holds the whole model anywhere, so the 27B shape needs only disk (about 55 GB). The tokenizer
    files of tokenizer_dir are copied in, so the directory loads like a real one.
    """
    from safetensors.torch import save_file

    config = PRESETS[shape]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in {f"model.{k}": v for k, v in Gemma3(config).state_dict().items()}.items()}
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device).manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard.clear()

    for name, tensor_shape in shapes.items():
        tensor = torch.empty(tensor_shape, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=generator)
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > shard_bytes:
            flush()
        shard[name] = tensor.cpu()
    flush()
    if device == "cuda":
        torch.cuda.empty_cache()  # hand the generator's blocks back, so the sides have the whole GPU
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config_to_hf(config) | {"torch_dtype": "bfloat16"}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if tokenizer_dir is not None and (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def random_model(shape: str, device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Gemma3:
    """A preset's shape with random weights (normal, std 0.02, as random_checkpoint draws them) built on `device`
    in `dtype`, without a checkpoint: the 27B shape's 54 GB need no disk and no read."""
    with torch.device("meta"):
        model = Gemma3(PRESETS[shape])
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=generator)
    return model.eval()


def bench_model_dir(model_dir: str | None, shape: str, tmp: Path, device: str = "cuda") -> str:
    """--model-dir, else the embedded 270M, or random weights of a bigger preset's shape (its tokenizer)."""
    if model_dir is not None:
        return model_dir
    if shape == "270m":
        return str(ensure_270m())
    # Random weights need only the tokenizer: the cached 270M's, without its weights, where the package is absent
    cached = default_270m_dir()
    tokenizer_dir = cached if (cached / "tokenizer.json").is_file() else ensure_270m()
    return str(random_checkpoint(shape, tmp / "model", tokenizer_dir=tokenizer_dir, device=device))
