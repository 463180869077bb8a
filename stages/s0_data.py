"""s0 data: fetch and normalise the exam, English and Korean medical data and the pairs; report split overlap.

The 270m default reads the bundled sample data in data/; --size 4b/27b reads the hub (or --data DIR).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


def main(argv=None) -> int:
    p = sl.stage_parser(__doc__)
    p.add_argument("--data", default=None, help="'hub', or a directory laid out like data/ (default by --size)")
    p.add_argument("--subsets", default="doctor,nurse,pharm,dentist", help="KorMedMCQA subsets")
    p.add_argument("--en-mcq", default=None, help="English MCQ file (MedQA schema) instead of the default")
    p.add_argument("--ko-text", default=None, help="Korean medical text file (JSONL with a text field)")
    p.add_argument("--en-text", default=None, help="English medical text file (JSONL with a text field)")
    p.add_argument("--pairs", default=None, help="Korean-English pair file (JSONL with ko and en fields)")
    p.add_argument("--reasoning", default=None, help="Korean exam reasoning file")
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad rows instead of stopping")
    return sl.stage_main("s0", p, argv)


if __name__ == "__main__":
    sys.exit(main())
