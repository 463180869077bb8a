"""Export of a run's model as a plain Gemma 3 checkpoint.

Imports engine.errors, engine.files, engine.model and engine.adapters.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from engine.adapters import adapter_specs, dense_weight, lora_modules, merge_lora
from engine.errors import MedkoError, log
from engine.files import atomic_write
from engine.model import Gemma3, config_to_hf

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_weights(model: Gemma3) -> tuple[dict[str, torch.Tensor], bool]:
    """Plain Gemma 3 weights under transformers' names, and whether input and output embeddings stay tied.

    Active adapters are merged, inactive ones (the teacher) dropped; language embeddings are folded into an
    untied input embedding while lm_head keeps the original one.
    """
    state = {k: dense_weight(v) for k, v in model.state_dict(keep_vars=True).items()}
    specs = adapter_specs(model)
    for name in sorted({a for m in lora_modules(model) for a in m.active}):
        state = merge_lora(state, name, specs[name].scaling)
    state = {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}
    state = {k: v for k, v in state.items() if not k.startswith("language_embedding.")}
    out = {f"model.{k}": v.contiguous() for k, v in state.items()}
    lang = model.language_embedding
    if lang is None:
        return out, True
    embed = state["embed_tokens.weight"]
    # Gemma multiplies the input embedding by sqrt(hidden) rounded to the weight dtype; divide by the same.
    scale = torch.tensor(model.config.hidden_size ** 0.5, dtype=embed.dtype).float()
    with torch.no_grad():
        added = lang(torch.arange(embed.shape[0], device=embed.device)).float()
    out["model.embed_tokens.weight"] = ((embed.float() * scale + added) / scale).to(embed.dtype).contiguous()
    out["lm_head.weight"] = embed.contiguous()
    return out, False


def export_run(model: Gemma3, out_dir: str | Path, tokenizer_path: str | Path) -> Path:
    """Writes a standard Gemma 3 text checkpoint (config.json, model.safetensors, tokenizer) that
    transformers' Gemma3ForCausalLM loads; written to a temporary directory and renamed."""
    from safetensors.torch import save_file

    out_dir, tokenizer_path = Path(out_dir), Path(tokenizer_path)
    if out_dir.exists():
        raise MedkoError(f"{out_dir} already exists; remove it or export to a new directory")
    if not tokenizer_path.is_file():
        raise MedkoError(f"{tokenizer_path} is missing; pass the base model's tokenizer.json")
    state, tied = export_weights(model)
    hf_config = config_to_hf(model.config)
    hf_config["tie_word_embeddings"] = tied
    with atomic_write(out_dir, directory=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        for name in _TOKENIZER_FILES[1:]:
            if (tokenizer_path.parent / name).is_file():
                shutil.copyfile(tokenizer_path.parent / name, tmp / name)
    log.info("exported %s (%d tensors, embeddings %s)", out_dir, len(state), "tied" if tied else "untied")
    return out_dir
