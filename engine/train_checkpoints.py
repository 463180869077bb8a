"""Training checkpoints: trainable weights, optimizer and loop state written atomically, found and loaded for
--resume.

Imports engine.errors and engine.files.
"""
from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.errors import MedkoError
from engine.files import atomic_write, fsync

# out_dir/checkpoints/step-00000100/{adapter.safetensors, optimizer.pt, state.json}, written as
# .tmp-* in the same directory and renamed, so a step directory is complete or absent.
CHECKPOINTS, WEIGHTS, OPTIMIZER, STATE = "checkpoints", "adapter.safetensors", "optimizer.pt", "state.json"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


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


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Writes step's checkpoint atomically and removes older ones; returns its directory."""
    from safetensors.torch import save_file

    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    with atomic_write(final, directory=True) as tmp:
        save_file(trainable_state(model), str(tmp / WEIGHTS))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        for name in (WEIGHTS, OPTIMIZER, STATE):
            fsync(tmp / name)
        fsync(tmp)
    fsync(root)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint; temporary directories of an interrupted save are never chosen."""
    root = Path(out_dir) / CHECKPOINTS
    steps = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return max(steps, key=lambda p: int(p.name[5:]), default=None)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    config: dict[str, Any]) -> dict[str, Any]:
    """Loads trainable weights and optimizer state in place; returns the loop state.

    The train config must be the saved one except for max_steps; this is checked before anything loads.
    """
    from safetensors.torch import load_file

    missing = [name for name in (WEIGHTS, OPTIMIZER, STATE) if not (path / name).is_file()]
    if missing:
        raise MedkoError(f"checkpoint {path} lacks {missing}; delete that directory to resume from an earlier one")
    state = json.loads((path / STATE).read_text())
    saved = state["config"]
    free = {"max_steps", "device", "log_every", "save_every", "gradient_checkpointing"}  # results do not depend on them
    changed = {k: (saved.get(k), v) for k, v in config.items() if k not in free and saved.get(k) != v}
    if changed:
        raise MedkoError(f"resuming {path} with changed train config fields {changed} (saved, now); "
                         f"resume with the saved values or start a new run directory")
    weights = load_file(str(path / WEIGHTS))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        raise MedkoError(f"{path / WEIGHTS} holds {sorted(set(weights) - set(params))[:8]} beyond the trainable "
                         f"parameters and lacks {sorted(set(params) - set(weights))[:8]}; "
                         f"call set_trainable with the patterns of the interrupted run")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True))
    return state
