"""Bad option values are refused when parsed, in one sentence, before any model loads (as a user types them)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    (["medko.py", "generate", "--prompt", "x", "--max-new-tokens", "-3"],
     "argument --max-new-tokens: -3 is out of range: give a value at least 1"),
    (["medko.py", "eval", "--limit", "-20"], "argument --limit: -20 is out of range: give a value at least 1"),
    (["medko.py", "eval", "--batch-size", "0"], "argument --batch-size: 0 is out of range: give a value at least 1"),
    (["medko.py", "eval", "--fewshot", "-1"], "argument --fewshot: -1 is out of range: give a value at least 0"),
    (["medko.py", "translate", "--data", "x", "--out", "y", "--max-new-tokens", "0"],
     "argument --max-new-tokens: 0 is out of range: give a value at least 1"),
    (["stages/s2_embed.py", "--max-steps", "0"], "argument --max-steps: 0 is out of range: give a value at least 1"),
    (["stages/s1_gate.py", "--gate", "1.5"],
     "argument --gate: 1.5 is out of range: give a value at least 0 and at most 1"),
    (["stages/s3_korean.py", "--lr", "-1"], "argument --lr: -1 is out of range: give a value above 0"),
    (["stages/s3_korean.py", "--eval-limit", "-20"], "argument --eval-limit: -20 is out of range: give a value at least 1"),
    (["stages/s3_korean.py", "--max-steps", "x"], "argument --max-steps: 'x' is not an integer"),
]


@pytest.mark.parametrize("argv,sentence", CASES, ids=[" ".join(c[0][:3]) + " " + c[0][-2] for c in CASES])
def test_bad_values_are_refused_in_one_sentence(argv, sentence, tmp_path):
    out = subprocess.run([sys.executable, *argv, *(["--run-dir", str(tmp_path / "run")] if "stages" in argv[0] else [])],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1].endswith(f"error: {sentence}"), out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()
