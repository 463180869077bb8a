"""s1.1 english: LoRA lora1 trained on the English train exam and English medical data until the English
dev exam passes the gate or the step budget ends. Runs only when s1 found no model at the gate.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


def main(argv=None) -> int:
    p = sl.stage_parser(__doc__)
    p.add_argument("--english-rounds", type=int, default=2, help="gate checks within the step budget")
    return sl.stage_main("s1_1", p, argv)


if __name__ == "__main__":
    sys.exit(main())
