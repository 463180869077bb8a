"""Read-only sequences that hold no rows in memory, so that a stage's memory stays flat however large its data:
JsonlRows (a JSONL file's rows, parsed when read, only each row's byte offset resident), Mapped (a function over a
sequence, applied when read) and Chain (sequences one after another). Slicing any of them gives a list.

Imports engine.errors and engine.records.
"""
from __future__ import annotations

import bisect
from array import array
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from engine.errors import MedkoError
from engine.records import BadRow, json_record, nfc

T = TypeVar("T")
BOM = b"\xef\xbb\xbf"
CHUNK = 256  # rows read at once when iterating


class View(Sequence):
    """What the views share: an index made non-negative (IndexError past the end), slices read as lists, and `+`
    as a Chain."""

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} of {n}")
        return i % n

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            return self._range(start, stop) if step == 1 else [self._one(k) for k in range(start, stop, step)]
        return self._one(self._index(i))

    def _range(self, start: int, stop: int) -> list:
        return [self._one(k) for k in range(start, stop)]

    def __add__(self, other: Sequence) -> "Chain":
        return Chain([self, other])

    def __radd__(self, other: Sequence) -> "Chain":
        return Chain([other, self])


class JsonlRows(View):
    """The rows of a JSONL file, each parse(path, index, record) of its NFC-normalised record as engine.data's
    loaders give it; blank lines are no rows. Only the byte offset of each row stays in memory, so reading is
    lazy: a row that fails to parse raises MedkoError naming the file and line when it is read."""

    def __init__(self, path: Path, parse: Callable[[Path, int, dict[str, Any]], Any]):
        self.path, self.parse = Path(path), parse
        if not self.path.is_file():
            raise MedkoError(f"{self.path} does not exist; check the path")
        self._starts = array("q")  # each row's first byte
        at = 0
        with self.path.open("rb") as f:
            for line in f:
                skip = len(BOM) if at == 0 and line.startswith(BOM) else 0  # a BOM is not data
                if _text(line[skip:]):
                    self._starts.append(at + skip)
                at += len(line)
        self._end = at

    def __len__(self) -> int:
        return len(self._starts)

    def _one(self, k: int) -> Any:
        return self._range(k, k + 1)[0]

    def _range(self, start: int, stop: int) -> list:
        if start >= stop:
            return []
        first = self._starts[start]
        with self.path.open("rb") as f:  # opened per read: nothing to close, nothing shared across processes
            f.seek(first)
            data = f.read((self._starts[stop] if stop < len(self) else self._end) - first)
        lines = [(first + at, line) for at, line in _lines(data)]
        return [self._parse(start + k, at, line) for k, (at, line) in enumerate(lines)]

    def __iter__(self) -> Iterator:
        for start in range(0, len(self), CHUNK):
            yield from self._range(start, min(len(self), start + CHUNK))

    def _parse(self, index: int, at: int, line: bytes) -> Any:
        try:
            record = json_record(line.decode("utf-8"))
            if isinstance(record, BadRow):
                raise record
            return self.parse(self.path, index, nfc(record))
        except (BadRow, UnicodeDecodeError) as err:
            with self.path.open("rb") as f:
                line_number = f.read(at).count(b"\n") + 1
            raise MedkoError(f"{self.path}:{line_number}: {err}; the file changed after s0 checked it: run s0 "
                             f"again") from None


def _lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of each line of data that is not blank."""
    at = 0
    for line in data.split(b"\n"):
        if _text(line):
            yield at, line
        at += len(line) + 1


def _text(line: bytes) -> bool:
    """Whether a line holds more than white space, as engine.records reads it."""
    return bool(line.decode("utf-8", "replace").strip())


class Mapped(View):
    """fn(row) of each row of a sequence, computed when read."""

    def __init__(self, rows: Sequence[T], fn: Callable[[T], Any]):
        self.rows, self.fn = rows, fn

    def __len__(self) -> int:
        return len(self.rows)

    def _one(self, k: int) -> Any:
        return self.fn(self.rows[k])

    def _range(self, start: int, stop: int) -> list:
        return [self.fn(row) for row in self.rows[start:stop]]

    def __iter__(self) -> Iterator:
        return map(self.fn, self.rows)


class Chain(View):
    """Sequences one after another, as one (their `+` without the copy); chains inside are flattened."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = [p for part in parts for p in (part.parts if isinstance(part, Chain) else [part])]
        self._ends = list(accumulate(len(p) for p in self.parts))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _one(self, k: int) -> Any:
        part = bisect.bisect_right(self._ends, k)
        return self.parts[part][k - (self._ends[part - 1] if part else 0)]

    def __iter__(self) -> Iterator:
        for part in self.parts:
            yield from part
