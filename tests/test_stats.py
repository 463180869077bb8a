"""The statistics every report number carries, on cases with known answers, and the strict answer-line check."""
import math

import pytest

from engine.evaluate import strict_answer
from engine.stats import (MET, NOISE, NOT_MET, bootstrap_difference, bootstrap_mean, bound_verdict, change_verdict,
                          chrf, mcnemar, paired_accuracy_verdict, wilson)


def closed_form_wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (2 * n * p + z * z) / (2 * (n + z * z))
    half = z * math.sqrt(z * z + 4 * n * p * (1 - p)) / (2 * (n + z * z))
    return centre - half, centre + half


@pytest.mark.parametrize("k", [0, 12, 24])
def test_wilson_matches_the_closed_form_at_24_questions(k):
    low, high = wilson(k, 24)
    ref_low, ref_high = closed_form_wilson(k, 24)
    assert low == pytest.approx(max(0.0, ref_low), abs=1e-12) and high == pytest.approx(min(1.0, ref_high), abs=1e-12)


def test_wilson_known_values():
    assert wilson(0, 24) == (0.0, pytest.approx(0.1380, abs=1e-4))
    assert wilson(24, 24) == (pytest.approx(0.8620, abs=1e-4), 1.0)
    low, high = wilson(12, 24)
    assert (low, high) == (pytest.approx(0.3143, abs=1e-4), pytest.approx(0.6857, abs=1e-4))
    assert wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_on_a_constructed_table():
    # 10 questions right both times, 5 wrong both times, 1 gained, 6 lost: p = 2 * P(X <= 1 | n=7, 1/2) = 16/128.
    before = [True] * 10 + [False] * 5 + [False] * 1 + [True] * 6
    after = [True] * 10 + [False] * 5 + [True] * 1 + [False] * 6
    result = mcnemar(before, after)
    assert (result["gained"], result["lost"]) == (1, 6)
    assert result["p"] == pytest.approx(16 / 128)
    assert mcnemar([True, False], [True, False])["p"] == 1.0
    assert mcnemar([False] * 8, [True] * 8)["p"] == pytest.approx(2 / 256)
    assert paired_accuracy_verdict([False] * 8, [True] * 8)[1] == MET
    assert paired_accuracy_verdict([True] * 8, [False] * 8)[1] == NOT_MET
    assert paired_accuracy_verdict(before, after)[1] == NOISE


def test_bootstrap_on_constant_data_has_no_width():
    assert bootstrap_mean([2.5] * 40) == (2.5, 2.5)
    diff = bootstrap_difference([3.0] * 40, [2.0] * 40)
    assert (diff["change"], diff["low"], diff["high"]) == (-1.0, -1.0, -1.0)
    assert change_verdict(diff["low"], diff["high"], "down") == MET


def test_bootstrap_is_seeded_and_covers_the_mean():
    values = [float(i % 7) for i in range(50)]
    assert bootstrap_mean(values, seed=3) == bootstrap_mean(values, seed=3)
    low, high = bootstrap_mean(values)
    assert low < sum(values) / len(values) < high


def test_verdicts_call_an_interval_across_zero_or_the_bound_noise():
    assert change_verdict(-0.2, 0.1, "down") == NOISE
    assert change_verdict(0.1, 0.3, "down") == NOT_MET
    assert change_verdict(0.1, 0.3, "up") == MET
    assert bound_verdict(0.01, 0.04, 0.05, "below") == MET
    assert bound_verdict(0.03, 0.07, 0.05, "below") == NOISE
    assert bound_verdict(0.06, 0.07, 0.05, "below") == NOT_MET
    assert bound_verdict(0.93, 1.0, 0.9, "above") == MET


def test_chrf_on_a_hand_computed_case():
    # "ab" vs "abc": order 1: 2 matches, P 2/2, R 2/3; order 2: 1 match, P 1/1, R 1/2; orders 3-6 absent in the
    # hypothesis. Mean P = 1, mean R = 7/12; chrF(beta 2) = 5 * 1 * (7/12) / (4 + 7/12).
    assert chrf(["a b"], ["abc"]) == pytest.approx(100 * 5 * (7 / 12) / (4 + 7 / 12))
    assert chrf(["the same text"], ["the same text"]) == pytest.approx(100)
    assert chrf(["xyz"], ["abc"]) == 0.0


@pytest.mark.parametrize("output", ["비타민 A가 원인이다", "E. coli", "A. 아스피린\nB. 헤파린\nC. 와파린\nD. 디곡신\nE. 아미오다론",
                                    "정답： C 그리고 설명", "정답： B\n정답： C", "정답: B라고 보면\n정답： C", "풀이 없이 C",
                                    '"정답： C"'])
def test_strict_answer_line_refuses_what_is_not_the_trained_line(output):
    assert strict_answer(output) is None


def test_strict_answer_line_accepts_the_trained_line():
    assert strict_answer("하벽 경색은 우관상동맥이 흔하다.\n정답： C") == "C"
    assert strict_answer("정답：D\n") == "D"
    # A word that holds 정답 is not the cue (the 270M wrote this after s5, and it was once counted as a second cue)
    assert strict_answer("비판막성 심방세동은 비정답이다. 비정답은 '아스피린'이다.\n정답： C") == "C"


def test_per_text_losses_and_drift(tiny_model, tiny_tokenizer):
    import torch

    from engine.adapters import add_lora
    from engine.losses import causal_lm_loss
    from engine.measures import losses_and_drift, text_losses
    from engine.examples import collate, text_examples

    texts = ["Aspirin inhibits COX.", "ABC", "Heparin acts on antithrombin III within minutes."]
    losses = text_losses(tiny_model, tiny_tokenizer, texts, 64, batch_size=2)
    one = {k: v for k, v in collate(text_examples(tiny_tokenizer, texts[2:], 64)).items()}
    with torch.no_grad():
        hidden = tiny_model(one["input_ids"], one["attention_mask"], return_logits=False).hidden
        total, n = causal_lm_loss(tiny_model, hidden, one["input_ids"], one["target_mask"])
    assert losses[2] == pytest.approx(float(total) / n, rel=1e-5)
    same, drift = losses_and_drift(tiny_model, tiny_tokenizer, texts, 64, batch_size=2, positions=3)
    assert same == pytest.approx(losses, rel=1e-5) and drift == pytest.approx([0.0] * 3, abs=1e-6)
    add_lora(tiny_model, "lora1")
    with torch.no_grad():
        for name, p in tiny_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    _, drift = losses_and_drift(tiny_model, tiny_tokenizer, texts, 64)
    assert all(d > 0 for d in drift)


def test_english_guard_at_default_settings_passes_and_fails_above_noise():
    import shared_logic as sl

    o = sl.StageOptions()  # the defaults a plain `bash run.sh` uses
    floor = min(o.gate, 0.5)  # English dev accuracy as the model entered s2
    calm, drifted = [0.01] * 40, [0.3] * 40
    held = sl.guard_check([True] * 30 + [False] * 30, calm, floor, o.tolerance, o.drift_bound)
    assert held["passed"] and held["tolerance"] >= 1 / 60
    assert "95% CI 0.3" in held["line"] and "nats/token" in held["line"]
    one_down = sl.guard_check([True] * 29 + [False] * 31, calm, floor, o.tolerance, o.drift_bound)
    assert one_down["passed"]  # one question is inside the tolerance
    three_down = sl.guard_check([True] * 27 + [False] * 33, calm, floor, o.tolerance, o.drift_bound)
    assert not three_down["passed"] and not three_down["accuracy_ok"] and three_down["drift_ok"]
    drift_fails = sl.guard_check([True] * 30 + [False] * 30, drifted, floor, o.tolerance, o.drift_bound)
    assert not drift_fails["passed"] and drift_fails["accuracy_ok"] and not drift_fails["drift_ok"]
    assert "above 0.05" in drift_fails["line"]
    # Drift whose mean is past the bound but whose interval holds it is within noise, as the stage verdict says.
    straddles = sl.guard_check([True] * 30 + [False] * 30, [0.03, 0.075] * 20, floor, o.tolerance, o.drift_bound)
    assert straddles["drift"] > o.drift_bound and straddles["drift_ci"][0] < o.drift_bound < straddles["drift_ci"][1]
    assert straddles["passed"] and "within noise of 0.05" in straddles["line"]
    # On 24 questions a 0.02 tolerance would be finer than one question: it becomes one question.
    small = sl.guard_check([True] * 11 + [False] * 13, calm, floor, 0.02, o.drift_bound)
    assert small["tolerance"] == pytest.approx(1 / 24) and small["passed"]
