"""The test split's report: each scoring's predictions in a file of their own, written as they are made and read
back as they were when the report held them inline."""
import json

import pytest

import engine.evaluate
from engine.checkpoints import load_model
from engine.compare import Side, compare, read_test_report, score_exams
from engine.data import MCQ
from engine.errors import MedkoError
from engine.evaluate import evaluate
from engine.files import write_json_atomic
from engine.report import _gap_section, _test_section
from engine.stats import language_agreement

KOREAN = [MCQ(f"q{i}", "doctor" if i % 2 else "nurse", f"{i}번 환자에게 가장 적절한 치료는?",
              {letter: f"{letter}{i} 치료" for letter in "ABCDE"}, "ABCDE"[i % 5]) for i in range(7)]
ENGLISH = [MCQ(r.id, r.subset, f"What is the best treatment for patient {i}?",
               {letter: f"treatment {letter}{i}" for letter in "ABCDE"}, r.answer) for i, r in enumerate(KOREAN)]
FILES = ["cloze_en.jsonl", "cloze_ko.jsonl", "logits_en.jsonl", "logits_ko.jsonl"]


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir)


def inline(report: dict) -> dict:
    """The report as it was written before predictions had files: each scoring's list inside it."""
    out = json.loads(json.dumps(report, default=list))
    for scored in [out] + [s for f in out["formulations"].values() for s in (f["ko"], f["en"])]:
        del scored["predictions_file"]
    return out


def test_predictions_go_to_files_and_read_back_as_they_were_inline(model, tiny_tokenizer, tmp_path):
    report = score_exams(model, tiny_tokenizer, KOREAN, ENGLISH, "cloze", {"q1", "q4"}, "tiny",
                         tmp_path / "test_predictions")
    write_json_atomic(report, tmp_path / "test_report.json")
    assert "\"predictions\":" not in json.dumps(report)  # none of them kept inline
    assert sorted(p.name for p in (tmp_path / "test_predictions").iterdir()) == FILES  # and no temporary file
    read = read_test_report(tmp_path / "test_report.json")
    for mode, scored in read["formulations"].items():
        for lang, rows in (("ko", KOREAN), ("en", ENGLISH)):
            expected = evaluate(model, tiny_tokenizer, rows, mode, lang, progress=False).predictions
            assert list(scored[lang]["predictions"]) == expected, (mode, lang)
            assert scored[lang]["predictions_file"] == f"test_predictions/{mode}_{lang}.jsonl"
        assert scored["languages"] == language_agreement(expected_ko := list(scored["ko"]["predictions"]),
                                                         list(scored["en"]["predictions"]))
        unseen = [p for p in expected_ko if p["id"] in {"q1", "q4"}]
        assert scored["languages_unseen"]["n"] == len(unseen) == 2
    assert list(read["predictions"]) == list(read["formulations"]["cloze"]["ko"]["predictions"])
    assert read["english"]["correct"] == [p["correct"] for p in read["formulations"]["cloze"]["en"]["predictions"]]
    # Everything that reads a test report reads the same from the files as from the old inline lists.
    old = inline(read)
    assert "predictions_file" not in json.dumps(old) and len(old["predictions"]) == len(KOREAN)
    rows = compare(Side("a", read), Side("b", read), ["q1", "q4"])
    assert rows == compare(Side("a", old), Side("b", old), ["q1", "q4"])
    assert "Korean cloze, answer not in Korean training text" in {r["measure"] for r in rows}
    assert _test_section(read) == _test_section(old)
    assert _gap_section({}, {}, read) == _gap_section({}, {}, old)
    write_json_atomic(old, tmp_path / "old.json")
    assert compare(Side("a", read_test_report(tmp_path / "old.json")), Side("b", read)) == compare(Side("a", old),
                                                                                                 Side("b", old))


def test_a_scoring_that_fails_leaves_no_file_behind(model, tiny_tokenizer, tmp_path, monkeypatch):
    def fail(*args):
        raise MedkoError("out of memory in the middle of the cloze scoring")

    monkeypatch.setattr(engine.evaluate, "cloze_logprobs", fail)
    with pytest.raises(MedkoError, match="cloze scoring"):
        score_exams(model, tiny_tokenizer, KOREAN, ENGLISH, "cloze", set(), "tiny", tmp_path / "test_predictions")
    # The scorings done are whole; the failed one left neither its file nor a temporary one.
    assert sorted(p.name for p in (tmp_path / "test_predictions").iterdir()) == ["logits_en.jsonl", "logits_ko.jsonl"]
    assert all(len(p.read_text().splitlines()) == len(KOREAN) for p in (tmp_path / "test_predictions").iterdir())


def test_a_missing_predictions_file_is_named_with_what_to_do(model, tiny_tokenizer, tmp_path):
    report = score_exams(model, tiny_tokenizer, KOREAN[:2], None, "logits", set(), "tiny", tmp_path / "test_predictions")
    write_json_atomic(report, tmp_path / "test_report.json")
    assert len(read_test_report(tmp_path / "test_report.json")["predictions"]) == 2 and "english" not in report
    (tmp_path / "test_predictions" / "cloze_ko.jsonl").unlink()
    with pytest.raises(MedkoError, match=r"cloze_ko.jsonl is missing.*python medko.py test --run-dir"):
        read_test_report(tmp_path / "test_report.json")

