"""medko's shared logic: the Gemma 3 model, adapters, losses, data, evaluator, training loop and I/O.

Read it top to bottom: configuration, model pieces from the smallest to the whole model, the
tokenizer, checkpoint and hub I/O, generation, then the rest of the curriculum's machinery.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import copy
import csv
import fnmatch
import importlib.util
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
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

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
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise MedkoError(f"unknown model config keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**values)


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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        self.config = config
        self.layer_type = layer_type
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=False)
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
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embed_tokens.weight)  # tied head

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
              dtype: torch.dtype | None = None) -> tuple[Gemma3, Tokenizer, Path]:
    """The base model and tokenizer named by --size or --model, on the chosen device."""
    path = resolve_model_dir(size, model_dir)
    device = device or default_device()
    model = load_model(path, device, dtype)
    return model, Tokenizer(path / "tokenizer.json"), path


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
        return F.linear(x, weight)
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
            out = out + (F.linear(F.linear(h.to(a.dtype), a), b) * spec.scaling).to(out.dtype)
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
            proj.add_adapter(name, spec, model_dtype(model), model_device(model))
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
                proj.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4").to(weight.device)
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
                                                 model_dtype(model), model_device(model))
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

def _token_cross_entropy(model: Gemma3, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.logits(hidden).float(), targets, reduction="sum")


def causal_lm_loss(model: Gemma3, hidden: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor,
                   chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count.

    target_mask marks tokens to predict (aligned with input_ids; prompt tokens are not targets). Logits are made
    `chunk` positions at a time inside a checkpoint, so neither the forward nor the backward holds the full
    [targets x vocab] float32 logits.
    """
    mask = target_mask[:, 1:].bool()
    h, y = hidden[:, :-1][mask], input_ids[:, 1:][mask]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, h.shape[0], chunk):
        total = total + torch.utils.checkpoint.checkpoint(_token_cross_entropy, model, h[start:start + chunk], y[start:start + chunk],
                                   use_reentrant=False)
    return total, int(mask.sum())


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
    logits = model.logits(hidden[rows, positions])[:, list(letter_ids)].float()
    return F.cross_entropy(logits, gold)


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

    Only the last position goes through the head, so [T x vocab] logits are never built.
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
        scores[chunk] = model.logits(hidden)[:, letters].float().cpu()
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
