"""s5 reasoning: the Korean train exam in a reasoning format ending in a one-letter answer (cross-entropy
plus a letter loss, with the per-layer English loss); format compliance and accuracy on the Korean dev
exam; then the English guard.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


def main(argv=None) -> int:
    p = sl.stage_parser(__doc__)
    p.add_argument("--reasoning-tokens", type=int, default=256,
                   help="most new tokens when scoring reasoning (the reasoning must fit before its answer)")
    return sl.stage_main("s5", p, argv)


if __name__ == "__main__":
    sys.exit(main())
