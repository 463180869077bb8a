"""The harness prompt, answer extraction, batched scoring against naive loops, reports and translation."""
import json
from dataclasses import replace

import pytest
import torch

import engine.evaluate
from engine.checkpoints import load_model
from engine.data import MCQ
from engine.errors import MedkoError
from engine.evaluate import STOP_STRINGS, agreement, evaluate, extract_answer, format_table, letter_scores, letter_token_ids, macro_f1, mcq_prompt, translate, translate_mcqs, translation_prompt, write_report
from engine.generate import generate


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir)


def mcq(i: str, question: str, answer: str = "A", letters: str = "ABCDE", subset: str = "doctor") -> MCQ:
    return MCQ(i, subset, question, {letter: f"option {letter.lower()}{i}" for letter in letters}, answer)


ROWS = [
    mcq("q0", "Which is it?", "B"),
    mcq("q1", "A much longer question that runs well past the sliding window of the tiny model, twice over?", "E"),
    mcq("q2", "Four options only?", "D", letters="ABCD", subset="nurse"),
    mcq("q3", "정답은 무엇인가?", "C", subset="nurse"),
    mcq("q4", "x", "A"),
]


# ── prompt ──

def test_prompt_is_the_harness_format():
    row = MCQ("d/0", "doctor", "  가장 적절한 약물은?\n", dict(zip("ABCDE", ["아스피린", "와파린", "헤파린", "디곡신", "없음"])), "B")
    assert mcq_prompt(row) == "가장 적절한 약물은?\nA. 아스피린\nB. 와파린\nC. 헤파린\nD. 디곡신\nE. 없음\n정답："
    assert mcq_prompt(row).endswith("\uff1a")
    four = MCQ("m/0", "medqa", "Best drug?", dict(zip("ABCD", "wxyz")), "C", lang="en")
    assert mcq_prompt(four, "en") == "Best drug?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    shots = [MCQ("f/0", "doctor", "첫째?", dict(zip("ABCDE", "12345")), "E"),
             MCQ("f/1", "doctor", "둘째?", dict(zip("ABCDE", "12345")), "A")]
    assert mcq_prompt(four, "ko", fewshot=shots) == (
        "첫째?\nA. 1\nB. 2\nC. 3\nD. 4\nE. 5\n정답： E\n\n"
        "둘째?\nA. 1\nB. 2\nC. 3\nD. 4\nE. 5\n정답： A\n\n"
        "Best drug?\nA. w\nB. x\nC. y\nD. z\n정답：")
    assert mcq_prompt(four, "en", chat=True) == (
        "<start_of_turn>user\nBest drug?\nA. w\nB. x\nC. y\nD. z\nAnswer:<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(MedkoError, match="unknown language 'kr'"):
        mcq_prompt(four, "kr")


# ── extraction ──

@pytest.mark.parametrize("output, expected", [
    (" C", "C"),
    ("정답: C", "C"),
    ("정답：C", "C"),
    ("정답：C, A는 오답", "C"),  # full-width colon in the first pattern; else the last bare letter, A, would win
    ("정답 D", "D"),
    ("정답은 C입니다", "C"),
    ("정답은 C 입니다", "C"),
    ("정답은C입니다", "C"),
    ("정답은C", None),  # Hangul is a word character for Python's \b, and 입니다 is missing
    ("C입니다", None),  # same: no word boundary between C and 입
    ("C. 아픽사반", "C"),
    ("A. 아스피린\nC. 아픽사반", "C"),  # several letters: the last wins
    ("B and then D", "D"),
    ("A. foo\n정답: E", "E"),  # an earlier pattern beats later ones
    ("(B)", "B"),
    ("c", None),  # lower case never matches
    ("the answer is a", None),
    ("DEAD BEEF CAFE", None),  # E inside words: \b
    ("Each Bed", None),
    ("잘 모르겠습니다", None),
    ("", None),
])
def test_extraction_cascade(output, expected):
    assert extract_answer(output) == expected


# ── letter tokens ──

def test_letter_tokens_are_single_and_spaced_after_a_raw_prompt(tiny_tokenizer):
    assert letter_token_ids(tiny_tokenizer, chat=False) == [tiny_tokenizer.token_id(f"▁{x}") for x in "ABCDE"]
    assert letter_token_ids(tiny_tokenizer, chat=True) == [tiny_tokenizer.token_id(x) for x in "ABCDE"]

    class SplitsE:
        def encode(self, text, bos=True):
            return [7, 8] if "E" in text else [7]

    with pytest.raises(MedkoError, match="answer letter 'E' is 2 tokens"):
        letter_token_ids(SplitsE(), chat=False)


# ── logits mode ──

def naive_scores(model, tokenizer, prompts, chat):
    letters = letter_token_ids(tokenizer, chat)
    with torch.no_grad():
        return torch.stack([model(torch.tensor([tokenizer.encode(p)])).logits[0, -1, letters] for p in prompts])


@pytest.mark.parametrize("chat, shots", [(False, 0), (True, 2)])
def test_batched_logits_equal_a_naive_loop(model, tiny_tokenizer, chat, shots):
    fewshot = [mcq("f0", "Shot one?", "D"), mcq("f1", "Shot two?", "B", subset="nurse")][:shots]
    report = evaluate(model, tiny_tokenizer, ROWS, "logits", "en", chat, fewshot, batch_size=2, progress=False)
    prompts = [mcq_prompt(r, "en", chat, [f for f in fewshot if f.subset == r.subset]) for r in ROWS]
    assert len({len(tiny_tokenizer.encode(p)) for p in prompts}) == len(ROWS)  # every batch is padded
    expected = naive_scores(model, tiny_tokenizer, prompts, chat)
    got = letter_scores(model, tiny_tokenizer, prompts, chat, batch_size=2)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    naive_preds = ["ABCDE"[s[:len(r.options)].argmax()] for s, r in zip(expected, ROWS)]
    assert [p["pred"] for p in report.predictions] == naive_preds
    assert report.format_compliance is None and "output" not in report.predictions[0]


def test_four_option_rows_never_predict_e(model, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(engine.evaluate, "letter_scores", lambda *a, **k: torch.tensor([[0.0, 1, 2, 3, 9]] * len(ROWS)))
    report = evaluate(model, tiny_tokenizer, ROWS, progress=False)
    assert [p["pred"] for p in report.predictions] == ["E", "E", "D", "E", "E"]


# ── generate mode ──

def test_generate_batched_equals_unbatched(model, tiny_tokenizer):
    together = evaluate(model, tiny_tokenizer, ROWS, "generate", "ko", batch_size=4, max_new_tokens=6,
                           progress=False)
    alone = evaluate(model, tiny_tokenizer, ROWS, "generate", "ko", batch_size=1, max_new_tokens=6,
                        progress=False)
    assert together.predictions == alone.predictions
    for p in together.predictions:
        assert p["pred"] == extract_answer(p["output"])
        assert not any(stop in p["output"] for stop in STOP_STRINGS)
    found = sum(p["pred"] is not None for p in together.predictions)
    assert together.format_compliance == found / len(ROWS)


def test_generate_mode_extracts_from_each_output(model, tiny_tokenizer, monkeypatch):
    seen = {}

    def canned(model, tokenizer, prompts, max_new_tokens, stop, batch_size, progress):
        seen.update(prompts=prompts, stop=stop, max_new_tokens=max_new_tokens)
        return [" B", "E", "모르겠다", "정답은 C입니다", "a"]

    monkeypatch.setattr(engine.evaluate, "generate", canned)
    report = evaluate(model, tiny_tokenizer, ROWS, "generate", "ko", max_new_tokens=9, progress=False)
    assert seen["stop"] == ("Q:", "</s>", "<|im_end|>", ".", "\n\n") and seen["max_new_tokens"] == 9
    assert seen["prompts"] == [mcq_prompt(r, "ko") for r in ROWS]
    assert [p["pred"] for p in report.predictions] == ["B", "E", None, "C", None]
    assert [p["correct"] for p in report.predictions] == [True, True, False, True, False]
    assert report.format_compliance == 3 / 5 and report.accuracy == 3 / 5


# ── windows ──

SCORERS = {"logits": "letter_scores", "cloze": "cloze_logprobs", "generate": "generate"}


@pytest.mark.parametrize("mode", ["logits", "cloze", "generate"])
def test_a_split_scored_a_window_at_a_time_is_scored_as_a_whole(model, tiny_tokenizer, monkeypatch, mode):
    rows = [replace(r, id=f"{r.id}.{k}") for k in range(3) for r in ROWS]  # 15 rows
    whole = evaluate(model, tiny_tokenizer, rows, mode, "ko", batch_size=4, max_new_tokens=4, progress=False)
    seen = []
    real = getattr(engine.evaluate, SCORERS[mode])

    def counting(model, tokenizer, items, *args):
        seen.append(len(items))
        return real(model, tokenizer, items, *args)

    monkeypatch.setattr(engine.evaluate, SCORERS[mode], counting)
    monkeypatch.setattr(engine.evaluate, "WINDOW", 4)
    kept = []
    windowed = evaluate(model, tiny_tokenizer, rows, mode, "ko", batch_size=4, max_new_tokens=4, progress=True,
                        sink=kept.append)
    assert seen == [4, 4, 4, 3]  # the scorer never holds more than a window of prompts
    assert windowed.predictions == [] and len(kept) == len(rows)  # the sink took every entry, in row order
    for a, b in zip(kept, whole.predictions):
        assert {**a, "scores": None} == {**b, "scores": None}
        for kind, values in a.get("scores", {}).items():  # cloze: batched otherwise, equal to float32 rounding
            assert values == pytest.approx(b["scores"][kind], rel=1e-4), kind
    for field in ("n", "accuracy", "subsets", "macro_f1", "format_compliance"):
        assert getattr(windowed, field) == getattr(whole, field), field


def test_reasoning_is_generated_a_window_at_a_time(model, tiny_tokenizer, monkeypatch):
    import engine.reasoning

    whole = engine.reasoning.reasoning_eval(model, tiny_tokenizer, ROWS, 4)
    seen = []
    real = engine.reasoning.generate
    monkeypatch.setattr(engine.reasoning, "generate",
                        lambda model, tok, prompts, *a, **k: seen.append(len(prompts)) or real(model, tok, prompts, *a, **k))
    monkeypatch.setattr(engine.evaluate, "WINDOW", 2)
    assert engine.reasoning.reasoning_eval(model, tiny_tokenizer, ROWS, 4) == whole and seen == [2, 2, 1]


# ── report ──

def test_report_fields_order_and_atomic_json(model, tiny_tokenizer, tmp_path, monkeypatch):
    preds = torch.tensor([[9.0, 0, 0, 0, 0], [0, 0, 0, 0, 9], [0, 0, 0, 9, 0], [9, 0, 0, 0, 0], [9, 0, 0, 0, 0]])
    monkeypatch.setattr(engine.evaluate, "letter_scores", lambda *a, **k: preds)
    report = evaluate(model, tiny_tokenizer, ROWS, progress=False, model_name="tiny")
    path = tmp_path / "reports" / "dev.json"
    write_report(report, path)
    assert [p.name for p in path.parent.iterdir()] == ["dev.json"]  # no temporary file left behind
    data = json.loads(path.read_text(encoding="utf-8"))
    assert list(data) == ["model", "mode", "lang", "chat", "fewshot", "n", "accuracy", "subsets", "macro_f1",
                          "format_compliance", "seconds", "questions_per_second", "predictions", "extraction"]
    assert data["predictions"] == [
        {"id": "q0", "subset": "doctor", "gold": "B", "pred": "A", "correct": False},
        {"id": "q1", "subset": "doctor", "gold": "E", "pred": "E", "correct": True},
        {"id": "q2", "subset": "nurse", "gold": "D", "pred": "D", "correct": True},
        {"id": "q3", "subset": "nurse", "gold": "C", "pred": "A", "correct": False},
        {"id": "q4", "subset": "doctor", "gold": "A", "pred": "A", "correct": True},
    ]
    assert data["n"] == 5 and data["accuracy"] == 3 / 5 and data["model"] == "tiny"
    assert data["subsets"] == {"doctor": {"n": 3, "accuracy": 2 / 3}, "nurse": {"n": 2, "accuracy": 0.5}}
    # F1 per letter: A 2/4, B 0, C 0, D 1, E 1.
    assert data["macro_f1"] == pytest.approx((0.5 + 0 + 0 + 1 + 1) / 5)
    assert data["questions_per_second"] > 0
    assert format_table(report).splitlines() == [
        "subset           n  accuracy", "doctor           3    0.6667", "nurse            2    0.5000",
        "all              5    0.6000"]
    assert agreement(report, data) == 1.0
    other = json.loads(json.dumps(data))
    other["predictions"][0]["pred"] = None
    other["predictions"] = other["predictions"][:4] + [{"id": "extra", "pred": "A"}]
    assert agreement(report, other) == 3 / 4


def test_macro_f1_and_unanswered_questions():
    assert macro_f1(["A", "B"], ["A", "B"]) == 1.0
    assert macro_f1(["A", "B"], [None, None]) == 0.0
    assert macro_f1(["A", "A"], ["A", "B"]) == pytest.approx((2 / 3 + 0) / 2)


# ── translation ──

def test_translation_prompt_is_fixed():
    assert translation_prompt("두통", "en") == (
        "Korean: 만성 신장병 환자에서는 칼륨 섭취를 제한해야 한다.\n"
        "English: Patients with chronic kidney disease should limit their potassium intake.\n\n"
        "Korean: 다음 중 가장 적절한 초기 치료는?\n"
        "English: Which of the following is the most appropriate initial treatment?\n\n"
        "Korean: 두통\nEnglish:")
    assert translation_prompt("headache", "ko").endswith("\n\nEnglish: headache\nKorean:")
    assert translation_prompt("두통", "en", chat=True).startswith("<start_of_turn>user\nTranslate this Korean")


def test_translation_cache_resumes_after_an_interruption(model, tiny_tokenizer, tmp_path, monkeypatch):
    texts = ["첫 줄\n둘째 줄", "셋째", "넷째 문장", "첫 줄", "", "다섯\n\n여섯"]
    plain = translate(model, tiny_tokenizer, texts, "en", batch_size=2, max_new_tokens=4, model_id="tiny")
    assert [t.count("\n") for t in plain] == [1, 0, 0, 0, 0, 2] and plain[4] == ""
    assert plain[3] == plain[0].split("\n")[0]  # a repeated line is translated once

    real_generate, calls = generate, []

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(engine.evaluate, "generate", counted)
    cache = tmp_path / "cache.jsonl"
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        translate(model, tiny_tokenizer, texts, "en", cache, 2, 4, model_id="tiny")
    assert len(cache.read_text(encoding="utf-8").splitlines()) == 2  # the first batch was kept
    interrupt, calls[:] = False, []
    assert translate(model, tiny_tokenizer, texts, "en", cache, 2, 4, model_id="tiny") == plain
    assert sum(calls) == 6 - 2  # six distinct lines, two were cached
    calls[:] = []
    assert translate(model, tiny_tokenizer, texts, "en", cache, 2, 4, model_id="tiny") == plain
    assert calls == []
    translate(model, tiny_tokenizer, texts[:1], "en", cache, 2, 4, model_id="other model")
    assert sum(calls) == 2  # another model id misses the cache


def test_translate_mcqs_keeps_ids_and_answers(model, tiny_tokenizer):
    rows = ROWS[2:4]
    out = translate_mcqs(rows, model, tiny_tokenizer, "ko", max_new_tokens=3, model_id="tiny")
    assert [(r.id, r.subset, r.answer, list(r.options), r.lang) for r in out] == \
        [(r.id, r.subset, r.answer, list(r.options), "ko") for r in rows]


def test_translate_mcqs_in_chunks_gives_the_same_rows_with_one_chunk_of_bookkeeping(model, tiny_tokenizer,
                                                                                    monkeypatch, tmp_path):
    import tracemalloc

    from engine import evaluate

    whole = list(translate_mcqs(ROWS, model, tiny_tokenizer, "en", chunk=len(ROWS), max_new_tokens=3,
                                model_id="tiny"))
    cache = tmp_path / "cache.jsonl"
    assert list(translate_mcqs(ROWS, model, tiny_tokenizer, "en", chunk=1, max_new_tokens=3, model_id="tiny",
                               cache_path=cache)) == whole
    reads, index = [], evaluate.TranslationCache
    monkeypatch.setattr(evaluate, "TranslationCache", lambda path: reads.append(path) or index(path))
    monkeypatch.setattr(evaluate, "generate", lambda *a: pytest.fail("every line is in the cache"))
    assert list(translate_mcqs(ROWS, None, tiny_tokenizer, "en", chunk=1, max_new_tokens=3, model_id="tiny",
                               cache_path=cache)) == whole
    assert reads == [cache]  # once for all chunks, not once a chunk
    # Bookkeeping (prompts, keys, budgets) is held for one chunk at a time: an echo in place of the model
    monkeypatch.setattr(evaluate, "generate", lambda model, tok, prompts, *a: [p[-8:] for p in prompts])
    rows = [replace(ROWS[0], id=f"q{i}", question=f"{i} " + ROWS[0].question * 4,
                    options={k: f"{i} {v}" for k, v in ROWS[0].options.items()}) for i in range(2000)]

    def peak(chunk: int) -> int:
        tracemalloc.start()
        for _ in translate_mcqs(rows, None, tiny_tokenizer, "en", chunk=chunk, model_id="echo"):
            pass
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    assert peak(64) * 3 < peak(len(rows))  # 2.9 against 14.1 MB when written


def test_harness_extraction_is_lm_eval_v3s_ignorecase_cascade():
    assert extract_answer("a. 정답은 b") is None  # ours: no IGNORECASE, the article "a" is never an answer
    assert extract_answer("a. 정답은 b", "harness") == "A"
    assert extract_answer("정답: c", "harness") == "C" and extract_answer("정답：C", "harness") == "C"
    assert extract_answer("nothing here", "harness") is None
    with pytest.raises(MedkoError, match="unknown extraction"):
        extract_answer("A", "other")


def test_generate_mode_defaults_to_the_harness_budget_and_records_the_extraction(model, tiny_tokenizer, monkeypatch):
    import inspect

    import medko

    seen = {}

    def canned(model_, tokenizer, prompts, max_new_tokens, stop, batch_size, progress):
        seen["max_new_tokens"], seen["stop"] = max_new_tokens, stop
        return ["answer: b"] * len(prompts)

    monkeypatch.setattr(engine.evaluate, "generate", canned)
    report = evaluate(model, tiny_tokenizer, ROWS, "generate", "ko", progress=False, extraction="harness")
    assert seen == {"max_new_tokens": 1024, "stop": STOP_STRINGS}
    assert report.extraction == "harness" and {p["pred"] for p in report.predictions} == {"B"}
    assert evaluate(model, tiny_tokenizer, ROWS, "logits", "ko", progress=False).extraction is None
    args = medko.build_parser().parse_args(["eval"])
    assert args.max_new_tokens == 1024 and args.extraction == "medko"
    assert inspect.signature(evaluate).parameters["max_new_tokens"].default == 1024


def test_translation_budget_follows_the_source_and_failures_are_counted(model, tiny_tokenizer, monkeypatch):
    budgets = []
    replies = {"short": "", "mid line": "zzzzzz", "a longer line of text": " ".join(f"w{i}" for i in range(200))}

    def canned(model_, tokenizer, prompts, max_new_tokens, stop, batch_size):
        budgets.append(max_new_tokens)
        return [next(v for k, v in replies.items() if p.rstrip().endswith(f"Korean: {k}\nEnglish:")) for p in prompts]

    monkeypatch.setattr(engine.evaluate, "generate", canned)
    stats = {}
    out = translate(model, tiny_tokenizer, list(replies), "en", batch_size=1, model_id="m", stats=stats)
    expected = sorted(2 * len(tiny_tokenizer.encode(k, bos=False)) + 16 for k in replies)
    assert sorted(budgets) == expected  # twice the source tokens plus a margin, not a fixed 96
    assert out[:2] == ["short", "mid line"]  # empty and degenerate translations keep their source
    assert stats == {"lines": 3, "hit_budget": 1, "empty": 1, "degenerate": 1}


def test_fewshot_questions_are_left_out_of_dev_scoring(tiny_dir, tmp_path):
    import medko
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "data" / "kormedmcqa" / "doctor"
    root = tmp_path / "kormedmcqa" / "doctor"
    root.mkdir(parents=True)
    dev = (data / "dev.jsonl").read_text().splitlines()
    (root / "dev.jsonl").write_text("\n".join(dev) + "\n")
    (root / "fewshot.jsonl").write_text("\n".join(dev[:2]) + "\n")  # as on the hub: shots are dev questions
    out = tmp_path / "r.json"
    assert medko.main(["eval", "--model", str(tiny_dir), "--data", str(tmp_path / "kormedmcqa"), "--subsets",
                       "doctor", "--split", "dev", "--fewshot", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == len(dev) - 1 and report["left_out_as_shots"] == ["doctor/dev/0000"]
    assert "doctor/dev/0000" not in {p["id"] for p in report["predictions"]}
