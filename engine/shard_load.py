"""Shard-at-load under FSDP2: a base model built on the meta device, whose weights each rank reads, at the model's
first use, as its own rows of every tensor straight from the safetensors files.

No rank ever holds the whole base: the model is built on the meta device and surgery is replayed on it (new
tensors, such as LoRA and language vectors, are real and small; duplicated layers stay on the meta device with the
layer they copy). At the first use, engine.distributed.materialize applies fully_shard and then calls
PendingLoad.fill, which reads, tensor by tensor, the rows fully_shard gave this rank with one positioned read each
(the safetensors header gives every tensor's offset), so a rank's peak at load is its shard plus one tensor's rows
in another dtype. Nothing is memory-mapped: what a rank holds is what it has read.

Imports engine.distributed, engine.errors and engine.model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from engine import distributed
from engine.errors import MedkoError
from engine.model import Gemma3, ModelConfig, check_keys


class Stored(NamedTuple):
    """Where one tensor lies in a safetensors file: its key, shape, dtype and the file offset of its data."""

    path: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int


# safetensors' dtype names (the format's header) of the dtypes a checkpoint's weights come in
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def header(path: Path) -> dict[str, Stored]:
    """Every tensor of a safetensors file by key, from its header alone (8 bytes of length, then JSON)."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            entries = json.loads(f.read(length))
        size = path.stat().st_size
        out = {}
        for key, entry in entries.items():
            if key == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            if 8 + length + end > size or entry["dtype"] not in _DTYPES:
                raise ValueError(f"{key} lies past the end of the file or has dtype {entry['dtype']}")
            out[key] = Stored(path, key, tuple(entry["shape"]), _DTYPES[entry["dtype"]], 8 + length + begin)
        return out
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MedkoError(f"{path} is corrupt or truncated ({err}); delete it and download again") from None


def read_rows(stored: Stored, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of dim 0 of a stored tensor, read with one positioned read into memory of their own
    (a row-major tensor's rows are contiguous bytes), so a rank touches nothing of the file beyond them."""
    rows = torch.empty((stop - start, *stored.shape[1:]), dtype=stored.dtype)
    data = rows.view(-1).view(torch.uint8).numpy() if rows.numel() else None
    if data is not None:
        with open(stored.path, "rb") as f:
            f.seek(stored.offset + start * data.nbytes // (stop - start))
            if f.readinto(memoryview(data)) != data.nbytes:
                raise MedkoError(f"{stored.path} is truncated at {stored.key}; delete it and download again")
    return rows


def check_shapes(expected: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], source: str, hint: str
                 ) -> None:
    """Refuses, by name, a stored tensor whose shape is not the model's."""
    for name, target in expected.items():
        if tuple(shapes[name]) != tuple(target.shape):
            raise MedkoError(f"{source}: {name} has shape {tuple(shapes[name])} but the model expects "
                             f"{tuple(target.shape)}; {hint}")


@dataclass
class PendingLoad:
    """Where the weights of a model on the meta device come from, read when engine.distributed.materialize shards
    it: base weights by their name in the checkpoint (decoder layers by `checkpoint_index`, which a duplicated
    layer keeps from the layer it copies), and weights of a run's adapter file that waited with the base."""

    device: torch.device  # where the shards go
    base: dict[str, Stored]  # medko's name of each base weight in the checkpoint's layer numbering
    head: Stored | None  # the checkpoint's lm_head, which must equal embed_tokens (medko ties them)
    source: str  # the checkpoint directory, for messages
    additions: dict[str, Stored] = field(default_factory=dict)  # the model's names, read from an adapter file

    def base_name(self, model: Gemma3, name: str) -> str:
        if not name.startswith("layers."):
            return name
        _, index, rest = name.split(".", 2)
        return f"layers.{model.layers[int(index)].checkpoint_index}.{rest}"

    def fill(self, model: Gemma3) -> None:
        """Each parameter still on the meta device becomes this rank's rows of its stored tensor; the others
        (made by surgery) keep the values fully_shard sharded. Then the tied head is checked row by row."""
        with torch.no_grad():
            for module_name, module in model.named_modules():
                for name, param in list(module._parameters.items()):
                    full_name = f"{module_name}.{name}" if module_name else name
                    if param is None or not param.is_meta:
                        continue
                    stored = self.additions.get(full_name) or self.base[self.base_name(model, full_name)]
                    setattr(module, name, nn.Parameter(self._shard(param, stored), requires_grad=param.requires_grad))
            differs = 0
            if self.head is not None:
                embed = model.embed_tokens.weight
                start, stop = distributed.local_rows(embed)
                differs = int(not torch.equal(read_rows(self.head, start, stop).to(embed.dtype).to(embed.device),
                                              embed.to_local()))
        if distributed.global_sum(differs):
            raise MedkoError(f"{self.source} has an lm_head that differs from its embed_tokens, and medko ties them; "
                             f"score the run itself (eval --run RUN_DIR) or export it with --format tied")

    def _shard(self, param: torch.Tensor, stored: Stored) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        start, stop = distributed.local_rows(param)
        rows = read_rows(stored, start, stop).to(self.device, param.dtype)
        return DTensor.from_local(rows, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                                  stride=param.stride())


def deferred_model(config: ModelConfig, stored: dict[str, Stored], head: Stored | None, device: torch.device,
                   dtype: torch.dtype, source: str) -> Gemma3:
    """A Gemma 3 on the meta device in `dtype`, its checkpoint's keys and shapes checked now and its weights read
    at its first use (PendingLoad). `model_device` reports `device`, so surgery makes its tensors there."""
    with torch.device("meta"):
        model = Gemma3(config).to(dtype)
    expected = model.state_dict()
    check_keys(expected, stored, source, "is it a Gemma 3 checkpoint of this size?")
    check_shapes(expected, {k: s.shape for k, s in stored.items()}, source, "the checkpoint and its config.json disagree")
    for index, layer in enumerate(model.layers):
        layer.checkpoint_index = index
    model.load_device = device
    model.pending_load = PendingLoad(device, stored, head, source)
    return model.eval()
