"""Measurements stream their texts in bounded batches, so peak memory does not grow with the held-out data."""
import torch

import shared_logic as sl
from engine.adapters import add_lora


def test_drift_runs_in_bounded_batches_and_matches_one_batch(tiny_model, tiny_tokenizer, monkeypatch):
    add_lora(tiny_model, "lora1", rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in tiny_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a student that differs from its teacher
    texts = [f"text number {i} " * (1 + i % 3) for i in range(20)]
    widths = []
    forward = type(tiny_model).forward

    def recording(self, ids, *args, **kwargs):
        widths.append(ids.shape[0])
        return forward(self, ids, *args, **kwargs)

    monkeypatch.setattr(type(tiny_model), "forward", recording)
    batched = sl.drift(tiny_model, tiny_tokenizer, texts, "mse", 64)
    assert max(widths) <= sl.MEASURE_BATCH and sum(widths) == 2 * len(texts)  # student and teacher passes
    monkeypatch.setattr(sl, "MEASURE_BATCH", len(texts))
    whole = sl.drift(tiny_model, tiny_tokenizer, texts, "mse", 64)
    assert batched > 0 and abs(batched - whole) <= 1e-5 * whole
