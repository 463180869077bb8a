"""Loaders, bad-row messages, hub loading from local snapshots, and split hygiene."""
import random
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.data import Instruction, KORMEDMCQA_SPLITS, KORMEDMCQA_SUBSETS, MCQ, Pair, SOURCES, Source, load_instructions, load_kormedmcqa, load_mcq_file, load_pairs, load_reasoning, load_texts, split_overlap
from engine.errors import MedkoError

DATA = Path(__file__).resolve().parents[1] / "data"
GOOD = {"question": "Q?", "A": "a", "B": "b", "C": "c", "D": "d", "E": "e", "answer": 3}


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def kormedmcqa_row(i: int, subject: str = "doctor") -> dict:
    return {"subject": subject, "year": 2020 + i, "period": 1, "q_number": i, "question": f"질문 {i}?",
            "A": "가", "B": "나", "C": "다", "D": "라", "E": "마", "answer": i % 5 + 1, "cot": ""}


# ── bad rows ──

BAD_ROWS = [  # (row after a good one, expected message)
    ({k: v for k, v in GOOD.items() if k != "question"}, "field 'question' is missing or empty"),
    ({**GOOD, "question": "  "}, "field 'question' is missing or empty"),
    ({k: v for k, v in GOOD.items() if k != "answer"}, "field 'answer' is missing or empty"),
    ({**GOOD, "answer": 6}, "answer 6 is out of range 1-5"),
    ({**GOOD, "answer": 0}, "answer 0 is out of range 1-5"),
    ({**GOOD, "E": None, "answer": 5}, "answer 5 is out of range 1-4"),
    ({**GOOD, "E": None, "answer": "E"}, "answer E is not among the options A-D"),
    ({**GOOD, "answer": "F"}, "answer 'F' is neither a letter A-E nor a number 1-5"),
    ({**GOOD, "answer": "c"}, "answer 'c' is neither a letter A-E nor a number 1-5"),
    ({**GOOD, "C": ""}, "option C is missing or empty"),
    ({k: v for k, v in GOOD.items() if k not in "DE"}, "option D is missing or empty"),
    ({"question": "Q?", "options": {"A": "a", "B": "b", "C": "c"}, "answer": "A"},
     "options must be A-D or A-E, got A, B, C"),
    ({"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "E": "e"}, "answer": "A"},
     "options must be A-D or A-E, got A, B, C, E"),
    ({"question": "Q?", "options": list("abcdef"), "answer": 1}, "6 options; a question needs 4 or 5"),
    ('{"question": "Q?", "A": "a"', "not valid JSON"),
    ("[1, 2, 3]", "is not a JSON object"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_bad_row_stops_with_file_line_and_reason(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "exam.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(MedkoError) as err:
        load_mcq_file(path)
    text = str(err.value)
    assert text.startswith(f"{path}:2: {message}"), text
    assert "--skip-bad" in text and "\n" not in text


def test_skip_bad_counts_and_keeps_stable_ids(tmp_path):
    bad = [row for row, _ in BAD_ROWS]
    path = write_jsonl(tmp_path / "exam.jsonl", [GOOD, *bad, {**GOOD, "answer": "B"}])
    rows = load_mcq_file(path, skip_bad=True)
    assert rows.skipped == len(bad)
    assert [r.id for r in rows] == ["exam/0000", f"exam/{len(bad) + 1:04d}"]
    assert [r.answer for r in rows] == ["C", "B"]


def test_mapping_csv_parquet_dict_and_list_options(tmp_path):
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("q,A,B,C,D,E,label,year\n"
                        "Four options?,a,b,c,d,,D,2020\n"
                        "Five options?,a,b,c,d,e,5,2021\n", encoding="utf-8")
    rows = load_mcq_file(csv_path, {"question": "q", "answer": "label"}, lang="en")
    assert [list(r.options) for r in rows] == [list("ABCD"), list("ABCDE")]
    assert [r.answer for r in rows] == ["D", "E"]
    assert rows[0].meta == {"year": "2020"} and rows[0].subset == "mine" and rows[0].lang == "en"

    with pytest.raises(MedkoError, match=rf"^{csv_path}:2: field 'qq' \(medko's 'question'\) is missing"):
        load_mcq_file(csv_path, {"question": "qq", "answer": "label"})

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("question,A,B,C,D,answer\nok?,a,b,c,d,1\nno?,a,,c,d,1\n", encoding="utf-8")
    with pytest.raises(MedkoError, match=rf"^{bad_csv}:3: option B is missing or empty"):
        load_mcq_file(bad_csv)

    table = pa.table({"question": ["P?"], "options": [["w", "x", "y", "z"]], "answer": [2], "id": ["p-1"]})
    pq.write_table(table, tmp_path / "mine.parquet")
    (row,) = load_mcq_file(tmp_path / "mine.parquet")
    assert row.options == {"A": "w", "B": "x", "C": "y", "D": "z"} and row.answer == "B" and row.id == "p-1"

    options = {"B": "b", "A": "a", "C": "c", "D": "d"}
    medqa = write_jsonl(tmp_path / "medqa.jsonl", [{"question": "M?", "options": options, "answer_idx": "C", "answer": "c"}])
    (row,) = load_mcq_file(medqa, SOURCES["medqa"].mapping)
    assert list(row.options) == list("ABCD") and row.answer == "C" and row.meta == {"answer": "c"}


def test_unknown_mapping_key_and_missing_file_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "exam.jsonl", [GOOD])
    with pytest.raises(MedkoError, match="unknown field mapping keys \\['questoin'\\]"):
        load_mcq_file(path, {"questoin": "q"})
    with pytest.raises(MedkoError, match="does not exist"):
        load_mcq_file(tmp_path / "nope.jsonl")


# ── bundled sample data ──

def bundled(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not written yet")
    return path


def test_bundled_kormedmcqa_loads_every_subset_and_split():
    root = bundled("kormedmcqa")
    for split in KORMEDMCQA_SPLITS:
        rows = load_kormedmcqa(split=split, source=root)
        assert {r.subset for r in rows} == set(KORMEDMCQA_SUBSETS)
        for r in rows:
            subset, row_split, index = r.id.split("/")
            assert (subset, row_split, len(index)) == (r.subset, split, 4)
            assert r.answer in r.options and len(r.options) == 5 and {"year", "period", "q_number"} <= set(r.meta)
    english = load_kormedmcqa(split="dev", source=bundled("kormedmcqa_en"), lang="en")
    korean = load_kormedmcqa(split="dev", source=root)
    assert [(r.id, r.answer) for r in english] == [(r.id, r.answer) for r in korean]


def test_bundled_side_files_load():
    assert len(load_mcq_file(bundled("medqa_en.jsonl"), SOURCES["medqa"].mapping)) > 0
    reasoning = load_reasoning(bundled("reasoning_ko.jsonl"))
    assert reasoning and all(r.reasoning and r.answer in r.options for r in reasoning)
    assert all(load_texts(bundled(name)) for name in ("ko_medical_text.jsonl", "en_medical_text.jsonl"))
    pairs = load_pairs(bundled("ko_en_pairs.jsonl"))
    assert pairs and all(p.src and p.tgt for p in pairs)


def test_bundled_splits_do_not_overlap():
    root = bundled("kormedmcqa")
    overlap = split_overlap({s: load_kormedmcqa(split=s, source=root) for s in KORMEDMCQA_SPLITS})
    assert len(overlap) == 6 and not any(overlap.values()), overlap


# ── texts, pairs, instructions ──

def test_texts_pairs_and_instructions(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("first text\nstill first\n\n\nsecond text\n", encoding="utf-8")
    assert load_texts(txt) == ["first text\nstill first", "second text"]
    body = write_jsonl(tmp_path / "docs.jsonl", [{"body": "one"}, {"body": ""}, {"body": "two"}])
    with pytest.raises(MedkoError, match=rf"^{body}:2: field 'body' \(medko's 'text'\) is missing or empty"):
        load_texts(body, field="body")
    texts = load_texts(body, field="body", skip_bad=True)
    assert texts == ["one", "two"] and texts.skipped == 1
    assert load_texts(Source(str(body), {"text": "body"}), skip_bad=True) == ["one", "two"]

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"korean": "가", "english": "a"}])
    assert load_pairs(pairs, src="korean", tgt="english") == [Pair("가", "a")]
    assert load_pairs(pairs, src="english", tgt="korean") == [Pair("a", "가")]

    inst = write_jsonl(tmp_path / "inst.jsonl", [{"instruction": "Explain.", "input": "x", "output": "y"},
                                                 {"prompt": "Only.", "output": "z"}])
    assert load_instructions(inst, skip_bad=True) == [Instruction("Explain.\n\nx", "y")]
    assert load_instructions(inst, {"instruction": "prompt"}, skip_bad=True) == [Instruction("Only.", "z")]


# ── hub loading from local snapshots ──

def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_kormedmcqa_hub_reads_snapshot_parquet(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    write_parquet(snapshot / "doctor" / "dev-00000-of-00001.parquet", [kormedmcqa_row(i) for i in range(3)])
    # A re-uploaded copy of the same shard beside the original must not double the split.
    write_parquet(snapshot / "doctor" / "dev-00000-of-00001-0a1b2c.parquet", [kormedmcqa_row(i) for i in range(3)])
    write_parquet(snapshot / "nurse" / "dev-00000-of-00001.parquet", [kormedmcqa_row(7, "nurse")])
    write_parquet(snapshot / "nurse" / "test-00000-of-00001.parquet", [kormedmcqa_row(8, "nurse")])
    calls = []

    def fake_snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    rows = load_kormedmcqa(["doctor", "nurse"], "dev")
    assert calls == [("sean0042/KorMedMCQA", {"repo_type": "dataset",
                                              "allow_patterns": ["doctor/dev-*.parquet", "nurse/dev-*.parquet"]})]
    assert [r.id for r in rows] == ["doctor/dev/0000", "doctor/dev/0001", "doctor/dev/0002", "nurse/dev/0000"]
    assert [r.answer for r in rows] == ["A", "B", "C", "C"]
    assert rows[0].meta == {"year": 2020, "period": 1, "q_number": 0, "cot": ""}


def test_generic_hub_source_picks_the_split(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    for split, question in (("train", "T?"), ("test", "X?")):
        write_parquet(snapshot / "data" / f"{split}-00000-of-00001.parquet",
                      [{"q": question, "options": list("abcd"), "label": 1}])
    write_jsonl(snapshot / "data" / "train.jsonl", [{"q": "T?", "options": list("abcd"), "label": 1}])  # same split
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(snapshot))
    rows = load_mcq_file(Source("someone/exam", {"question": "q", "answer": "label"}, split="train"))
    assert [(r.question, r.answer) for r in rows] == [("T?", "A")]


def offline_hub(monkeypatch, cache: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_hub_offline_without_cache_is_one_clear_sentence(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "empty-cache")
    with pytest.raises(MedkoError, match="sean0042/KorMedMCQA is not in the local cache and the hub cannot "
                                            "be reached \\(offline\\?\\).*data/kormedmcqa is one") as err:
        load_kormedmcqa("doctor", "dev")
    assert err.value.__cause__ is None and "\n" not in str(err.value)


def test_hub_offline_reads_the_cache(tmp_path, monkeypatch):
    repo = tmp_path / "cache" / "datasets--sean0042--KorMedMCQA"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_parquet(repo / "snapshots" / commit / "pharm" / "test-00000-of-00001.parquet", [kormedmcqa_row(1, "pharm")])
    offline_hub(monkeypatch, tmp_path / "cache")
    rows = load_kormedmcqa("pharm", "test")
    assert [(r.id, r.answer) for r in rows] == [("pharm/test/0000", "B")]


@pytest.mark.parametrize("error, message", [("GatedRepoError", "is gated: accept its terms"),
                                            ("RepositoryNotFoundError", "was not found or needs a token")])
def test_hub_gated_and_missing_are_one_clear_sentence(monkeypatch, error, message):
    import huggingface_hub
    from huggingface_hub import errors

    def refuse(repo_id, **kwargs):
        cls = getattr(errors, error)
        raise cls.__new__(cls)  # the real constructors want an HTTP response

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(MedkoError, match=f"^sean0042/KorMedMCQA {message}"):
        load_kormedmcqa("doctor", "test")


def test_unknown_subset_or_split_is_refused():
    with pytest.raises(MedkoError, match="unknown KorMedMCQA subset \\['surgeon'\\]"):
        load_kormedmcqa("surgeon", "test")
    with pytest.raises(MedkoError, match="split 'validation'"):
        load_kormedmcqa("doctor", "validation")


# ── split hygiene ──

def test_split_overlap_finds_a_duplicate_despite_spacing_and_punctuation():
    def mcq(i: str, question: str) -> MCQ:
        return MCQ(i, "doctor", question, dict(zip("ABCDE", "abcde")), "A")

    splits = {
        "train": [mcq("t0", "고혈압의 1차 치료제는 무엇인가?"), mcq("t1", "Which drug, given IV, treats shock?")],
        "dev": [mcq("d0", "전혀 다른 질문이다.")],
        "test": [mcq("x0", "  고혈압의  1차 치료제는   무엇인가 ？ "), mcq("x1", "which drug given iv treats SHOCK"),
                 mcq("x2", "고혈압의 2차 치료제는 무엇인가?")],
    }
    assert split_overlap(splits) == {"train/dev": [], "train/test": [("t0", "x0"), ("t1", "x1")], "dev/test": []}


def test_s0_overlap_report_includes_the_fewshot_split(tmp_path):
    import importlib.util
    import json

    script = Path(__file__).resolve().parents[1] / "stages" / "s0_data.py"
    spec = importlib.util.spec_from_file_location("s0_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    s0 = module.main

    assert s0(["--run-dir", str(tmp_path)]) == 0
    overlap = json.loads((tmp_path / "s0_data" / "meta.json").read_text())["overlap"]
    assert {"dev/fewshot", "train/fewshot", "test/fewshot"} <= set(overlap)


def test_unseen_answers_finds_every_answer_in_one_scan_as_a_substring_search_would():
    """unseen_answers' one-scan search (the longest answer at each place, then answers inside found ones) gives
    what a substring search of every text for every answer gives: nested, overlapping, repeated, one-character and
    regex-special answers, random Korean text."""
    from engine.sources import unseen_answers

    rng = random.Random(5)
    syllables = "고혈압당뇨병간신장심근경색폐렴."
    texts = ["".join(rng.choice(syllables) for _ in range(rng.randint(0, 60))) for _ in range(40)]
    answers = ["고혈압", "혈압", "고혈", "고혈압성", "간", "(a+b)*", " 당뇨 ", "", "병간신", "렴렴렴렴", "심근경색증"]
    answers += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 6))) for _ in range(200)]
    texts += ["식 (a+b)* 는", "뇌졸중 환자"]  # 뇌졸 occurs only where the longer answer 뇌졸중 begins
    answers += ["뇌졸중", "뇌졸", "졸중", "뇌졸중후"]
    questions = [MCQ(f"q/{i}", "doctor", "?", {**{k: "x" for k in "ABCDE"}, "C": a}, "C")
                 for i, a in enumerate(answers)]
    expected = [i for i, a in enumerate(answers) if not any(a.strip() in t for t in texts)]
    assert unseen_answers(questions, texts) == expected
    assert 0 < len(expected) < len(answers)
