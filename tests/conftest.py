"""Shared fixtures: a tiny random Gemma 3 and its transformers twin."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shared_logic as sl  # noqa: E402


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, norms included, so a (1 + w) slip cannot hide behind zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "norm" in name else 0.08
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def tiny_config(**overrides) -> sl.ModelConfig:
    values = sl.asdict(sl.PRESETS["tiny"])
    values.update(overrides)
    return sl.ModelConfig(**values)


@pytest.fixture
def tiny_model() -> sl.Gemma3:
    torch.manual_seed(0)
    return randomize(sl.Gemma3(tiny_config())).eval()


def hf_twin(model: sl.Gemma3):
    """transformers' Gemma3ForCausalLM holding the same weights (test-only reference)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    hf_cfg = sl.config_to_hf(model.config)
    hf_cfg.pop("architectures"), hf_cfg.pop("model_type")
    hf = Gemma3ForCausalLM(Gemma3TextConfig(**hf_cfg, attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict(sl.export_state_dict(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    return hf
