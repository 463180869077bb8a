"""A data file's records as text a model was trained to see: the file decoded in its encoding (UTF-8 with or
without a byte-order mark, CP949/EUC-KR as Korean Windows and Excel exports write, or `auto`), every string
NFC-normalised, and JSONL, CSV and parquet read into (line, record) pairs.

Imports engine.errors.
"""
from __future__ import annotations

import csv
import io
import json
import unicodedata
from pathlib import Path
from typing import Any, Iterator

from engine.errors import MedkoError, log

ENCODINGS = ("utf-8", "auto", "cp949", "euc-kr")  # --encoding's choices; auto tries UTF-8, then CP949
ENCODING_HINT = "--encoding cp949 (or euc-kr), or --encoding auto to try UTF-8 and then CP949"


class BadRow(Exception):
    """One unusable row; the message says what is wrong with it."""


def decode(path: Path, encoding: str = "utf-8") -> str:
    """The file's text. A BOM is not data, so UTF-8 drops it; `auto` logs which encoding it chose; bytes that do
    not decode are refused in one sentence naming the file, the line and the byte offset, and the option to give."""
    if encoding not in ENCODINGS:
        raise MedkoError(f"unknown encoding {encoding!r}; give one of {', '.join(ENCODINGS)}")
    data = Path(path).read_bytes()
    tries = ["utf-8", "cp949"] if encoding == "auto" else [encoding]
    failures = []
    for name in tries:
        try:
            text = data.decode("utf-8-sig" if name == "utf-8" else name)
        except UnicodeDecodeError as err:
            failures.append((name, err))
            continue
        if encoding == "auto":
            log.info("%s: read as %s (--encoding auto)", path, name.upper())
        return text
    name, err = failures[0]
    line = data.count(b"\n", 0, err.start) + 1
    tried = " nor CP949" if encoding == "auto" else ""
    hint = "check the file" if encoding == "auto" else f"give its encoding with {ENCODING_HINT}"
    raise MedkoError(f"{path}:{line}: byte offset {err.start} (0x{data[err.start]:02x}) is not {name.upper()}{tried}; "
                     f"{hint}")


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
        for line, text in enumerate(decode(path, encoding).split("\n"), 1):
            if text.strip():
                yield line, json_record(text)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise MedkoError(f"{path} is not a readable parquet file ({err}); download or write it again") from None
        yield from enumerate(table.to_pylist(), 1)
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(decode(path, encoding), newline=""))
        for record in reader:
            # An empty CSV cell is a missing value, so a 4-option row may leave column E empty.
            yield reader.line_num, {k: (v if v != "" else None) for k, v in record.items()}
    else:
        raise MedkoError(f"{path} has an unknown file type {suffix!r}; use .jsonl, .parquet or .csv")
