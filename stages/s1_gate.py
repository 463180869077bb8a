"""s1 gate: translate the Korean dev and train exams to English with the model itself (the bundled sample
data uses its bundled reference translations unless --english-exam model), score each candidate on the
English dev exam, choose the smallest at or above --gate; if none passes, s1.1 runs next.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


def main(argv=None) -> int:
    p = sl.stage_parser(__doc__)
    p.add_argument("--candidates", default=None, help="sizes to score, smallest first, e.g. 4b,27b (default --size)")
    p.add_argument("--subsets", default="doctor,nurse,pharm,dentist", help="KorMedMCQA subsets")
    p.add_argument("--english-exam", default="auto",
                   help="'model' (translate with the model), a directory of reference translations laid out like "
                        "data/kormedmcqa_en, or 'auto': the bundled translations for the bundled data, else 'model'")
    p.add_argument("--translate-tokens", type=int, default=96, help="most new tokens per translated line")
    return sl.stage_main("s1", p, argv)


if __name__ == "__main__":
    sys.exit(main())
