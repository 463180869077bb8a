"""JSONL-backed rows: the rows the list loaders give, read on demand from a file, with only offsets in memory."""
import json
import unicodedata
from pathlib import Path

import pytest

from engine.data import load_mcq_file, load_pairs, load_reasoning, load_texts, lazy_rows, mcq_record
from engine.errors import MedkoError
from engine.rows import Chain, Mapped

DATA = Path(__file__).resolve().parents[1] / "data"


def check_same(lazy, rows: list) -> None:
    assert len(lazy) == len(rows) and bool(lazy) == bool(rows)
    assert list(lazy) == rows
    for i in (0, 1, len(rows) - 1, -1, -len(rows)):
        assert lazy[i] == rows[i] and type(lazy[i]) is type(rows[i])
    assert lazy[2:7] == rows[2:7] and lazy[::3] == rows[::3] and lazy[-4:] == rows[-4:] and lazy[:0] == []
    with pytest.raises(IndexError):
        lazy[len(rows)]


def test_jsonl_rows_give_what_the_loaders_give(tmp_path):
    # As s0 writes them (records of the loaders' rows), and the bundled files as they are (ids from the row index).
    exam = tmp_path / "exam_dev.jsonl"
    exam.write_text("".join(json.dumps(mcq_record(r), ensure_ascii=False) + "\n"
                            for r in load_mcq_file(DATA / "kormedmcqa" / "doctor" / "dev.jsonl", lang="ko")))
    check_same(lazy_rows(exam, "mcq", "ko"), list(load_mcq_file(exam, lang="ko")))
    medqa = tmp_path / "en_mcq.jsonl"  # without ids: a row's id is its file's stem and its index
    medqa.write_text("".join(json.dumps({**mcq_record(r), "id": None}) + "\n"
                             for r in load_mcq_file(DATA / "medqa_en.jsonl", {"answer": "answer_idx"})))
    check_same(lazy_rows(medqa, "mcq", "en"), list(load_mcq_file(medqa, lang="en")))
    assert lazy_rows(medqa, "mcq", "en")[-1].id == f"en_mcq/{len(lazy_rows(medqa, 'mcq')) - 1:04d}"
    reasoning = DATA / "reasoning_ko.jsonl"
    check_same(lazy_rows(reasoning, "reasoning", "ko"), list(load_reasoning(reasoning, lang="ko")))
    check_same(lazy_rows(DATA / "ko_en_pairs.jsonl", "pair"), list(load_pairs(DATA / "ko_en_pairs.jsonl")))
    check_same(lazy_rows(DATA / "ko_medical_text.jsonl", "text"), list(load_texts(DATA / "ko_medical_text.jsonl")))


def test_jsonl_rows_skip_blank_lines_and_normalise(tmp_path):
    texts = tmp_path / "ko_text.jsonl"
    decomposed = unicodedata.normalize("NFD", "고혈압")
    lines = ["\ufeff" + json.dumps({"text": "첫째"}), "", json.dumps({"text": decomposed}), "   ",
             json.dumps({"output": "출력"})] + [json.dumps({"text": f"text {i}"}) for i in range(8)]
    texts.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    rows = list(load_texts(texts))
    assert rows[1] == "고혈압"
    check_same(lazy_rows(texts, "text"), rows)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert len(lazy_rows(empty, "text")) == 0 and list(lazy_rows(empty, "text")) == []


def test_a_broken_row_names_the_file_and_line(tmp_path):
    path = tmp_path / "ko_text.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": ""}\n{not json\n[1]\n', encoding="utf-8")
    rows = lazy_rows(path, "text")  # s0 validated the file: rows parse when read
    assert len(rows) == 5 and rows[1] == "b"
    with pytest.raises(MedkoError, match=f"{path}:4: field 'text' is missing or empty"):
        rows[2]
    with pytest.raises(MedkoError, match=f"{path}:5: not valid JSON"):
        rows[-2]
    with pytest.raises(MedkoError, match=f"{path}:6: is not a JSON object"):
        rows[4]
    with pytest.raises(MedkoError, match=f"{path}:4:"):
        list(rows)
    with pytest.raises(MedkoError, match=f"{tmp_path / 'missing.jsonl'} does not exist"):
        lazy_rows(tmp_path / "missing.jsonl", "text")


def test_views_chain_and_map_without_copying():
    a, b = ["x", "y", "z"], ["u", "v"]
    chain = Chain([a, b, []])
    check_same(chain, a + b)
    assert (chain + ["w"])[-1] == "w" and (["w"] + chain)[0] == "w" and len(chain + chain) == 10
    check_same(Mapped(chain, str.upper), [s.upper() for s in a + b])
