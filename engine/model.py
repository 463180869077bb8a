"""The Gemma 3 text model: ModelConfig and its presets, the HF config mapping, and the model from RMSNorm up to
Gemma3 (its projections run through engine.linear).

Imports engine.errors and engine.linear.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import MedkoError, log
from engine.linear import Linear, linear

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


# Sparse hub configs (the 4B's text_config) leave out what equals transformers' Gemma3TextConfig defaults; these
# are taken, by name in the log. The shape of the model has no default: a config without it is refused.
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers")
DEFAULTS = {"vocab_size": 262208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
            "query_pre_attn_scalar": 256, "sliding_window": 4096, "rms_norm_eps": 1e-6, "bos_token_id": 2,
            "eos_token_id": 1, "pad_token_id": 0}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Reads a transformers Gemma 3 config.json; the multimodal 4B nests its text config."""
    if not isinstance(hf, dict):
        raise MedkoError(f"{source} holds a JSON {type(hf).__name__}, not an object of config fields")
    hf = hf.get("text_config", hf)
    missing = [k for k in REQUIRED if k not in hf]
    if missing:
        raise MedkoError(f"{source} lacks {missing}; a Gemma 3 config names {', '.join(REQUIRED)}")
    for key in REQUIRED + ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window"):
        if key in hf and not (type(hf[key]) is int and hf[key] > 0):
            raise MedkoError(f"{source}: {key} is {hf[key]!r}; it must be a positive integer")
    scaling = hf.get("rope_scaling") or {}
    rope = hf.get("rope_parameters") or {}  # transformers 5 style
    if FULL in rope:
        scaling = rope[FULL] if rope[FULL].get("rope_type", "default") != "default" else {}
    if scaling and scaling.get("rope_type", scaling.get("type")) != "linear":
        raise MedkoError(f"unsupported rope scaling {scaling}; medko supports linear scaling only")
    taken = {k: v for k, v in DEFAULTS.items() if k not in hf}
    local_theta = rope.get(SLIDING, {}).get("rope_theta", hf.get("rope_local_base_freq"))
    global_theta = rope.get(FULL, {}).get("rope_theta", hf.get("rope_theta"))
    taken.update({k: v for k, v, given in (("rope_local_base_freq", 10_000.0, local_theta),
                                          ("rope_theta", 1_000_000.0, global_theta)) if given is None})
    if not hf.get("layer_types"):
        taken["layer_types"] = "every sixth layer global"
    if taken:
        log.info("%s leaves out %s; taking Gemma 3's defaults", source, ", ".join(f"{k}={v}" for k, v in taken.items()))
    get = {**DEFAULTS, **hf}.get
    return ModelConfig(
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
        num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
        num_kv_heads=get("num_key_value_heads"), head_dim=get("head_dim"),
        query_pre_attn_scalar=get("query_pre_attn_scalar"), sliding_window=get("sliding_window"),
        local_rope_theta=local_theta or 10_000.0, global_rope_theta=global_theta or 1_000_000.0,
        global_rope_scaling=float(scaling.get("factor", 1.0)) if scaling else 1.0, rms_norm_eps=get("rms_norm_eps"),
        layer_types=tuple(hf.get("layer_types") or default_layer_types(get("num_hidden_layers"))),
        bos_token_id=get("bos_token_id"), eos_token_id=_first(get("eos_token_id")), pad_token_id=get("pad_token_id"),
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


def check_keys(expected: Mapping[str, Any], found: Mapping[str, Any], source: str, hint: str) -> None:
    """Refuses weights whose keys are not exactly the expected ones, naming the missing and unexpected keys."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise MedkoError(f"{source} does not fit the model: missing keys {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}; {hint}")


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
                    window: int, segments: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Boolean SDPA masks [B, 1, Tq, Tk] for both layer types.

    Query i sits at slot offset+i of the key sequence. Keys must be real, causal, and for sliding
    layers within the window. A query at a pad slot may see itself, so no row is empty (no NaN).
    With `segments` (packed rows, no cache), a query sees only keys of its own example.
    """
    tq, tk = query_mask.shape[1], key_mask.shape[1]
    q_idx = torch.arange(offset, offset + tq, device=key_mask.device)[:, None]
    k_idx = torch.arange(tk, device=key_mask.device)[None, :]
    causal = (k_idx <= q_idx)[None] & key_mask[:, None, :]
    if segments is not None:
        causal = causal & (segments[:, :, None] == segments[:, None, :])
    self_slot = (k_idx == q_idx)[None]
    full = causal | self_slot
    sliding = (causal & (q_idx - k_idx < window)[None]) | self_slot
    return {FULL: full[:, None], SLIDING: sliding[:, None]}


class Gemma3(nn.Module):
    """Gemma 3 text decoder; parameter names are the checkpoint's with the `model.` prefix dropped."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if weight.device.type != "meta":  # nn.Embedding's own init; on the meta device (load_model) it would
            nn.init.normal_(weight)  # import torch._dynamo, ~2 s of every process that loads a model
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.language_embedding: nn.Module | None = None  # per-language additions (s2)
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
        # An integer mask numbers the examples packed into a row (0 is padding): attention stays inside each
        # example and positions restart at each one. A 0/1 mask is one example per row, as a boolean one is.
        segments = attention_mask if attention_mask.dtype != torch.bool and cache is None else None
        attention_mask = attention_mask.bool()
        start = cache.next_position[:, None] if cache is not None else 0
        positions = start + attention_mask.long().cumsum(-1) - 1
        if segments is not None:
            slots = torch.arange(t, device=input_ids.device).expand(b, t)
            first = torch.ones_like(segments, dtype=torch.bool)
            first[:, 1:] = segments[:, 1:] != segments[:, :-1]
            positions = slots - torch.cummax(torch.where(first, slots, 0), dim=-1).values
        positions = positions.clamp(min=0)
        if cache is not None:
            if cache.length + t > cache.max_len:
                raise MedkoError(f"KV cache holds {cache.max_len} tokens; {cache.length + t} were asked for")
            cache.key_mask[:, cache.length:cache.length + t] = attention_mask
            key_mask, offset = cache.key_mask[:, :cache.length + t], cache.length
        else:
            key_mask, offset = attention_mask, 0
        masks = attention_masks(attention_mask, key_mask, offset, c.sliding_window, segments)
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


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes: its embedding's device, or for a base waiting on the meta device (engine.shard_load
    reads it at its first use) the device it will be read to, where surgery makes its new tensors."""
    device = model.embed_tokens.weight.device
    return getattr(model, "load_device", device) if device.type == "meta" else device


def model_dtype(model: nn.Module) -> torch.dtype:
    return model.embed_tokens.weight.dtype


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device named, with None or "auto" meaning cuda when available, else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
