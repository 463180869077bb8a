"""Training checkpoints: trainable weights, optimizer and loop state written atomically, found and loaded for
--resume.

Under torchrun the state is gathered on every rank (sharded parameters and optimizer states become whole) and
rank 0 alone writes; the files are the ones a single process writes.

Imports engine.distributed, engine.errors and engine.files.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import distributed
from engine.errors import MedkoError, log
from engine.files import atomic_write, file_sha256, fsync

# out_dir/checkpoints/step-00000100/{adapter.safetensors, optimizer.pt, state.json}, written as
# .tmp-* in the same directory and renamed, so a step directory is complete or absent.
CHECKPOINTS, WEIGHTS, OPTIMIZER, STATE = "checkpoints", "adapter.safetensors", "optimizer.pt", "state.json"
SLACK = 1 << 20  # bytes beyond the files themselves: directory entries, filesystem blocks
KEEP = 2  # the newest checkpoint and the one before it, the fallback when the newest is found damaged on resume


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters whole on the CPU; under FSDP2 on rank 0 alone (distributed.on_main_whole)."""
    return distributed.on_main_whole({n: p for n, p in model.named_parameters() if p.requires_grad})


def _rng_state() -> dict[str, Any]:
    def encode(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    cuda = [encode(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"torch": encode(torch.get_rng_state()), "cuda": cuda}


def _set_rng_state(state: dict[str, Any]) -> None:
    def decode(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def require_space(directory: Path, needed: int, what: str, reclaimable: int = 0) -> bool:
    """Refuses in one sentence, before anything is written, when `directory`'s disk lacks `needed` bytes even
    after `reclaimable` bytes (the previous checkpoint) are freed. Returns True when it fits only that way."""
    free = free_bytes(directory)
    if free + reclaimable < needed:
        also = f" ({reclaimable:,} more once the previous checkpoint is replaced)" if reclaimable else ""
        raise MedkoError(f"{directory} has {free:,} bytes free{also} but {what} needs {needed:,}; free space on "
                         f"that disk or move the run, then resume (the last complete checkpoint is kept)")
    return free < needed


def prepare_directory(out_dir: Path, needed: int, reclaimable: int) -> None:
    """Removes what an interrupted save left and refuses a disk that cannot hold the next checkpoint, even in the
    previous one's place (`reclaimable` bytes)."""
    for leftover in (Path(out_dir) / CHECKPOINTS).glob(".tmp-*"):
        log.info("removing %s, left by an interrupted checkpoint save", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    require_space(out_dir, needed, "the next checkpoint", reclaimable)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _serialized(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, state: dict[str, Any]
                ) -> dict[str, bytes]:
    """The checkpoint's files as bytes: their exact sizes are known before the disk is touched, and every write
    goes through one plain file write whose OSError can be named. It costs one checkpoint's size in memory, on rank
    0 alone under torchrun (the other ranks get {})."""
    from safetensors.torch import save

    weights, optimizer_state = trainable_state(model), distributed.full_optimizer_state(optimizer)
    if not distributed.is_main():  # every rank sends its rows to rank 0 above; rank 0 alone writes
        return {}
    buffer = io.BytesIO()
    torch.save(optimizer_state, buffer)
    files = {WEIGHTS: save(weights), OPTIMIZER: buffer.getvalue()}
    # Resume checks the files against these digests, and says when the thread count (which changes float sums)
    # differs from the one the checkpoint was written with.
    state = {**state, "step": step, "threads": torch.get_num_threads(),
             "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    files[STATE] = json.dumps(state, indent=1).encode()
    return files


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], alone: bool = False) -> Path:
    """Writes step's checkpoint and, once it is complete and read back intact, removes all but the previous one
    (KEEP); returns its directory.

    The previous checkpoint stays as a fallback for a resume that finds the newest damaged; older ones go first
    when the disk is short. On a disk with room for one checkpoint only, the previous one is removed first and the
    new one written in its place, with a warning: a crash during that write leaves no checkpoint. When even one
    does not fit, this refuses before writing anything, naming the bytes needed and free, and the previous
    checkpoint stays whole for --resume. Any OSError of the write becomes a MedkoError naming the path. Under torchrun every rank calls it
    and rank 0 writes; `alone` (after an interrupt, when the ranks stopped at different points) writes on rank 0
    without waiting for the others.
    """
    root = Path(out_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    files = _serialized(model, optimizer, step, state)
    if alone:
        return _write(root, final, files) if distributed.is_main() else final
    distributed.on_main(_write, root, final, files)
    return final


def _write(root: Path, final: Path, files: dict[str, bytes]) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
        older = [p for p in checkpoints(root.parent) if p != final]  # newest first
        needed = sum(map(len, files.values())) + SLACK
        while len(older) > 1 and free_bytes(root) < needed:  # the oldest go first: the newest stays a fallback
            shutil.rmtree(older.pop())
        if require_space(root, needed, f"checkpoint {final.name}", sum(checkpoint_bytes(p) for p in older)):
            log.warning("%s has room for one checkpoint only: %s replaces %s in place, and a crash during this "
                        "write leaves no checkpoint to resume", root, final.name, ", ".join(p.name for p in older))
            for old in older:
                shutil.rmtree(old)
        with atomic_write(final, directory=True) as tmp:
            for name, data in files.items():
                with open(tmp / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            fsync(tmp)
            for name, data in files.items():
                if (tmp / name).read_bytes() != data:
                    raise MedkoError(f"{tmp / name} reads back different from what was written; check the disk")
        fsync(root)
    except OSError as err:
        raise MedkoError(f"could not write checkpoint {final}: {err.strerror or err} ({err.filename or root}); the "
                         f"previous checkpoint is kept, fix the cause and resume") from None
    for old in [p for p in checkpoints(root.parent) if p != final][KEEP - 1:]:
        shutil.rmtree(old)
    return final


def checkpoints(out_dir: Path) -> list[Path]:
    """The complete checkpoints, newest first; temporary directories of an interrupted save are never among them."""
    root = Path(out_dir) / CHECKPOINTS
    steps = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]), reverse=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    return next(iter(checkpoints(out_dir)), None)


class DamagedCheckpoint(MedkoError):
    """A checkpoint whose files are missing or differ from the digests it recorded."""


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's loop state once its files are all there and match their recorded sha256."""
    missing = [name for name in (WEIGHTS, OPTIMIZER, STATE) if not (path / name).is_file()]
    if missing:
        raise DamagedCheckpoint(f"checkpoint {path} lacks {missing}")
    try:
        state = json.loads((path / STATE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedCheckpoint(f"{path / STATE} is not valid JSON ({err})") from None
    for name, digest in state.get("sha256", {}).items():
        if file_sha256(path / name) != digest:
            raise DamagedCheckpoint(f"{path / name} differs from the sha256 its checkpoint recorded, so it is damaged")
    return state


def resumable_checkpoint(out_dir: Path) -> Path:
    """The newest checkpoint that verifies. A damaged newer one is renamed damaged-step-N (rank 0 does it), with a
    warning, so the resumed run can write that step again; when none is left the sentence says so."""
    found = checkpoints(out_dir)
    if not found:
        raise MedkoError(f"{Path(out_dir) / CHECKPOINTS} holds no checkpoint to resume; run without --resume to start")
    damage = []
    for path in found:
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint as err:
            damage.append(str(err))
            if distributed.is_main():  # an older damaged copy of the same step gives way
                shutil.rmtree(path.with_name(f"damaged-{path.name}"), ignore_errors=True)
                path.rename(path.with_name(f"damaged-{path.name}"))
            continue
        if damage:
            log.warning("%s; resuming from the previous complete checkpoint %s instead (the damaged one is kept "
                        "as damaged-*, delete it when you no longer need it)", "; ".join(damage), path.name)
        return path
    raise MedkoError(f"{'; '.join(damage)}, and no earlier complete checkpoint is kept; delete "
                     f"{Path(out_dir)} and train it from the start (without --resume)")


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    config: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Loads trainable weights and optimizer state in place; returns the loop state.

    The train config must be the saved one except for max_steps; this is checked before anything loads.
    """
    from safetensors import safe_open

    state = verify_checkpoint(path)
    threads = state.get("threads")
    if threads is not None and threads != torch.get_num_threads():
        log.warning("%s was written by a process with %d threads and this one has %d; float sums may round "
                    "differently, so the result can differ from an uninterrupted run by rounding (set "
                    "OMP_NUM_THREADS=%d for an exact resume)", path, threads, torch.get_num_threads(), threads)
    saved = {**(defaults or {}), **state["config"]}  # a field newer than the checkpoint ran at its default
    free = {"max_steps", "device", "log_every", "save_every", "gradient_checkpointing"}  # results do not depend on them
    changed = {k: (saved.get(k), v) for k, v in config.items() if k not in free and saved.get(k) != v}
    if changed:
        every = " (batch_size counts every process: keep --batch-size times the process count)"
        counts = every if "batch_size" in changed else ""
        raise MedkoError(f"resuming {path} with changed train config fields {changed} (saved, now){counts}; "
                         f"resume with the saved values or start a new run directory")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # A sharded model's rank reads only its shard's rows of both files (distributed.local_like copies them), the
    # optimizer's memory-mapped; a whole model loads them whole, so that no mapping outlives the load.
    with safe_open(str(path / WEIGHTS), "pt") as weights:
        if set(weights.keys()) != set(params):
            raise MedkoError(f"{path / WEIGHTS} holds {sorted(set(weights.keys()) - set(params))[:8]} beyond the "
                             f"trainable parameters and lacks {sorted(set(params) - set(weights.keys()))[:8]}; "
                             f"call set_trainable with the patterns of the interrupted run")
        with torch.no_grad():
            for name in weights.keys():
                params[name].copy_(distributed.local_like(params[name], weights.get_slice(name)))
    saved_optimizer = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True,
                                 mmap=distributed.sharded(model))
    optimizer.load_state_dict(distributed.shard_optimizer_state(optimizer, saved_optimizer))
    return state
