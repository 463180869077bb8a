"""Base checkpoints in Hugging Face layout: key names, strict loading, and the model named by --size/--model.

Imports engine.errors, engine.model, engine.hub, engine.tokenizer, engine.adapters, engine.embedded_270m,
engine.distributed and engine.shard_load.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from engine import distributed
from engine.adapters import check_4bit, quantize_base_4bit
from engine.embedded_270m import ensure_270m
from engine.errors import MedkoError
from engine.hub import HUB_MODELS, hub_download
from engine.model import (
    Gemma3,
    ModelConfig,
    check_keys,
    compute_dtype,
    config_from_hf,
    resolve_device,
)
from engine.shard_load import Stored, deferred_model, header
from engine.tokenizer import Tokenizer

SIZES = ("270m", "4b", "27b")  # what --size names: the embedded 270M, then MedGemma from the hub (HUB_MODELS)

# Name variants of the same text weights: text checkpoints, and the two multimodal layouts.
_KEY_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_SKIPPED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                     "model.multi_modal_projector.", "vision_model.")
_TIED_HEADS = ("lm_head.weight", "language_model.lm_head.weight")


def checkpoint_key(key: str) -> str | None:
    """medko's parameter name for a checkpoint key; None for keys deliberately skipped."""
    if key.startswith(_SKIPPED_PREFIXES) or key in _TIED_HEADS:
        return None  # vision tower, or the head that is tied to the embedding
    for prefix in _KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key  # unknown keys come through unchanged and are refused by the strict load


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise MedkoError(f"shards {missing} named in {index} are missing; download the model again")
    if not files:
        raise MedkoError(f"{model_dir} holds no .safetensors weights; point --model at a Gemma 3 checkpoint")
    return files


def checkpoint_layout(model_dir: Path) -> tuple[dict[str, Stored], Stored | None]:
    """Where each text weight of a local checkpoint lies, by medko's name, and its tied head if it has one; read
    from the files' headers alone."""
    out: dict[str, Stored] = {}
    head = None
    for path in safetensors_files(model_dir):
        for key, stored in header(path).items():
            name = checkpoint_key(key)
            head = stored if key in _TIED_HEADS else head
            if name is None:
                continue
            if name in out:
                # Two layouts of one weight (a text and a multimodal key): which one is meant cannot be told.
                raise MedkoError(f"{model_dir} holds {name} twice, as {out[name].key!r} and {key!r}; keep one key "
                                 f"layout per checkpoint")
            out[name] = stored
    return out, head


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """All text weights of a local checkpoint, renamed to medko's parameter names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    layout, head_at = checkpoint_layout(model_dir)
    out: dict[str, torch.Tensor] = {}
    head = None
    for path in safetensors_files(model_dir):
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise MedkoError(f"{path} is corrupt or truncated ({err}); delete it and download again") from None
        out.update({name: tensors[s.key] for name, s in layout.items() if s.path == path})
        head = tensors[head_at.key] if head_at is not None and head_at.path == path else head
    embed = out.get("embed_tokens.weight")
    if head is not None and embed is not None and not torch.equal(head, embed):
        # medko's Gemma 3 ties its head to the embedding, as every released Gemma 3 does; dropping a head that
        # differs (an `export --format hf` of a run with language vectors) would compute another model.
        raise MedkoError(f"{model_dir} has an lm_head that differs from its embed_tokens, and medko ties them; "
                         f"score the run itself (eval --run RUN_DIR) or export it with --format tied")
    return out


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Assigns the tensors; any missing or unexpected key is refused by name."""
    check_keys(module.state_dict(), state, source, "is it a Gemma 3 checkpoint of this size?")
    module.load_state_dict(state, strict=True, assign=True)


def read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise MedkoError(f"{path} is missing; a model directory needs config.json")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MedkoError(f"{path} is not valid JSON ({err}); write it again or download the model again") from None
    return config_from_hf(hf, str(path))


def load_model(model_dir: Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, quantize: bool = False) -> Gemma3:
    """A Gemma 3 from a local HF-layout directory, built without a second copy of the weights. quantize: the base
    projections in NF4, read on the host and moved to the GPU one quantized layer at a time. Under FSDP2 the model
    comes back on the meta device, each rank to read its own shard at the first use (engine.shard_load)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    dtype = compute_dtype(device, dtype)
    if distributed.wants_fsdp():
        return deferred_model(config, *checkpoint_layout(model_dir), torch.device(device), dtype, str(model_dir))
    with torch.device("meta"):
        model = Gemma3(config)
    state = read_checkpoint(model_dir)
    embed = state.get("embed_tokens.weight")
    if embed is not None and embed.shape[0] != config.vocab_size:
        raise MedkoError(f"{model_dir}: embedding has {embed.shape[0]} rows but config.json says vocab_size "
                         f"{config.vocab_size}; the checkpoint and its config disagree")
    state = {k: v.to(device="cpu" if quantize else device, dtype=dtype) for k, v in state.items()}
    load_strict(model, state, str(model_dir))
    if quantize:
        quantize_base_4bit(model, device).to(device)  # then the embedding and the norms
    return model.eval()


def resolve_model_dir(size: str = "270m", model_dir: str | Path | None = None) -> Path:
    """Where the checkpoint for --size or --model lives, fetching or converting it on first use."""
    if model_dir is not None:
        path = Path(model_dir)
        if not path.is_dir():
            raise MedkoError(f"--model {path} is not a directory; give a local HF-layout checkpoint")
        return path
    if size == "270m":
        return ensure_270m()
    if size in HUB_MODELS:
        return hub_download(HUB_MODELS[size])
    raise MedkoError(f"unknown --size {size!r}; choose one of {', '.join(SIZES)}, or pass --model DIR")


def load_base(size: str = "270m", model_dir: str | Path | None = None, device: str | None = None,
              dtype: torch.dtype | None = None, quantize: str | None = None) -> tuple[Gemma3, Tokenizer, Path]:
    """The base model and tokenizer named by --size or --model, on the chosen device.

    quantize="4bit" stores the frozen base projections in NF4 (CUDA with bitsandbytes only).
    """
    path = resolve_model_dir(size, model_dir)
    device = resolve_device(device)
    if quantize not in (None, "4bit"):
        raise MedkoError(f"unknown --quantize {quantize!r}; the only choice is 4bit")
    if quantize and distributed.wants_fsdp():
        raise MedkoError(distributed.NO_NF4)
    if quantize:
        check_4bit(device)
    model = load_model(path, device, dtype, quantize=quantize == "4bit")
    return model, Tokenizer(path / "tokenizer.json"), path
