"""Measurements stream their texts in bounded batches, so peak memory does not grow with the held-out data."""
import json

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


def test_a_model_that_is_its_own_teacher_has_zero_drift_without_a_teacher_pass(tiny_model, tiny_tokenizer,
                                                                                 monkeypatch):
    from engine.adapters import is_teacher

    texts = [f"text number {i} " * (1 + i % 3) for i in range(6)]
    assert is_teacher(tiny_model)
    add_lora(tiny_model, "lora1", rank=2, alpha=4.0)  # zero at the start: the same logits, the drift computed
    assert not is_teacher(tiny_model)
    computed = losses_and_drift(tiny_model, tiny_tokenizer, texts, 64)
    assert max(computed[1]) < 1e-6
    for m in tiny_model.modules():  # every adapter off: its own teacher again
        if hasattr(m, "active"):
            m.active.clear()
    assert is_teacher(tiny_model)
    passes = []
    forward = type(tiny_model).forward
    monkeypatch.setattr(type(tiny_model), "forward", lambda self, *a, **k: passes.append(1) or forward(self, *a, **k))
    skipped = losses_and_drift(tiny_model, tiny_tokenizer, texts, 64)
    assert len(passes) == 1 and skipped[1] == [0.0] * len(texts)  # the student's pass only
    assert skipped[0] == pytest.approx(computed[0], rel=1e-6)


def test_english_loss_part_is_en_text_loss_without_the_teacher_pass(tiny_model, tiny_tokenizer, tmp_path,
                                                                     monkeypatch):
    import shared_logic as sl

    add_lora(tiny_model, "lora1", rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in tiny_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a student that differs from its teacher: en_text makes a teacher pass
    texts = [f"held-out text {i} " * (1 + i % 3) for i in range(5)]
    data = sl.RunData({}, [], [], [], [], texts, [], [])
    opts = sl.StageOptions(run_dir=str(tmp_path), max_len=64)
    full = sl.measure(tiny_model, tiny_tokenizer, tmp_path, data, opts, ("en_text",))
    passes = []
    forward = type(tiny_model).forward
    monkeypatch.setattr(type(tiny_model), "forward", lambda self, *a, **k: passes.append(1) or forward(self, *a, **k))
    loss_only = sl.measure(tiny_model, tiny_tokenizer, tmp_path, data, opts, ("en_loss",))
    assert set(loss_only) == {"en_loss", "en_losses"} and len(passes) == 1  # one batch, the student's pass only
    assert full["drift"] > 0 and loss_only["en_losses"] == pytest.approx(full["en_losses"], abs=2e-6)


def test_drift_from_a_snapshot_teacher_holds_in_every_batch(tiny_model, tiny_tokenizer):
    """The teacher is the named snapshot in every batch, not only the first (a teacher pass once overwrote the
    snapshot's name, so later batches compared with the bare base), and BASE names the bare base."""
    from engine.adapters import snapshot_adapter
    from engine.measures import BASE

    add_lora(tiny_model, "lora1", rank=2, alpha=4.0)
    lora_b = [p for name, p in tiny_model.named_parameters() if "lora_B" in name]
    with torch.no_grad():
        for p in lora_b:
            p.normal_(0, 0.3)  # the teacher's lora1: far from the base
    snapshot_adapter(tiny_model, "lora1", "teacher")
    with torch.no_grad():
        for p in lora_b:
            p.add_(torch.randn_like(p) * 0.01)  # the student: close to its teacher
    texts = [f"text number {i} " * (1 + i % 3) for i in range(10)]
    batched = losses_and_drift(tiny_model, tiny_tokenizer, texts, 64, batch_size=3)
    whole = losses_and_drift(tiny_model, tiny_tokenizer, texts, 64, batch_size=len(texts))
    assert batched[1] == pytest.approx(whole[1], rel=1e-5)
    from_base = losses_and_drift(tiny_model, tiny_tokenizer, texts, 64, batch_size=3, teacher=BASE)[1]
    assert all(b > 5 * s for b, s in zip(from_base, batched[1]))  # every batch's texts, the last included


def test_held_out_texts_read_from_a_file_are_read_a_chunk_at_a_time(tiny_model, tiny_tokenizer, tmp_path):
    """A run's held-out sets are rows of s0's files (engine.rows); a measurement reads them in slices, never whole."""
    from engine.data import lazy_rows
    from engine.measures import text_losses
    from engine.rows import View

    class Sliced(View):
        def __init__(self, rows):
            self.rows, self.largest = rows, 0

        def __len__(self):
            return len(self.rows)

        def _one(self, k):
            return self.rows[k]

        def _range(self, start, stop):
            self.largest = max(self.largest, stop - start)
            return self.rows[start:stop]

        def __iter__(self):
            raise AssertionError("the held-out texts were read whole")

    path = tmp_path / "ko_heldout.jsonl"
    path.write_text("".join(json.dumps({"text": f"본문 {i} " * (1 + i % 3)}, ensure_ascii=False) + "\n"
                            for i in range(150)), "utf-8")
    rows = lazy_rows(path, "text")
    texts = list(rows)
    sliced = Sliced(rows)
    losses = text_losses(tiny_model, tiny_tokenizer, sliced, 64)
    assert sliced.largest <= 64 < len(texts)
    assert losses == pytest.approx(text_losses(tiny_model, tiny_tokenizer, texts, 64), rel=1e-6)
