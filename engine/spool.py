"""A source held on disk while s0 checks it: its rows read once, one at a time, into a spool file of the records s0
writes for them (JSONL), with two fingerprints a row kept in memory (what the row is about, what it says), so that
the repeat and clash checks, the held-out split and the writing of s0's files hold no source whole, however large.

Imports engine.data, engine.errors, engine.files and engine.rows.
"""
from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from engine.data import MCQ, Pair, Stream, fingerprint, lazy_rows, mcq_record
from engine.errors import MedkoError, log
from engine.files import atomic_write
from engine.rows import JsonlRows

# kind: the record s0 writes for a row of it (engine.data.lazy_rows reads it back)
RECORDS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "mcq": mcq_record, "reasoning": mcq_record, "text": lambda text: {"text": text},
    "pair": lambda pair: {"ko": pair.src, "en": pair.tgt}}


def identity(row: Any) -> tuple[Any, Any]:
    """(what a row is about, what it says about it): a question with its options and its answer, a pair's source and
    its translation, a text and nothing."""
    if isinstance(row, MCQ):
        return (row.question, tuple(row.options.items())), row.answer
    if isinstance(row, Pair):
        return row.src, row.tgt
    return row, None


class Spool:
    """One source's rows in `directory`/NAME.jsonl (as s0 writes them) and NAME.where (each row's file:line, for
    messages), with each row's fingerprints; `rows` reads them back when used, `tally` holds the loader's counts."""

    def __init__(self, directory: Path, name: str, kind: str, lang: str = "ko"):
        self.name, self.kind, self.lang = name, kind, lang
        self.path, self.wheres = directory / f"{name}.jsonl", directory / f"{name}.where"
        self.tally = Stream(lambda tally: iter(()))
        self.repeated = self.conflicting = 0
        self.fill([])

    def fill(self, stream: Iterable[tuple[Any, str]]) -> "Spool":
        """Reads the stream's rows into the spool, in order; a Stream's counts stay in tally."""
        record = RECORDS[self.kind]
        about, says = bytearray(), bytearray()
        with open(self.path, "wb") as rows, open(self.wheres, "w", encoding="utf-8") as wheres:
            for row, where in stream:
                rows.write(json.dumps(record(row), ensure_ascii=False).encode() + b"\n")
                wheres.write(json.dumps(where) + "\n")
                key, value = identity(row)
                about += fingerprint(key)
                says += fingerprint(value)
        if isinstance(stream, Stream):
            self.tally = stream
        self.about, self.says = (np.frombuffer(bytes(b), dtype="V16") for b in (about, says))
        self.rows: JsonlRows = lazy_rows(self.path, self.kind, self.lang)
        return self

    def __len__(self) -> int:
        return len(self.about)

    def where(self, i: int) -> str:
        with open(self.wheres, encoding="utf-8") as f:
            return json.loads(next(islice(f, i, None)))

    def lines(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """The records of rows start..stop as s0 writes them, one line at a time."""
        with open(self.path, "rb") as f:
            yield from islice(f, start, stop)

    def keep(self, kept: np.ndarray) -> None:
        """Keeps only the rows where `kept` is true, in order."""
        with atomic_write(self.path) as tmp, open(tmp, "wb") as f:
            f.writelines(line for line, k in zip(self.lines(), kept) if k)
        with atomic_write(self.wheres) as tmp, open(tmp, "w", encoding="utf-8") as f, \
                open(self.wheres, encoding="utf-8") as wheres:
            f.writelines(line for line, k in zip(wheres, kept) if k)
        self.about, self.says = self.about[kept], self.says[kept]
        self.rows = lazy_rows(self.path, self.kind, self.lang)


def check_repeats(spool: Spool, skip_bad: bool) -> Spool:
    """Counts rows that repeat an earlier one (kept, in spool.repeated) and refuses, naming both rows, a row that
    repeats an earlier one's question or source with another answer or translation; under skip_bad every row of
    such a clash is dropped (no one can tell which is right) and counted in spool.conflicting."""
    name, n = spool.name, len(spool)
    _, first_of_key, key_of = np.unique(spool.about, return_index=True, return_inverse=True)
    first = first_of_key[key_of.reshape(-1)]  # each row's first row with its key
    later = first != np.arange(n)
    same = spool.says == spool.says[first]
    spool.repeated, clash = int(np.sum(later & same)), later & ~same
    if clash.any() and not skip_bad:
        i = int(np.argmax(clash))
        j = int(first[i])
        value, there = (identity(spool.rows[k])[1] for k in (i, j))
        raise MedkoError(f"{name}: {spool.where(i)} repeats {spool.where(j)} with another "
                         f"{'answer' if spool.kind in ('mcq', 'reasoning') else 'translation'} ({value!r}, there "
                         f"{there!r}); fix one of them, or drop both with --skip-bad")
    if clash.any():
        dropped = np.isin(key_of.reshape(-1), key_of.reshape(-1)[clash])
        spool.conflicting = int(dropped.sum())
        log.warning("%s: dropped %d rows whose question or source repeats with another answer or translation",
                    name, spool.conflicting)
        spool.keep(~dropped)
    if spool.repeated:
        log.warning("%s: %d rows repeat an earlier row (kept, counted in s0's meta.json)", name, spool.repeated)
    return spool


def held_out(spool: Spool) -> tuple[range, range]:
    """(training, held out) rows: the last tenth (at least 2) is never trained on; losses and drift use it."""
    n = len(spool)
    keep = max(2, n // 10)
    return range(0, max(0, n - keep)), range(max(0, n - keep), n)


def write_rows(spool: Spool, rows: range, path: Path) -> int:
    """Rows of a spool written to path whole or not at all; returns how many."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.writelines(spool.lines(rows.start, rows.stop))
    return len(rows)


@contextmanager
def spooling(out: Path) -> Iterator[Path]:
    """A directory for spools beside s0's files (on their disk, not in memory), removed when the block ends."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".spool-", dir=out) as directory:
        yield Path(directory)
