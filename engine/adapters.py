"""Model surgery: LoRA (and the NF4 base it may sit on), language embeddings, duplicated edge layers, the
record that replays surgery on a fresh base, the additions' state, and the teacher view of a model.

Surgery on a model whose base waits on the meta device (engine.shard_load, FSDP2) works alike: new tensors are
made on the device it will load to, and a sharded model refuses surgery in one sentence.

Imports engine.distributed, engine.errors, engine.model, engine.shard_load and engine.tokenizer.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine import distributed
from engine.errors import MedkoError
from engine.linear import linear
from engine.model import Gemma3, check_keys, model_device, model_dtype
from engine.shard_load import check_shapes, header, read_rows
from engine.tokenizer import Tokenizer

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


def _unsharded(model: Gemma3) -> None:
    """Surgery changes a model's parameters, which FSDP2 fixes when it shards the model at its first use."""
    if distributed.sharded(model):
        raise MedkoError("the model is sharded by FSDP2 since its first use and takes no more surgery; make every "
                         "architecture change right after loading, before the model runs")


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
    _unsharded(model)
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
    _unsharded(model)
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


def check_4bit(device: torch.device) -> None:
    """Refuses 4-bit base weights where they cannot run: they need CUDA and bitsandbytes."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MedkoError("4-bit base weights need the bitsandbytes package, which is missing: `pip install -r "
                         "requirements.txt` installs it")
    if torch.device(device).type != "cuda":
        raise MedkoError("4-bit base weights need a CUDA GPU; drop --quantize or run on a GPU")


def quantize_base_4bit(model: Gemma3, device: torch.device | str | None = None) -> Gemma3:
    """NF4 base weights (QLoRA) for the projections of the original decoder layers; added layers stay dense.

    Given a device, each decoder layer moves there and is quantized before the next one moves: a model read on the
    host never has its whole dense base on the GPU (27B: 54 GB in bf16, 15 GB in NF4). The rest stays where it is.
    """
    device = model_device(model) if device is None else torch.device(device)
    check_4bit(device)
    import bitsandbytes as bnb

    for layer in model.layers:
        layer.to(device)
        if layer.added:
            continue
        for _, proj in _projections(layer, LORA_TARGETS):
            if getattr(proj.weight, "quant_state", None) is None:
                weight = proj.weight.detach()
                proj.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                                compress_statistics=True).to(weight.device)  # NF4, double quant
    return model


_HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")  # syllables, jamo, compatibility jamo


def korean_token_table(tokenizer: Tokenizer) -> torch.Tensor:
    """True for each token id whose string holds Hangul; built once per tokenizer object and kept on it."""
    table = getattr(tokenizer, "korean_table", None)
    if table is None:
        table = torch.tensor([bool(_HANGUL.search(t)) for t in tokenizer.tokens()], dtype=torch.bool)
        tokenizer.korean_table = table
    return table


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
    _unsharded(model)
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


def duplicate_edge_layers(model: Gemma3) -> Gemma3:
    """A copy of the first decoder layer before it and of the last after it, fully trainable, identity at the start.

    Identity comes from the post-attention and post-feedforward norms at -1 (Gemma scales by 1 + w = 0) with
    the projections copied: zeroed projections would leave q/k/v/gate/up without gradient behind the norm. On a
    base waiting on the meta device, the copies' other weights wait too, read from the layer they copy.
    """
    _unsharded(model)
    if any(layer.added for layer in model.layers):
        raise MedkoError("the model already has duplicated edge layers; duplicate them once per run")
    copies = [copy.deepcopy(model.layers[0]), copy.deepcopy(model.layers[-1])]
    for layer in copies:
        layer.added = True
        for m in lora_modules(layer):
            if getattr(m.weight, "quant_state", None) is not None:
                m.weight = nn.Parameter(dense_weight(m.weight).to(model_dtype(model)))  # added layers train densely
        for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
            norm.weight = nn.Parameter(torch.full(norm.weight.shape, -1.0, dtype=norm.weight.dtype,
                                                  device=model_device(model)))
        for name, p in layer.named_parameters():
            if ".lora_" not in name:  # adapters keep their own state: a frozen teacher snapshot stays frozen
                p.requires_grad_(True)
    model.layers = nn.ModuleList([copies[0], *model.layers, copies[1]])
    model.config = replace(model.config, num_layers=len(model.layers),
                           layer_types=tuple(layer.layer_type for layer in model.layers))
    _record(model, {"op": "duplicate_edge_layers"})
    return model


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


def _check_additions(model: Gemma3, shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, torch.Tensor]:
    """The model's additions by name, once the saved ones' names and shapes are checked against them."""
    expected = additions_state_dict(model)
    check_keys(expected, shapes, source, "replay the run's surgery before loading")
    check_shapes(expected, shapes, source, "replay the run's surgery on its own base model")
    return expected


def load_additions(model: Gemma3, state: dict[str, torch.Tensor], source: str = "adapter weights") -> None:
    """Copies saved additions into a model with the same surgery; missing, unexpected or misshapen keys are refused."""
    expected = _check_additions(model, {k: tuple(v.shape) for k, v in state.items()}, source)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])  # state_dict tensors share storage with the parameters


def load_additions_file(model: Gemma3, path: Path, source: str) -> None:
    """load_additions from an adapter.safetensors. On a base waiting on the meta device (engine.shard_load), the
    additions waiting with it (duplicated layers) are read at its first use, each rank its own rows."""
    pending = getattr(model, "pending_load", None)
    if pending is None:
        from safetensors.torch import load_file

        load_additions(model, load_file(str(path)), source)
        return
    stored = header(path)
    expected = _check_additions(model, {k: s.shape for k, s in stored.items()}, source)
    with torch.no_grad():
        for key, target in expected.items():
            if target.is_meta:
                pending.additions[key] = stored[key]
            else:
                target.copy_(read_rows(stored[key], 0, stored[key].shape[0]))


@contextmanager
def teacher_mode(model: Gemma3, adapter: str = "teacher") -> Iterator[Gemma3]:
    """The model as the teacher sees it, without a second copy of the base weights.

    Language embeddings are off, added layers are skipped, and only the frozen snapshot `adapter` is active
    (none when there is no such snapshot). Runs in eval mode without gradients: the teacher gives targets.
    """
    distributed.materialize(model)  # before the layers are swapped: FSDP2 shards them all, added ones included
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


def is_teacher(model: Gemma3, adapter: str = "teacher") -> bool:
    """True when the model is its own teacher as it stands: no addition is on that teacher_mode would turn off."""
    lang = model.language_embedding
    return (all(m.active == {adapter} & set(m.specs) for m in lora_modules(model))
            and (lang is None or not lang.enabled) and not any(layer.added for layer in model.layers))


def teacher_states(model: Gemma3, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states of the frozen teacher: the same modules with the student's additions off."""
    with torch.no_grad(), teacher_mode(model):
        return model(ids, mask, output_hidden_states=True, return_logits=False).hidden_states


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
