"""s4 translate: duplicate the first and last decoder layers (identity at the start), train Korean text,
then Korean-English translation, each with the per-layer English loss; then the English guard.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


def main(argv=None) -> int:
    return sl.stage_main("s4", sl.stage_parser(__doc__), argv)


if __name__ == "__main__":
    sys.exit(main())
