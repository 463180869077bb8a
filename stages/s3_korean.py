"""s3 korean: Korean medical text on language embeddings + lora1, while a per-layer loss holds English
hidden states to the teacher's; then the English guard.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


def main(argv=None) -> int:
    return sl.stage_main("s3", sl.stage_parser(__doc__), argv)


if __name__ == "__main__":
    sys.exit(main())
