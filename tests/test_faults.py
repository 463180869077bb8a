"""What a user sees when things go wrong (docs/faults.md): an unforeseen error in any command or stage is one
sentence naming its crash log, never a traceback; text files in other encodings; repeats within a source."""
import json
import logging
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from engine.data import load_mcq_file, load_pairs, load_texts, stream_mcq_file, stream_pairs, stream_texts
from engine.errors import MedkoError
from engine.spool import Spool, check_repeats

ROOT = Path(__file__).resolve().parents[1]
# Each command's required arguments; a command added without an entry here fails the test below.
COMMAND_ARGS = {"download": [], "convert": [], "plan": [], "generate": ["--prompt", "x"], "eval": [],
                "translate": ["--data", "x", "--out", "y"], "export": ["run/s2_embed", "--out", "y"],
                "test": ["--run-dir", "run"], "compare": ["base", "run"], "report": ["run"]}


def python(code: str, *args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDKO_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'stages'}"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def test_every_command_ends_an_unforeseen_error_in_one_sentence(tmp_path):
    # Every command's handler raises what nobody foresaw; the commands are read from medko's own parser.
    code = ("import argparse, json, sys, medko\n"
            "def boom(args): raise RuntimeError('forced')\n"
            "sub = [a for a in medko.build_parser()._actions if isinstance(a, argparse._SubParsersAction)][0]\n"
            "args = json.loads(sys.argv[1])\n"
            "for name in sub.choices:\n"
            "    setattr(medko, f'cmd_{name}', boom)\n"
            "    print(name, medko.main([name, *args[name]]), file=sys.stderr, flush=True)\n")
    done = python(code, json.dumps(COMMAND_ARGS), cache=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    logs = sorted(tmp_path.glob("crash-*.log"))
    assert len(logs) == len(COMMAND_ARGS) == len(lines) // 2
    for name, (sentence, result) in zip(COMMAND_ARGS, zip(lines[::2], lines[1::2])):
        assert result == f"{name} 1"
        assert sentence.startswith(f"medko: {name} failed unexpectedly with RuntimeError: forced; the full traceback "
                                   f"is in {tmp_path}/crash-"), sentence
        log = Path(sentence.split("the full traceback is in ")[1].split(";")[0])
        assert log in logs and "Traceback" in log.read_text() and "RuntimeError: forced" in log.read_text()

    # --debug shows the traceback where the user is.
    debug = python("import sys, medko\ndef boom(args): raise RuntimeError('forced')\nmedko.cmd_report = boom\n"
                   "sys.exit(medko.main(['report', 'run', '--debug']))", cache=tmp_path)
    assert debug.returncode == 1 and debug.stderr.startswith("Traceback (most recent call last)")
    assert "RuntimeError: forced\nmedko: report failed unexpectedly" in debug.stderr


def test_a_stage_ends_an_unforeseen_error_in_one_sentence(tmp_path):
    code = ("import sys, shared_logic as sl, s0_data\n"
            "def boom(*a): raise RuntimeError('forced')\n"
            "sl.read_sources = boom\n"
            "sys.exit(s0_data.main(sys.argv[1:]))")
    fresh = python(code, "--run-dir", str(tmp_path / "fresh"), cache=tmp_path / "cache")
    assert fresh.returncode == 1 and "Traceback" not in fresh.stderr
    # The stage made its directories and nothing is left to resume: they go, and the log goes to the cache.
    assert not (tmp_path / "fresh").exists()
    assert fresh.stderr.splitlines()[-1].startswith(
        f"medko: s0 failed unexpectedly with RuntimeError: forced; the full traceback is in {tmp_path / 'cache'}/crash-")

    kept = tmp_path / "kept"
    (kept / "s0_data").mkdir(parents=True)  # a stage directory that was there before: the log goes into it
    resumed = python(code, "--run-dir", str(kept), "--resume", cache=tmp_path / "cache")
    assert resumed.returncode == 1 and "Traceback" not in resumed.stderr
    log = next((kept / "s0_data").glob("crash-*.log"))
    assert f"the full traceback is in {log}" in resumed.stderr.splitlines()[-1]
    assert "RuntimeError: forced" in log.read_text()


HANGUL = "고혈압의 정의는?"


def test_utf8_with_a_bom_is_read_everywhere(tmp_path):
    jsonl, csv = tmp_path / "exam.jsonl", tmp_path / "exam.csv"
    row = {"question": HANGUL, "A": "a", "B": "b", "C": "c", "D": "d", "answer": 2}
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(row, ensure_ascii=False).encode() + b"\n")
    csv.write_bytes(b"\xef\xbb\xbfquestion,A,B,C,D,answer\r\n" + f"{HANGUL},a,b,c,d,2\r\n".encode())
    for path in (jsonl, csv):
        (only,) = load_mcq_file(path)
        assert only.question == HANGUL and only.answer == "B"
    texts, pairs = tmp_path / "texts.txt", tmp_path / "pairs.jsonl"
    texts.write_bytes(b"\xef\xbb\xbf" + f"{HANGUL}\n\nsecond".encode())
    pairs.write_bytes(b"\xef\xbb\xbf" + json.dumps({"ko": HANGUL, "en": "e"}, ensure_ascii=False).encode())
    assert list(load_texts(texts)) == [HANGUL, "second"]
    assert load_pairs(pairs)[0].src == HANGUL


def test_cp949_is_named_in_one_sentence_or_read_when_asked(tmp_path, caplog):
    path = tmp_path / "ko.jsonl"
    first = json.dumps({"text": "plain ascii"}) + "\n"
    path.write_bytes(first.encode() + json.dumps({"text": HANGUL}, ensure_ascii=False).encode("cp949") + b"\n")
    offset = len(first) + len('{"text": "')
    with pytest.raises(MedkoError) as refused:
        load_texts(path)
    assert str(refused.value) == (f"{path}:2: byte offset {offset} (0x{HANGUL.encode('cp949')[0]:02x}) is not UTF-8; "
                                  f"give its encoding with --encoding cp949 (or euc-kr), or --encoding auto to try "
                                  f"UTF-8 and then CP949")
    assert list(load_texts(path, encoding="cp949")) == list(load_texts(path, encoding="euc-kr")) == \
        ["plain ascii", HANGUL]
    with caplog.at_level(logging.INFO, logger="medko"):
        assert list(load_texts(path, encoding="auto")) == ["plain ascii", HANGUL]
    assert f"{path}: read as CP949 (--encoding auto)" in caplog.text
    path.write_bytes(b'{"text": "\xff\xff"}\n')
    with pytest.raises(MedkoError, match=r"ko.jsonl:1: byte offset 10 \(0xff\) is not UTF-8 nor CP949; check the file"):
        load_texts(path, encoding="auto")


def test_decomposed_hangul_is_composed_and_counted(tmp_path):
    path = tmp_path / "ko.jsonl"
    decomposed = unicodedata.normalize("NFD", HANGUL)
    assert decomposed != HANGUL
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in (decomposed, "same", HANGUL)))
    rows = load_texts(path)
    assert list(rows) == [HANGUL, "same", HANGUL] and rows.normalized == 1


def test_repeats_are_counted_and_a_different_answer_names_both_rows(tmp_path):
    spools = tmp_path / "spools"
    spools.mkdir()
    path = tmp_path / "exam.jsonl"
    rows = [{"question": q, "A": "a", "B": "b", "C": "c", "D": "d", "answer": a}
            for q, a in (("q1", 1), ("q2", 2), ("q1", 1), ("q3", 1), ("q2", 3))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(MedkoError) as refused:
        check_repeats(Spool(spools, "exam_train", "mcq").fill(stream_mcq_file(path)), skip_bad=False)
    assert str(refused.value) == (f"exam_train: {path}:5 repeats {path}:2 with another answer ('C', there 'B'); fix "
                                  f"one of them, or drop both with --skip-bad")
    kept = check_repeats(Spool(spools, "exam_train", "mcq").fill(stream_mcq_file(path)), skip_bad=True)
    assert [r.question for r in kept.rows] == ["q1", "q1", "q3"]
    assert (kept.repeated, kept.conflicting) == (1, 2)
    assert [kept.where(i) for i in range(len(kept))] == [f"{path}:1", f"{path}:3", f"{path}:4"]

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a", "b", "a", "a")))
    assert check_repeats(Spool(spools, "ko_text", "text").fill(stream_texts(texts)), skip_bad=False).repeated == 2
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"ko": k, "en": e}) + "\n" for k, e in (("가", "a"), ("나", "b"), ("가", "c"))))
    with pytest.raises(MedkoError, match=r"pairs: .*pairs.jsonl:3 repeats .*pairs.jsonl:1 with another translation"):
        check_repeats(Spool(spools, "pairs", "pair").fill(stream_pairs(pairs)), skip_bad=False)


def test_eval_reads_another_encoding_when_told(tiny_dir, tmp_path, capsys):
    import medko

    path = tmp_path / "exam.csv"
    path.write_bytes(f"question,A,B,C,D,answer\n{HANGUL},가,나,다,라,1\n".encode("cp949"))
    assert medko.main(["eval", "--model", str(tiny_dir), "--data", str(path)]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"medko: {path}:2: byte offset 24 ")
    assert medko.main(["eval", "--model", str(tiny_dir), "--data", str(path), "--encoding", "cp949"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[:2] == ["exam", "1"]  # the one question, decoded


def test_the_commands_docs_faults_shows_run_as_written(tiny_dir, tmp_path):
    """docs/faults.md's `python medko.py` lines, run where the files they name exist, on the tiny model."""
    import re

    commands = re.findall(r"^    (python medko\.py[^\n]*)$", (ROOT / "docs" / "faults.md").read_text(), re.M)
    assert commands
    (tmp_path / "exam_cp949.csv").write_bytes(f"question,A,B,C,D,answer\n{HANGUL},가,나,다,라,1\n".encode("cp949"))
    for command in commands:
        argv = [sys.executable, str(ROOT / "medko.py"), *command.split()[2:], "--model", str(tiny_dir)]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "MEDKO_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0 and "Traceback" not in done.stderr, f"{command}\n{done.stderr[-2000:]}"
        if "exam_cp949.csv --encoding auto" in command:
            assert "exam_cp949.csv: read as CP949 (--encoding auto)" in done.stderr
