"""s2 embed: fix the teacher (the model as it enters), add zero-initialised Korean and English language
embeddings and train only them on Korean medical text.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


def main(argv=None) -> int:
    p = sl.stage_parser(__doc__)
    p.add_argument("--korean-delta", action="store_true", help="also a zero-initialised delta per Korean token")
    return sl.stage_main("s2", p, argv)


if __name__ == "__main__":
    sys.exit(main())
