"""GGUF writing for llama.cpp and Ollama: exported Gemma 3 weights in llama.cpp's `gemma3` conventions (tensor
names, metadata keys, SentencePiece-style vocabulary with scores and token types, norms stored as 1 + w), through
the gguf package's GGUFWriter. The reader side of the same conventions is engine.embedded_270m.

Checked against llama.cpp's gemma3 loader (src/llama-model.cpp, src/models/gemma3.cpp) and gguf-py's constants.

Imports engine.errors, engine.model and engine.embedded_270m.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from engine.embedded_270m import GGUF_LAYER_NAMES, GGUF_TOP_NAMES, TOKEN_CONTROL, TOKEN_USER_DEFINED
from engine.errors import MedkoError, log
from engine.model import FULL, ModelConfig, default_layer_types

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_BYTE = 1, 5, 6  # llama.cpp's other SentencePiece token types
SPECIAL_SCORE = -1000.0  # what llama.cpp's converter gives control, user-defined and unused pieces
_BYTE = re.compile(r"<0x[0-9A-F]{2}>")


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def llama_cpp_problems(config: ModelConfig) -> list[str]:
    """Why llama.cpp's gemma3 would compute another model than `config` says, or nothing.

    llama.cpp reads no layer types: every sixth layer is global, sliding layers use RoPE base 10000, and the
    attention scale is 1/sqrt(hidden/heads) for 62 layers (27B) and 1/sqrt(head_dim) otherwise.
    """
    problems = []
    if tuple(config.layer_types) != default_layer_types(config.num_layers):
        full = [i for i, t in enumerate(config.layer_types) if t == FULL]
        problems.append(f"its full-attention layers are {full}, llama.cpp puts them at every sixth layer "
                        f"(duplicated edge layers move them)")
    wanted = config.hidden_size // config.num_heads if config.num_layers == 62 else config.head_dim
    if float(config.query_pre_attn_scalar) != float(wanted):
        problems.append(f"query_pre_attn_scalar is {config.query_pre_attn_scalar}, llama.cpp derives {wanted} "
                        f"from {config.num_layers} layers")
    if config.local_rope_theta != 10_000.0:
        problems.append(f"sliding layers use RoPE base {config.local_rope_theta}, llama.cpp fixes 10000")
    return problems


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for an HF Gemma 3 tensor (the inverse of embedded_270m.gguf_name_to_hf)."""
    top = {f"{hf}.weight": f"{g}.weight" for g, hf in GGUF_TOP_NAMES.items()}
    if hf_name in top:
        return top[hf_name]
    found = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    by_hf = {hf: g for g, hf in GGUF_LAYER_NAMES.items()}
    if found and found.group(2) in by_hf:
        return f"blk.{int(found.group(1))}.{by_hf[found.group(2)]}.weight"
    raise MedkoError(f"no llama.cpp name for tensor {hf_name!r}; is this a Gemma 3 text checkpoint?")


def gguf_vocab(tokenizer_path: Path, rows: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of Gemma's tokenizer.json as llama.cpp's SentencePiece vocabulary.

    Special added tokens are control pieces, other added tokens and runs of spaces user-defined (with real
    spaces, as llama.cpp writes them), <0xNN> bytes; the rest are normal pieces scored by merge priority
    (0, -1, -2, ... in id order). Embedding rows past the tokenizer become unused [PADn] pieces.
    """
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(tokenizer_path))
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > rows or sorted(by_id) != list(range(len(by_id))):
        raise MedkoError(f"{tokenizer_path} has {len(by_id)} tokens with gaps or beyond the embedding's {rows} rows")
    added = tok.get_added_tokens_decoder()
    tokens, scores, types, rank = [], [], [], 0
    for i in range(rows):
        token = by_id.get(i, f"[PAD{i}]")
        if i not in by_id:
            kind = TOKEN_UNUSED
        elif i in added:
            kind = TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED
        elif _BYTE.fullmatch(token):
            kind = TOKEN_BYTE
        elif len(token) > 1 and set(token) == {"▁"}:
            kind, token = TOKEN_USER_DEFINED, token.replace("▁", " ")
        else:
            kind = TOKEN_NORMAL
        if kind == TOKEN_NORMAL:
            scores.append(-float(rank))
            rank += 1
        else:
            scores.append(0.0 if kind == TOKEN_BYTE else SPECIAL_SCORE)
        tokens.append(token)
        types.append(kind)
    return tokens, scores, types


def _tensor_data(name: str, weight: torch.Tensor, gguf_type: str):
    """(array, raw dtype or None) in the requested type; 1-D tensors (norms) stay float32 as llama.cpp keeps them."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    data = weight.detach().float().cpu().numpy()
    if name.endswith("norm.weight"):
        data = data + np.float32(1.0)  # llama.cpp's RMSNorm multiplies by the weight alone: store Gemma's 1 + w
    if data.ndim == 1 or gguf_type == "f32":
        return data.astype(np.float32), None
    if gguf_type == "f16":
        return data.astype(np.float16), None
    if gguf_type == "bf16":
        return quantize(data, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    if data.shape[-1] % 32:
        log.warning("%s: rows of %d values do not fill Q8_0 blocks of 32; stored as f16", name, data.shape[-1])
        return data.astype(np.float16), None
    return quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0


def write_gguf(state: dict[str, torch.Tensor], config: ModelConfig, tokenizer_path: Path, template: str,
               path: Path, gguf_type: str = "f32", name: str = "medko", context_length: int = 131072) -> None:
    """One GGUF file holding exported weights (export_weights' names), the gemma3 metadata and the vocabulary."""
    import gguf

    if problems := llama_cpp_problems(config):
        raise MedkoError("llama.cpp's gemma3 would compute another model: " + "; ".join(problems))
    tokens, scores, types = gguf_vocab(tokenizer_path, config.vocab_size)
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.global_rope_theta)
    writer.add_sliding_window(config.sliding_window)
    if config.global_rope_scaling != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.global_rope_scaling)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_unk_token_id(tokens.index("<unk>") if "<unk>" in tokens else 3)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_sep_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(template)
    for hf_name, weight in state.items():
        data, raw = _tensor_data(hf_name, weight, gguf_type)
        writer.add_tensor(gguf_tensor_name(hf_name), data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
