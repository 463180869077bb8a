"""The two sides of bench/train.py, each building its model and the optimizer step of one chunk of examples.

A chunk is {"main": examples, "english": examples}: "main" is what the cross-entropy learns (every workload), and
"english", only in the s3 workload, is the text whose hidden states the per-layer loss holds to the frozen teacher.
Both sides train one adapter (rank 16, alpha 32, dropout 0) on q,k,v,o,gate,up,down of every decoder layer with
AdamW (lr 1e-4, constant, no weight decay, no clipping), and start from the same lora_A draws.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from engine.adapters import LORA_TARGETS, add_lora
from engine.checkpoints import load_model
from engine.losses import layer_loss
from engine.examples import Example, pack
from engine.trainer import TrainConfig, accumulate_gradients, make_optimizer, set_trainable
import shared_logic as sl

RANK, ALPHA, LR = 16, 32.0, 1e-4
LAYER_KIND = "mse"  # s3's default per-layer loss
Chunk = dict[str, list[Example]]
Step = Callable[[Chunk], dict[str, float]]


def same_adapter_init(model: torch.nn.Module) -> None:
    """Re-draws every lora_A from a seed named by its layer and projection, so both sides start identically.

    Both libraries draw A Kaiming-uniform, but from the global RNG in different orders; with equal A (and
    B at zero) the two runs should track each other step for step, not only at step 1.
    """
    found = 0
    for name, param in model.named_parameters():
        match = re.search(r"layers\.(\d+)\..*\.(\w+_proj)\.lora_A\.", name)
        if match:
            seed = int(match[1]) * len(LORA_TARGETS) + LORA_TARGETS.index(match[2])
            generator = torch.Generator().manual_seed(seed)
            bound = 1 / math.sqrt(param.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [rank, in]
            with torch.no_grad():
                param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=generator))
            found += 1
    if found == 0:
        raise SystemExit("found no lora_A parameter to initialise; did the adapter names change?")


def autocast(device: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def medko_trainer(args: argparse.Namespace, device: str, dtype: torch.dtype,
                  model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, Step]:
    """medko as a stage trains: packed rows (trainer.pack) and the stages' own loss (shared_logic.stage_loss: CE,
    plus the per-layer English loss against teacher_mode when the batch carries English rows). `model`: a base
    already built (bench/gpu_shape.py's random weights) instead of args.model_dir's."""
    model = model or load_model(Path(args.model_dir), device, dtype, quantize=bool(args.quantize))
    add_lora(model, "lora1", rank=RANK, alpha=ALPHA, dropout=0.0, targets=LORA_TARGETS)
    set_trainable(model, sl.LORA_PATTERNS)
    same_adapter_init(model)
    optimizer = make_optimizer(model, TrainConfig(lr=LR, weight_decay=0.0))
    model.train()
    loss_fn = sl.stage_loss(LAYER_KIND, args.layer_weight)
    context = autocast(device)

    def step(chunk: Chunk) -> dict[str, float]:
        batch = pack(chunk["main"], args.max_len)
        if chunk.get("english"):
            batch.update({f"en_{k}": v for k, v in pack(chunk["english"], args.max_len).items()})
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, targets, extras = accumulate_gradients(model, loss_fn, [batch], context)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss / targets, **{k: v[0] for k, v in extras.items() if k == "layer"}}

    return model, step


def padded(examples: list[Example], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) right-padded to the longest example, as transformers' collators pad:
    labels are the ids where the token is a target, -100 on prompt and padding."""
    width = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        row = torch.tensor(e.ids)
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
        labels[i, :len(row)] = torch.where(torch.tensor(e.target_mask, dtype=torch.bool), row, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def peer_trainer(args: argparse.Namespace, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Step]:
    """transformers + peft as its users train: padded batches, model(labels=...).loss, and for s3 the teacher's
    hidden states from the same model under peft's disable_adapter(), compared by medko's layer_loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if args.quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kwargs)
    if not args.quantize:
        model.to(device)
    # hidden_states[-1] as the last layer's output, before the final norm, which is what medko's holds
    model.config.tie_last_hidden_states = False
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    same_adapter_init(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    context = autocast(device)

    def step(chunk: Chunk) -> dict[str, float]:
        ids, mask, labels = padded(chunk["main"], device)
        metrics = {}
        with context:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            if chunk.get("english"):
                en_ids, en_mask, _ = padded(chunk["english"], device)
                inputs = {"input_ids": en_ids, "attention_mask": en_mask, "output_hidden_states": True,
                          "use_cache": False, "logits_to_keep": 1}  # the head is not needed for hidden states
                student = model(**inputs).hidden_states
                with torch.no_grad(), model.disable_adapter():
                    teacher = model(**inputs).hidden_states
                # medko's mse reads the final norm's gains from `model.norm`: hand it the peer's
                final_norm = SimpleNamespace(norm=model.get_base_model().model.norm)
                layer = layer_loss(student, teacher, en_mask, list(range(len(teacher))), LAYER_KIND, model=final_norm)
                loss = loss + args.layer_weight * layer
                metrics["layer"] = float(layer.detach())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), **metrics}

    return model, step
