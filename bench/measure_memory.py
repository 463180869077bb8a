"""Peak memory of one held-out measurement (engine.measures.losses_and_drift, what every stage's measure and the
English guard run) on the real 270M with 40 and with 400 English held-out texts: it must not grow with the texts.

Each count runs in a fresh process: the 270M with lora1 and language vectors (an s3 model, so the teacher view
differs from the student), the bundled held-out English texts repeated to the count, then one measurement.
Printed: the resident set's high-water mark during the measurement above the resident set just before it (reset
through /proc/self/clear_refs), and the process's whole peak (ru_maxrss) for reference.

    python bench/measure_memory.py
"""
from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COUNTS = (40, 400)


def kib(field: str) -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(field + ":"))


def measure(count: int) -> dict:
    from engine.adapters import add_language_embeddings, add_lora
    from engine.checkpoints import load_base
    from engine.data import load_texts
    from engine.measures import losses_and_drift

    model, tokenizer, _ = load_base("270m", device="cpu")
    add_language_embeddings(add_lora(model, "lora1"), tokenizer)
    texts = list(load_texts(ROOT / "data" / "en_medical_text_heldout.jsonl"))
    texts = (texts * (count // len(texts) + 1))[:count]
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    losses, drifts = losses_and_drift(model, tokenizer, texts, 512)
    assert len(losses) == len(drifts) == count
    return {"texts": count, "above_mib": (kib("VmHWM") - before) / 1024,
            "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count:
        print(json.dumps(measure(args.count)))
        return
    rows = []
    for count in COUNTS:
        out = subprocess.run([sys.executable, __file__, "--count", str(count)], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"the measurement of {count} texts failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{count} texts: {rows[-1]['above_mib']:.0f} MiB above the model", file=sys.stderr)
    print(f"{'held-out texts':>15}{'peak above the model MiB':>26}{'process peak MiB':>18}")
    for r in rows:
        print(f"{r['texts']:>15}{r['above_mib']:>26.0f}{r['process_peak_mib']:>18.0f}")
    ratio = rows[-1]["above_mib"] / max(rows[0]["above_mib"], 1e-9)
    print(f"ratio: {ratio:.2f} (peak with {COUNTS[-1]} texts over peak with {COUNTS[0]})")


if __name__ == "__main__":
    main()
