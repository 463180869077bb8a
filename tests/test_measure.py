"""Measurements stream their texts in bounded batches, so peak memory does not grow with the held-out data."""
import pytest
import torch

from engine.adapters import add_lora
from engine.measures import losses_and_drift


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
    batched = losses_and_drift(tiny_model, tiny_tokenizer, texts, 64, batch_size=4)
    assert max(widths) <= 4 and sum(widths) == 2 * len(texts)  # student and teacher passes, 4 texts at a time
    whole = losses_and_drift(tiny_model, tiny_tokenizer, texts, 64, batch_size=len(texts))
    assert all(d > 0 for d in batched[1])
    for a, b in zip(batched, whole):
        assert a == pytest.approx(b, rel=1e-5)
