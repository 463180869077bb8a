"""Packed training rows: each example computes what it would alone, and a packed step equals an unpacked one."""
import pytest
import torch

import shared_logic as sl
from conftest import randomize, tiny_config
from engine.losses import causal_lm_loss
from engine.model import Gemma3
from engine.examples import collate, lm_examples, pack
from engine.trainer import TrainConfig, batch_at, set_trainable


@pytest.fixture
def model() -> Gemma3:
    torch.manual_seed(0)
    return randomize(Gemma3(tiny_config())).eval()


@pytest.fixture
def examples(tiny_tokenizer):
    # Lengths on both sides of the tiny model's sliding window (8), prompts masked.
    prompts = [f"Q{i}: {'why ' * (i % 5)}?" for i in range(9)]
    targets = [" " + "answer text " * (1 + i % 4) for i in range(9)]
    return lm_examples(tiny_tokenizer, prompts, targets, max_len=64)


def test_pack_fills_rows_and_numbers_the_examples(examples):
    batch = pack(examples, max_len=64)
    segments = batch["attention_mask"]
    assert segments.dtype == torch.long and len(segments) < len(examples)
    assert int((segments != 0).sum()) == sum(len(e.ids) for e in examples)
    assert int(batch["target_mask"].sum()) == sum(sum(e.target_mask) for e in examples)
    assert ((segments != 0).sum(1) <= 64).all()
    assert sorted(segments.max(1).values.tolist(), reverse=True)[0] >= 2  # several examples share a row


def test_packed_row_computes_each_example_as_alone(model, examples):
    batch = pack(examples, max_len=64)
    packed = model(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
    for row in range(len(batch["input_ids"])):
        segments = batch["attention_mask"][row]
        for k in range(1, int(segments.max()) + 1):
            where = (segments == k).nonzero().flatten()
            alone = model(batch["input_ids"][row, where][None], output_hidden_states=True)
            assert torch.allclose(packed.logits[row, where], alone.logits[0], rtol=1e-5, atol=1e-5)
            for p, a in zip(packed.hidden_states, alone.hidden_states):
                assert torch.allclose(p[row, where], a[0], rtol=1e-5, atol=1e-5)


def test_packed_loss_and_gradients_equal_unpacked(model, examples):
    set_trainable(model, ["layers.*.self_attn.q_proj.weight", "layers.1.mlp.*"])
    results = []
    for batch in (collate(examples), pack(examples, max_len=64)):
        model.zero_grad()
        hidden = model(batch["input_ids"], batch["attention_mask"], return_logits=False).hidden
        loss, n = causal_lm_loss(model, hidden, batch["input_ids"], batch["target_mask"])
        loss.backward()
        results.append((float(loss.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    (a, na, ga), (b, nb, gb) = results
    assert na == nb and abs(a - b) <= 1e-5 * abs(a)
    for key in ga:
        assert torch.allclose(ga[key], gb[key], rtol=1e-4, atol=1e-6), key


def test_stage_loss_with_letters_and_layer_loss_is_the_same_packed(model, tiny_tokenizer):
    rows = [sl.MCQ(f"r{i}", "doctor", f"q {i} " + "x" * i, dict(zip("ABCDE", "abcde")), "ABCDE"[i % 5],
                   reasoning="because " * (1 + i % 3)) for i in range(6)]
    reasoning, _ = sl.reasoning_examples(tiny_tokenizer, rows, 128)
    english = sl.text_examples(tiny_tokenizer, [f"english text {'y' * i}" for i in range(6)], 128)
    letters = sl.letter_token_ids(tiny_tokenizer, chat=False)
    loss_fn = sl.stage_loss("mse", 1.0, letters, ending=sl.answer_line_tokens(tiny_tokenizer))
    sums = []
    for packed in (False, True):
        config = TrainConfig(batch_size=6, max_len=128, pack=packed)
        batches = sl.mixed_batches(reasoning, english, config)(0, 0)
        loss, count, metrics = loss_fn(model, batches)
        sums.append((float(loss.detach()), count, metrics))
    (a, na, ma), (b, nb, mb) = sums
    assert na == nb and abs(a - b) <= 1e-5 * abs(a)
    for term in ("letter", "answer_line", "layer"):
        assert ma[term] == pytest.approx(mb[term], rel=1e-5), term


def test_packed_batches_hold_the_unpacked_examples_and_stay_pure(examples):
    config = TrainConfig(batch_size=4, max_len=64, seed=3)
    a, b = batch_at(examples, 2, 0, config), batch_at(examples, 2, 0, config)
    assert all(torch.equal(a[k], b[k]) for k in a)
    unpacked = batch_at(examples, 2, 0, TrainConfig(batch_size=4, max_len=64, seed=3, pack=False))
    assert sorted(a["input_ids"][a["attention_mask"] != 0].tolist()) == \
        sorted(unpacked["input_ids"][unpacked["attention_mask"]].tolist())


def test_english_batch_sets_the_english_texts_a_step_and_keeps_the_stream_pure(tiny_tokenizer):
    english = sl.text_examples(tiny_tokenizer, [f"english text {i}" for i in range(10)], 128)
    main = sl.text_examples(tiny_tokenizer, [f"korean text {i}" for i in range(10)], 128)
    config = TrainConfig(batch_size=4, max_len=128, pack=False, english_batch=2)
    batch = sl.mixed_batches(main, english, config)
    assert batch(3, 0)["input_ids"].shape[0] == 4 and batch(3, 0)["en_input_ids"].shape[0] == 2
    assert torch.equal(batch(3, 0)["en_input_ids"], batch(3, 0)["en_input_ids"])  # a pure function of the step
    assert sl.mixed_batches(main, english, TrainConfig(batch_size=4, max_len=128, pack=False))(3, 0)[
        "en_input_ids"].shape[0] == 4  # unset: as many as the stage's examples
    with pytest.raises(sl.MedkoError, match="english_batch"):
        TrainConfig(english_batch=0)
