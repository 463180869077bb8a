"""Memory of s1's translation bookkeeping (engine.evaluate.translate_mcqs with its cache file) as the exam grows:
it must not grow with the questions.

An echo stands in for the model (each line's translation is its prompt's last 8 characters), so what is measured
is the bookkeeping alone: prompts, keys, budgets, the cache file's index. Each count runs in a fresh process with
the embedded 270M's tokenizer, twice on one cache file: translating every line, then reading every line back.
Printed per count: tracemalloc's peak (Python's and numpy's allocations) and the resident set's high-water mark
above the resident set before the call, in MiB.

    python bench/translation_memory.py                              # 3,000 and 30,000 questions
    python bench/translation_memory.py --root ../medko-before      # the same on another checkout's engine
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from measure_memory import kib  # bench/: it imports no engine module at the top, so --root still decides

ROOT = Path(__file__).resolve().parents[1]


def measure(count: int, root: Path) -> dict:
    import tracemalloc
    from dataclasses import replace

    sys.path.insert(0, str(root))
    from engine import evaluate
    from engine.data import load_kormedmcqa
    from engine.embedded_270m import default_270m_dir, ensure_270m
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(ensure_270m(default_270m_dir()) / "tokenizer.json")
    seed = load_kormedmcqa(["doctor"], "dev", ROOT / "data" / "kormedmcqa")[0]
    rows = [replace(seed, id=f"q{i}", question=f"{i} {seed.question}", options={k: f"{i} {v}" for k, v in
                                                                               seed.options.items()})
            for i in range(count)]
    evaluate.generate = lambda model, tok, prompts, *a: [p[-8:] for p in prompts]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("translate", "resume"):
            Path("/proc/self/clear_refs").write_text("5")  # the resident set's high-water mark restarts here
            before = kib("VmRSS")
            tracemalloc.start()
            for _ in evaluate.translate_mcqs(rows, None, tokenizer, "en", cache_path=Path(tmp) / "cache.jsonl",
                                             model_id="echo"):
                pass
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            out[name] = {"traced_mib": peak / 2**20, "rss_above_mib": (kib("VmHWM") - before) / 1024}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[3000, 30000], help="questions (six lines each)")
    p.add_argument("--root", default=str(ROOT), help="the checkout whose engine is measured")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process: one count
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, Path(args.root).resolve())))
        return
    print(f"{'questions':>10}{'translate traced':>18}{'translate RSS':>15}{'resume traced':>15}{'resume RSS':>12}")
    for count in args.counts:
        line = subprocess.run([sys.executable, __file__, "--one", str(count), "--root", args.root],
                              capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        r = json.loads(line)
        print(f"{count:>10}{r['translate']['traced_mib']:>18.1f}{r['translate']['rss_above_mib']:>15.1f}"
              f"{r['resume']['traced_mib']:>15.1f}{r['resume']['rss_above_mib']:>12.1f}")


if __name__ == "__main__":
    main()
