"""A data file's records as text a model was trained to see: the file decoded in its encoding (UTF-8 with or
without a byte-order mark, CP949/EUC-KR as Korean Windows and Excel exports write, or `auto`), every string
NFC-normalised, and JSONL, CSV and parquet read into (line, record) pairs, a line or a batch at a time, so that
reading a file holds only what is being read.

Imports engine.errors.
"""
from __future__ import annotations

import csv
import json
import unicodedata
from pathlib import Path
from typing import Any, Iterator

from engine.errors import MedkoError, log

ENCODINGS = ("utf-8", "auto", "cp949", "euc-kr")  # --encoding's choices; auto tries UTF-8, then CP949
ENCODING_HINT = "--encoding cp949 (or euc-kr), or --encoding auto to try UTF-8 and then CP949"


class BadRow(Exception):
    """One unusable row; the message says what is wrong with it."""


def checked_encoding(path: Path, encoding: str = "utf-8") -> str:
    """The codec that decodes the whole file, found in a pass over its lines before any record is read, so that a
    bad byte is refused before any row is used. UTF-8 drops a BOM, as a BOM is not data; `auto` logs which
    encoding it chose; bytes that do not decode are refused in one sentence naming the file, the line and the byte
    offset, and the option to give."""
    if encoding not in ENCODINGS:
        raise MedkoError(f"unknown encoding {encoding!r}; give one of {', '.join(ENCODINGS)}")
    tries = ["utf-8", "cp949"] if encoding == "auto" else [encoding]
    failures = []
    for name in tries:
        failure = _first_undecodable(path, _codec(name))
        if failure is None:
            if encoding == "auto":
                log.info("%s: read as %s (--encoding auto)", path, name.upper())
            return _codec(name)
        failures.append((name, failure))
    name, (line, offset, byte) = failures[0]
    tried = " nor CP949" if encoding == "auto" else ""
    hint = "check the file" if encoding == "auto" else f"give its encoding with {ENCODING_HINT}"
    raise MedkoError(f"{path}:{line}: byte offset {offset} (0x{byte:02x}) is not {name.upper()}{tried}; {hint}")


def _codec(name: str) -> str:
    return "utf-8-sig" if name == "utf-8" else name


def _raw_lines(path: Path, codec: str) -> Iterator[tuple[int, bytes, str]]:
    """(line number, line's bytes with its newline, the codec for that line): a BOM only starts a file. Decoding
    line by line is decoding the whole file: no byte of a UTF-8, CP949 or EUC-KR character is a newline."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            yield number, raw, codec if number == 1 else codec.removesuffix("-sig")


def _first_undecodable(path: Path, codec: str) -> tuple[int, int, int] | None:
    """(line, byte offset in the file, the byte) of the first byte that does not decode, or None."""
    at = 0
    for number, raw, line_codec in _raw_lines(path, codec):
        try:
            raw.decode(line_codec)
        except UnicodeDecodeError as err:
            return number, at + err.start, raw[err.start]
        at += len(raw)
    return None


def text_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, line with its newline) of a text file in its encoding (checked_encoding), one at a time."""
    codec = checked_encoding(path, encoding)
    for number, raw, line_codec in _raw_lines(path, codec):
        yield number, raw.decode(line_codec)


def nfc(value: Any) -> Any:
    """Strings in NFC, inside lists and dicts too: decomposed Hangul (NFD, from macOS file names and some
    scrapes) tokenises differently from the composed syllables a model was trained on."""
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value)
    if isinstance(value, list):
        return [nfc(v) for v in value]
    if isinstance(value, dict):
        return {nfc(k): nfc(v) for k, v in value.items()}
    return value


def json_record(text: str) -> dict[str, Any] | BadRow:
    """One JSONL line's record, or what is wrong with it."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return BadRow(f"not valid JSON ({err.msg})")
    return record if isinstance(record, dict) else BadRow("is not a JSON object")


def read_records(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """(line, record) of a JSONL, parquet or CSV file; line is the row number for parquet."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for line, text in text_lines(path, encoding):
            if text.strip():
                yield line, json_record(text)
    elif suffix == ".parquet":
        yield from _parquet_records(path)
    elif suffix == ".csv":
        with open(path, encoding=checked_encoding(path, encoding), newline="") as f:
            reader = csv.DictReader(f)
            for record in reader:
                # An empty CSV cell is a missing value, so a 4-option row may leave column E empty.
                yield reader.line_num, {k: (v if v != "" else None) for k, v in record.items()}
    else:
        raise MedkoError(f"{path} has an unknown file type {suffix!r}; use .jsonl, .parquet or .csv")


def _parquet_records(path: Path, batch_rows: int = 256) -> Iterator[tuple[int, dict[str, Any]]]:
    """A parquet file's rows a small batch at a time. A file often holds one row group, which Arrow would read and
    keep whole (buffered reads and one thread read it a page at a time), and its allocator keeps what a batch
    freed unless told to give it back: without both, reading a 100 MB file took 60 MB more."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    line = 0
    try:
        for batch in pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False).iter_batches(
                batch_size=batch_rows, use_threads=False):
            for record in batch.to_pylist():
                line += 1
                yield line, record
            pa.default_memory_pool().release_unused()
    except (pa.ArrowException, OSError) as err:
        raise MedkoError(f"{path} is not a readable parquet file ({err}); download or write it again") from None
