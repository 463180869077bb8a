"""medko's shared logic: the Gemma 3 model, adapters, losses, data, evaluator, training loop and I/O.

Read it top to bottom: configuration, model pieces from the smallest to the whole model, the
tokenizer, checkpoint and hub I/O, generation, then the rest of the curriculum's machinery.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

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

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight
        # Gemma scales by sqrt(hidden) rounded to the weight dtype first.
        scale = torch.tensor(self.config.hidden_size ** 0.5, dtype=weight.dtype)
        return self.embed_tokens(input_ids) * scale.to(weight.device)

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
    """A hub checkpoint in the huggingface-hub cache; HF_HUB_OFFLINE=1 is honoured by the library."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError)

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise MedkoError(f"{repo_id} is gated: accept its licence on its Hugging Face page, then set HF_TOKEN "
                         f"or run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise MedkoError(f"{repo_id} was not found or needs a token: check the name, accept the licence, and "
                         f"set HF_TOKEN") from None
    except LocalEntryNotFoundError:
        raise MedkoError(f"{repo_id} is not in the local cache and the hub cannot be reached (offline?); "
                         f"download it once with a network, or pass --model DIR") from None


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
