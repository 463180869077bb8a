"""The curriculum's judgements: each stage's purpose decided above noise; s1.1's letter loss on exam rows and s5's
answer-line loss on reasoning rows."""
import pytest
import torch

import shared_logic as sl
from engine.data import MCQ
from engine.stats import MET, NOISE, NOT_MET
from engine.examples import collate


def measured(ko_losses, en_losses, drifts, en_correct):
    return {"ko_losses": ko_losses, "en_losses": en_losses, "drifts": drifts, "en_correct": en_correct}


def test_s3_purpose_is_met_only_when_korean_loss_falls_beyond_noise_and_english_holds():
    before = measured([3.0 + 0.01 * i for i in range(40)], [2.0] * 40, [0.0] * 40, [True] * 30 + [False] * 30)
    fell = measured([2.5 + 0.01 * i for i in range(40)], [2.0] * 40, [0.01] * 40, before["en_correct"])
    v = sl.stage_verdicts("s3", before, fell, drift_bound=0.05)
    assert v["verdict"] == MET and set(v["measures"]) == {"ko_losses", "drifts", "en_losses"}
    assert v["verdict_line"].startswith("purpose met") and "95% CI" in v["verdict_line"]
    noisy = measured([x + (0.3 if i % 2 else -0.3) for i, x in enumerate(before["ko_losses"])], [2.0] * 40,
                     [0.01] * 40, before["en_correct"])
    assert sl.stage_verdicts("s3", before, noisy, 0.05)["measures"]["ko_losses"]["verdict"] == NOISE
    drifted = measured(fell["ko_losses"], [2.2] * 40, [0.2] * 40, before["en_correct"])
    v = sl.stage_verdicts("s3", before, drifted, 0.05)
    assert v["verdict"] == NOT_MET and v["measures"]["drifts"]["verdict"] == NOT_MET
    assert v["measures"]["en_losses"]["verdict"] == NOT_MET


def test_s1_1_accuracy_gain_needs_mcnemar_and_s5_needs_strict_compliance_above_the_bar():
    before = {"en_correct": [False] * 60, "en_losses": [2.0] * 40}
    after = {"en_correct": [True] * 2 + [False] * 58, "en_losses": [1.9] * 40}
    v = sl.stage_verdicts("s1_1", before, after, 0.05)
    assert v["measures"]["en_correct"]["verdict"] == NOISE  # two questions gained: p = 0.5
    assert v["verdict"] == NOISE
    s5 = sl.stage_verdicts("s5", {"en_losses": [2.0] * 40}, {"reasoning_strict": [True] * 84, "drifts": [0.01] * 40,
                                                               "en_losses": [2.0] * 40}, 0.05)
    assert s5["verdict"] == MET and s5["measures"]["reasoning_strict"]["low"] > 0.9


def test_exam_rows_among_texts_carry_the_letter_loss(tiny_model, tiny_tokenizer):
    row = MCQ(id="x/train/0001", subset="x", question="Q?", options={L: L.lower() for L in "ABCDE"}, answer="C",
              lang="en")
    examples = sl.exam_examples(tiny_tokenizer, [row], "en", 64) + sl.text_examples(tiny_tokenizer, ["plain text."], 64)
    batch = collate(examples)
    letters = sl.letter_token_ids(tiny_tokenizer, chat=False)
    loss, count, metrics = sl.stage_loss("mse", 0.0, letters, every_row=False)(tiny_model, batch)
    plain, _, plain_metrics = sl.stage_loss("mse", 0.0)(tiny_model, batch)
    assert "letter" in metrics and "letter" not in plain_metrics
    assert float(loss.detach()) == pytest.approx(float(plain.detach()) + metrics["letter"] * count, rel=1e-5)
    with pytest.raises(sl.MedkoError, match="answer-letter"):
        sl.stage_loss("mse", 0.0, letters)(tiny_model, batch)
    assert torch.isfinite(loss)


def test_reasoning_rows_carry_the_answer_line_loss_of_their_last_tokens(tiny_model, tiny_tokenizer):
    """s5's answer-line loss is the mean cross-entropy of each row's answer line and EOS, weighted as one unit."""
    rows = [MCQ(id=f"x/train/{i}", subset="x", question=f"Q {i}?", options={L: L.lower() for L in "ABCDE"},
                answer="ACE"[i], reasoning="because " * (1 + 3 * i)) for i in range(3)]
    examples, _ = sl.reasoning_examples(tiny_tokenizer, rows, 128)
    batch = collate(examples)
    ending = sl.answer_line_tokens(tiny_tokenizer)
    letters = sl.letter_token_ids(tiny_tokenizer, chat=False)
    loss, count, metrics = sl.stage_loss("mse", 0.0, letters, ending=ending)(tiny_model, batch)
    plain, _, plain_metrics = sl.stage_loss("mse", 0.0, letters)(tiny_model, batch)
    assert "answer_line" not in plain_metrics
    assert float(loss.detach()) == pytest.approx(float(plain.detach()) + metrics["answer_line"] * count, rel=1e-5)
    with torch.no_grad():
        logits = tiny_model(batch["input_ids"], batch["attention_mask"]).logits
    by_hand = []
    for i, e in enumerate(examples):
        last = len(e.ids) - 1  # EOS
        assert tiny_tokenizer.decode(e.ids[last - ending + 1:last]).strip() == f"정답： {rows[i].answer}"
        by_hand += [torch.nn.functional.cross_entropy(logits[i, p], batch["input_ids"][i, p + 1])
                    for p in range(last - ending, last)]
    assert metrics["answer_line"] == pytest.approx(float(torch.stack(by_hand).mean()), rel=1e-5)


def test_held_out_sets_come_from_their_own_files_and_never_overlap_training(tmp_path):
    from engine.data import Pair
    from engine.spool import Spool

    spools = tmp_path / "spools"
    spools.mkdir()

    def spooled(role: str, kind: str, rows: list) -> Spool:
        return Spool(spools, role, kind).fill((row, "") for row in rows)

    def read(part: tuple) -> list:
        spool, rows = part
        return [spool.rows[i] for i in rows]

    rows = {"ko_text": spooled("ko_text", "text", ["가", "나"]), "en_text": spooled("en_text", "text", ["a", "b", "c"]),
            "pairs": spooled("pairs", "pair", [Pair("가", "a")])}
    (tmp_path / "ko_medical_text_heldout.jsonl").write_text('{"text": "다"}\n', encoding="utf-8")
    (tmp_path / "en_medical_text_heldout.jsonl").write_text('{"text": "d"}\n', encoding="utf-8")
    (tmp_path / "ko_en_pairs_heldout.jsonl").write_text('{"ko": "나", "en": "b"}\n', encoding="utf-8")
    held = sl.held_out_sets(str(tmp_path), rows, spools)
    assert [read(part) for part in held["ko_text"]] == [["가", "나"], ["다"]]
    assert [read(part) for part in held["en_text"]] == [["a", "b", "c"], ["d"]]
    assert [p.src for p in read(held["pairs"][1])] == ["나"]
    on_hub = sl.held_out_sets("hub", rows, spools)["en_text"]  # no files on the hub: the last tenth
    assert [read(part) for part in on_hub] == [["a"], ["b", "c"]]
    (tmp_path / "en_medical_text_heldout.jsonl").write_text('{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(sl.MedkoError, match="shares 1 rows with the training set"):
        sl.held_out_sets(str(tmp_path), rows, spools)


def test_bundled_data_is_big_enough_and_its_held_out_sets_are_disjoint():
    from engine.data import load_kormedmcqa, load_pairs, load_reasoning, load_texts

    data = sl.DATA_DIR
    for name in ("ko_medical_text", "en_medical_text"):
        train, held = list(load_texts(data / f"{name}.jsonl")), list(load_texts(data / f"{name}_heldout.jsonl"))
        assert len(train) + len(held) >= 200 and len(held) >= 40 and not set(train) & set(held)
    pairs, held = list(load_pairs(data / "ko_en_pairs.jsonl")), list(load_pairs(data / "ko_en_pairs_heldout.jsonl"))
    assert len(pairs) + len(held) >= 200 and len(held) >= 40 and not {p.src for p in pairs} & {p.src for p in held}
    reasoning = list(load_reasoning(data / "reasoning_ko.jsonl"))
    assert len(reasoning) >= 100 and not any("정답" in r.reasoning for r in reasoning)  # only the answer line says it
    for split in ("dev", "test"):
        ko = list(load_kormedmcqa(["doctor", "nurse", "pharm", "dentist"], split, data / "kormedmcqa"))
        en = list(load_kormedmcqa(["doctor", "nurse", "pharm", "dentist"], split, data / "kormedmcqa_en", lang="en"))
        assert len(ko) >= 60 and [r.id for r in ko] == [r.id for r in en] and [r.answer for r in ko] == [r.answer for r in en]


def test_held_out_translation_takes_s1s_budget_when_no_limit_is_given(tiny_model, tiny_tokenizer, monkeypatch):
    from engine.data import Pair

    budgets = []
    import engine.measures

    real = engine.measures.generate
    monkeypatch.setattr(engine.measures, "generate", lambda m, t, p, n, *a, **k: budgets.append(n) or real(m, t, p, n, *a, **k))
    pairs = [Pair("고혈압", "hypertension"), Pair("당뇨병 환자의 혈당", "blood sugar of a diabetic")]
    longest = max(len(tiny_tokenizer.encode(p.src, bos=False)) for p in pairs)
    scores = sl.translation_scores(tiny_model, tiny_tokenizer, pairs)  # run.sh passes no --translate-tokens
    assert budgets == [2 * longest + engine.measures.TRANSLATION_MARGIN] and len(scores["chrf_pairs"]) == 2
    sl.translation_scores(tiny_model, tiny_tokenizer, pairs, 3)
    assert budgets[-1] == 3
