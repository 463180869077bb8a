"""The translation cache: a JSONL file of one record a translated line ({"key", "src", "out"}), appended by rank 0
after every batch, so that an interrupted run resumes where it stopped.

In memory it holds each record's key as the first 8 bytes of its sha256 and the record's byte offset: 16 bytes a
line, so memory stays flat however many lines a run translates (it held each key and output as Python strings,
about 300 bytes a line: s1's peak rose 113 MiB from three to ten times the real volumes). An output is read back from the file
when a batch asks for it, and its whole key is checked there, so two keys that share 8 bytes never mix.

Imports engine.distributed.
"""
from __future__ import annotations

import json
from array import array
from pathlib import Path
from typing import Sequence

import numpy as np

from engine import distributed

PENDING = 4096  # short keys of new records kept in a dict until merged into the sorted arrays


def short_key(key: str) -> int:
    """A record's sha256 hex key as the integer of its first 8 bytes."""
    return int(key[:16], 16)


def _append(path: Path, entries: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:  # reads from where it seeks; writes always go to the end
        end = f.seek(0, 2)
        f.seek(max(0, end - 1))
        if end and f.read(1) != b"\n":
            f.write(b"\n")  # an interrupted write's half line stays alone on its line, and is skipped on reading
        f.writelines((json.dumps(e, ensure_ascii=False) + "\n").encode("utf-8") for e in entries)


class TranslationCache:
    """The records of `path` (none yet when it does not exist), or, with no path, outputs held in memory."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self._keys = np.empty(0, np.uint64)  # sorted
        self._offsets = np.empty(0, np.int64)
        self._pending: dict[int, list[int]] = {}  # offsets by short key, until merged
        self._memory: dict[str, str] = {}
        self._indexed = 0  # bytes of the file indexed so far
        if self.path and self.path.is_file():
            self._index_tail()

    def _index_tail(self) -> None:
        """Indexes the records written since the last call (every record, the first time)."""
        keys, offsets = array("Q"), array("q")
        with self.path.open("rb") as f:
            f.seek(self._indexed)
            offset = self._indexed
            for line in f:
                try:
                    key = json.loads(line)["key"]
                    keys.append(short_key(key))
                    offsets.append(offset)
                except (ValueError, KeyError, TypeError):
                    pass  # the last line of an interrupted write; that text is translated again
                offset += len(line)
        self._indexed = offset
        if len(keys) > PENDING:
            self._merge(np.frombuffer(keys, np.uint64), np.frombuffer(offsets, np.int64))
            return
        for short, offset in zip(keys, offsets):
            self._pending.setdefault(short, []).append(offset)
        if len(self._pending) >= PENDING:
            pairs = [(short, offset) for short, kept in self._pending.items() for offset in kept]
            self._merge(np.array([k for k, _ in pairs], np.uint64), np.array([o for _, o in pairs], np.int64))
            self._pending.clear()

    def _merge(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        keys, offsets = keys[order], offsets[order]
        at = np.searchsorted(self._keys, keys)
        self._keys, self._offsets = np.insert(self._keys, at, keys), np.insert(self._offsets, at, offsets)

    def __len__(self) -> int:
        return len(self._memory) + len(self._keys) + sum(map(len, self._pending.values()))

    def lookup(self, keys: Sequence[str]) -> list[str | None]:
        """Each key's cached output, or None."""
        if self.path is None:
            return [self._memory.get(key) for key in keys]
        if not len(self) or not self.path.is_file():
            return [None] * len(keys)
        shorts = np.array([short_key(key) for key in keys], np.uint64)
        spans = zip(np.searchsorted(self._keys, shorts, "left").tolist(),
                    np.searchsorted(self._keys, shorts, "right").tolist())
        with self.path.open("rb") as f:
            return [self._read(f, key, self._offsets[lo:hi].tolist() + self._pending.get(int(short), []))
                    for key, short, (lo, hi) in zip(keys, shorts, spans)]

    @staticmethod
    def _read(f, key: str, offsets: list[int]) -> str | None:
        """The output of the record at one of the offsets whose whole key is `key`, or None."""
        for offset in offsets:
            f.seek(offset)
            record = json.loads(f.readline())
            if record["key"] == key:
                return record["out"]
        return None

    def add(self, entries: list[dict[str, str]]) -> None:
        """Records new translations: rank 0 appends them to the file, and every rank then indexes them from it, so a
        line repeated in a later batch is read back as rank 0 wrote it."""
        if self.path is None:
            self._memory.update((e["key"], e["out"]) for e in entries)
            return
        distributed.on_main(_append, self.path, entries)
        self._index_tail()
