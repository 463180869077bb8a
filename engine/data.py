"""Data sources and loaders: hub or local files (JSONL, parquet, CSV) read through field mappings into MCQs,
texts, pairs and instructions, held whole (Rows) or read as they are used (Stream); KorMedMCQA; split overlap; the
files s0 wrote, read lazily.

Imports engine.errors, engine.locations, engine.records and engine.rows.
"""
from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from engine.errors import MedkoError, log
from engine.locations import SOURCES, Source, hub_files, one_format, source_files  # noqa: F401 (SOURCES: re-exported)
from engine.records import ENCODINGS, BadRow, nfc, read_records, text_lines  # noqa: F401 (ENCODINGS: re-exported)
from engine.rows import JsonlRows

LETTERS = "ABCDE"
KORMEDMCQA = "sean0042/KorMedMCQA"
KORMEDMCQA_SUBSETS = ("doctor", "nurse", "pharm", "dentist")
KORMEDMCQA_SPLITS = ("train", "dev", "test", "fewshot")


@dataclass
class MCQ:
    id: str  # stable: subset/split/row for KorMedMCQA, file stem/row otherwise, or the source's own id
    subset: str  # doctor, nurse, pharm, dentist; the row's subject or the file's stem for other sources
    question: str
    options: dict[str, str]  # letter -> text, A-D or A-E in order
    answer: str  # gold letter, one of the options
    lang: str = "ko"  # language of question and options
    reasoning: str = ""  # worked explanation (reasoning sources only)
    meta: dict[str, Any] = field(default_factory=dict)  # the source's other fields: year, period, q_number, cot


@dataclass
class Pair:
    src: str
    tgt: str


@dataclass
class Instruction:
    prompt: str  # instruction, then the input (if any) after a blank line
    output: str


class Rows(list):
    """A loader's rows; `skipped` counts bad rows left out under skip_bad, `dropped` repeated rows left out,
    `normalized` rows that NFC changed; `where` is each row's file:line, and `files` and `columns` say where they
    came from (the columns of the first record), for messages about a source."""

    skipped: int = 0
    dropped: int = 0
    normalized: int = 0
    repeated: int = 0  # rows equal to an earlier row, kept (engine.sources.check_repeats)
    conflicting: int = 0  # rows left out because their question repeats with another answer
    files: tuple[Path, ...] = ()
    columns: tuple[str, ...] = ()

    def __init__(self, rows: Iterable[Any] = (), where: Iterable[str] = ()):
        super().__init__(rows)
        self.where = list(where)

    @classmethod
    def of(cls, stream: "Stream") -> "Rows":
        """A stream's rows held whole, with its counts and provenance."""
        rows = cls()
        for row, where in stream:
            rows.append(row)
            rows.where.append(where)
        rows.skipped, rows.dropped, rows.normalized = stream.skipped, stream.dropped, stream.normalized
        rows.files, rows.columns = stream.files, stream.columns
        return rows


class Stream:
    """A loader's rows read as they are used: iterating gives each row once, as (row, where), and leaves the counts
    Rows keeps (skipped, dropped, normalized, files, columns) complete when it ends. s0 reads its sources so, and
    holds none whole; Rows.of(stream) holds one."""

    skipped: int = 0
    dropped: int = 0
    normalized: int = 0
    files: tuple[Path, ...] = ()
    columns: tuple[str, ...] = ()

    def __init__(self, read: Callable[["Stream"], Iterator[tuple[Any, str]]]):
        self._read = read

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        return self._read(self)


def fingerprint(value: Any) -> bytes:
    """16 bytes that stand for a value of strings, numbers and tuples of them (a row's question and options, a
    text): what checks over every row of a source keep in its place, as two rows' fingerprints are equal only
    when the rows are (blake2b; a chance collision is beyond reach)."""
    return hashlib.blake2b(repr(value).encode("utf-8", "surrogatepass"), digest_size=16).digest()


# The roles whose fields --map renames (ROLE.FIELD=COLUMN), with the fields each role reads.
MAP_ROLES: Mapping[str, set[str]] = MappingProxyType({
    "exam": {"question", "answer", *LETTERS}, "medqa": {"id", "subset", "question", "options", "answer", *LETTERS},
    "ko_text": {"text", "instruction", "input", "output"}, "en_text": {"text"}, "pairs": {"ko", "en"},
    "reasoning": {"id", "subset", "question", "options", "answer", "reasoning", *LETTERS}})


def parse_field_map(text: str | None) -> dict[str, dict[str, str]]:
    """--map "ROLE.FIELD=COLUMN,..." as {role: {medko's field: the source's column}}; unknown roles or fields are
    refused by name."""
    out: dict[str, dict[str, str]] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        target, _, column = item.partition("=")
        role, _, name = target.partition(".")
        if not column or not name or role not in MAP_ROLES:
            raise MedkoError(f"--map {item!r} is not ROLE.FIELD=COLUMN with ROLE one of {sorted(MAP_ROLES)}")
        if name not in MAP_ROLES[role]:
            raise MedkoError(f"--map {item!r}: {role} has no field {name!r}; its fields are {sorted(MAP_ROLES[role])}")
        out.setdefault(role, {})[name] = column
    return out


def require_rows(count: int, tally: Rows | Stream, role: str, source: Any) -> None:
    """A source that yields no rows (count, with tally's counts) is an error naming the source, its files and
    their columns."""
    if not count:
        files = ", ".join(map(str, tally.files)) or "no files"
        columns = ", ".join(tally.columns) or "no rows at all"
        raise MedkoError(f"{role} source {getattr(source, 'location', source)} yielded no rows (files: {files}; "
                         f"columns: {columns}{'; every row was skipped as bad' if tally.skipped else ''}); map its "
                         f"fields with --map {role}.FIELD=COLUMN or give another file")


def _parse_rows(tally: Stream, files: Sequence[Path], parse: Callable[[Path, int, dict[str, Any]], Any],
                skip_bad: bool, encoding: str = "utf-8") -> Iterator[tuple[Any, str]]:
    """parse(path, row index, record) over every record, NFC-normalised (rows it changed are counted in tally); a
    bad row stops the load, or is counted under skip_bad."""
    tally.files += tuple(files)
    skipped = 0
    for path in files:
        for index, (line, record) in enumerate(read_records(path, encoding)):
            if not tally.columns and isinstance(record, dict):
                tally.columns = tuple(record)
            try:
                if isinstance(record, BadRow):
                    raise record
                normal = nfc(record)
                tally.normalized += normal != record
                row = parse(path, index, normal)
            except BadRow as err:
                if not skip_bad:
                    raise MedkoError(f"{path}:{line}: {err}; fix the row, or skip bad rows with --skip-bad") from None
                log.warning("%s:%d: %s; skipped", path, line, err)
                tally.skipped += 1
                skipped += 1
                continue
            yield row, f"{path}:{line}"
    if skipped:
        log.warning("skipped %d bad rows in %s", skipped, ", ".join(map(str, files)))


def _mapping(source: str | Path | Source, mapping: Mapping[str, str] | None, known: set[str]) -> dict[str, str]:
    merged = {**(source.mapping if isinstance(source, Source) else {}), **(mapping or {})}
    unknown = set(merged) - known
    if unknown:
        raise MedkoError(f"unknown field mapping keys {sorted(unknown)} for {source}; known keys are {sorted(known)}")
    return merged


def _field(record: dict[str, Any], name: str, mapping: Mapping[str, str], required: bool = True) -> Any:
    key = mapping.get(name, name)
    value = record.get(key)
    if required and (value is None or str(value).strip() == ""):
        what = f"field {key!r}" + (f" (medko's {name!r})" if key != name else "")
        raise BadRow(f"{what} is missing or empty")
    return value


def _options(record: dict[str, Any], mapping: Mapping[str, str]) -> dict[str, str]:
    raw = record.get(mapping.get("options", "options"))
    if isinstance(raw, dict):
        items = sorted((str(k), v) for k, v in raw.items())
    elif isinstance(raw, list):
        if len(raw) not in (4, 5):
            raise BadRow(f"{len(raw)} options; a question needs 4 or 5")
        items = list(zip(LETTERS, raw))
    else:
        # Columns A..E; E absent (or null) makes a four-option row.
        items = [(letter, record.get(mapping.get(letter, letter))) for letter in LETTERS]
        if items[-1][1] is None:
            items.pop()
    letters = "".join(k for k, _ in items)
    if letters not in ("ABCD", "ABCDE"):
        raise BadRow(f"options must be A-D or A-E, got {', '.join(k for k, _ in items) or 'none'}")
    options = {}
    for letter, text in items:
        if text is None or not str(text).strip():
            raise BadRow(f"option {letter} is missing or empty")
        options[letter] = str(text)  # as written: the harness prompt does not strip options
    return options


def _answer(value: Any, letters: str) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        value = value.strip()
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        # Numeric answers are 1-based, as in KorMedMCQA.
        if not 1 <= value <= len(letters):
            raise BadRow(f"answer {value} is out of range 1-{len(letters)}")
        return letters[value - 1]
    if isinstance(value, str) and len(value) == 1 and value in LETTERS:
        if value not in letters:
            raise BadRow(f"answer {value} is not among the options {letters[0]}-{letters[-1]}")
        return value
    raise BadRow(f"answer {value!r} is neither a letter A-E nor a number 1-5")


MCQ_FIELDS = {"id", "subset", "question", "options", "answer", "reasoning", *LETTERS}


def _mcq_parser(mapping: Mapping[str, str], lang: str, need_reasoning: bool, id_prefix: str | None = None,
                subset: str | None = None) -> Callable[[Path, int, dict[str, Any]], MCQ]:
    used = {mapping.get(name, name) for name in MCQ_FIELDS} | {"subject"}

    def parse(path: Path, index: int, record: dict[str, Any]) -> MCQ:
        question = _field(record, "question", mapping)
        options = _options(record, mapping)
        answer = _answer(_field(record, "answer", mapping), "".join(options))
        reasoning = _field(record, "reasoning", mapping, required=need_reasoning) or ""
        row_subset = subset or _field(record, "subset", mapping, required=False) or record.get("subject") or path.stem
        row_id = _field(record, "id", mapping, required=False)
        if row_id is None:
            row_id = f"{id_prefix or path.stem}/{index:04d}"
        meta = {k: v for k, v in record.items() if k not in used}
        return MCQ(str(row_id), str(row_subset), str(question), options, answer, lang, str(reasoning), meta)

    return parse


def stream_mcq_file(source: str | Path | Source, mapping: Mapping[str, str] | None = None, lang: str = "en",
                    skip_bad: bool = False, encoding: str = "utf-8", need_reasoning: bool = False) -> Stream:
    """Multiple-choice rows from JSONL, parquet or CSV (or a hub Source); need_reasoning: each row carries a worked
    `reasoning` text (s5).

    Options are columns A..E or an `options` dict/list (MedQA); the answer is a letter or a 1-based number.
    """
    parse = _mcq_parser(_mapping(source, mapping, MCQ_FIELDS), lang, need_reasoning)
    return Stream(lambda tally: _parse_rows(tally, source_files(source), parse, skip_bad, encoding))


def load_mcq_file(source: str | Path | Source, mapping: Mapping[str, str] | None = None, lang: str = "en",
                  skip_bad: bool = False, encoding: str = "utf-8") -> Rows:
    return Rows.of(stream_mcq_file(source, mapping, lang, skip_bad, encoding))


def load_reasoning(source: str | Path | Source, mapping: Mapping[str, str] | None = None, lang: str = "ko",
                   skip_bad: bool = False, encoding: str = "utf-8") -> Rows:
    return Rows.of(stream_mcq_file(source, mapping, lang, skip_bad, encoding, need_reasoning=True))


def stream_kormedmcqa(subsets: str | Sequence[str] = KORMEDMCQA_SUBSETS, split: str = "test",
                      source: str | Path = "hub", lang: str = "ko", skip_bad: bool = False,
                      mapping: Mapping[str, str] | None = None, encoding: str = "utf-8") -> Stream:
    """KorMedMCQA rows with ids subset/split/row, from the hub or a local directory.

    A local directory is laid out like the hub: {subset}/{split}*.parquet or {subset}/{split}*.jsonl.
    """
    subsets = [subsets] if isinstance(subsets, str) else list(subsets)
    unknown = [s for s in subsets if s not in KORMEDMCQA_SUBSETS]
    if unknown or split not in KORMEDMCQA_SPLITS:
        raise MedkoError(f"unknown KorMedMCQA subset {unknown} or split {split!r}; subsets are "
                         f"{list(KORMEDMCQA_SUBSETS)} and splits {list(KORMEDMCQA_SPLITS)}")
    hint = "or pass a local directory laid out {subset}/{split}.jsonl (data/kormedmcqa is one)"
    if source == "hub":
        files = hub_files(KORMEDMCQA, [f"{s}/{split}-*.parquet" for s in subsets], hint)
        root = files[0].parents[1]
    else:
        root = Path(source)
        if not root.is_dir():
            raise MedkoError(f"KorMedMCQA source {root} is not a directory; {hint}")

    def read(tally: Stream) -> Iterator[tuple[MCQ, str]]:
        for subset in subsets:
            files = one_format(sorted((root / subset).glob(f"{split}*")))
            if not files:
                raise MedkoError(f"{root / subset} has no {split}*.parquet or {split}*.jsonl; check the directory")
            parser = _mcq_parser(mapping or {}, lang, need_reasoning=False, id_prefix=f"{subset}/{split}",
                                 subset=subset)
            yield from _drop_repeats(tally, _parse_rows(tally, files, parser, skip_bad, encoding), f"{subset}/{split}")

    return Stream(read)


def load_kormedmcqa(subsets: str | Sequence[str] = KORMEDMCQA_SUBSETS, split: str = "test",
                    source: str | Path = "hub", lang: str = "ko", skip_bad: bool = False,
                    mapping: Mapping[str, str] | None = None, encoding: str = "utf-8") -> Rows:
    return Rows.of(stream_kormedmcqa(subsets, split, source, lang, skip_bad, mapping, encoding))


def _drop_repeats(tally: Stream, rows: Iterable[tuple[MCQ, str]], where: str) -> Iterator[tuple[MCQ, str]]:
    # The hub has held one split twice (a re-upload beside the original shard); keep the first copy.
    seen, dropped = set(), 0
    for row, at in rows:
        key = fingerprint((row.question, tuple(row.options.items()), row.answer))
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        yield row, at
    if dropped:
        log.warning("%s: dropped %d repeated rows", where, dropped)
    tally.dropped += dropped


def stream_texts(source: str | Path | Source, field: str = "text", skip_bad: bool = False,
                 encoding: str = "utf-8") -> Stream:
    """Plain texts: a field of JSONL/parquet/CSV rows, or a .txt file with one text per blank-line block.

    Instruction rows (no text field, an output field: Asan-AMC-Healthinfo's schema) give their output.
    """
    mapping = dict(source.mapping) if isinstance(source, Source) else {}
    parse = _text_parser(mapping.get("text", field), mapping.get("output", "output"))

    def read(tally: Stream) -> Iterator[tuple[str, str]]:
        for path in source_files(source):
            if path.suffix == ".txt":
                yield from _text_blocks(tally, path, encoding)
            else:
                yield from _parse_rows(tally, [path], parse, skip_bad, encoding)

    return Stream(read)


def load_texts(source: str | Path | Source, field: str = "text", skip_bad: bool = False,
               encoding: str = "utf-8") -> Rows:
    return Rows.of(stream_texts(source, field, skip_bad, encoding))


def _text_blocks(tally: Stream, path: Path, encoding: str) -> Iterator[tuple[str, str]]:
    """A .txt file's texts: each run of lines that are not blank, stripped, where it starts."""
    block: list[str] = []
    start = 0
    for number, line in chain(text_lines(path, encoding), [(0, "")]):  # a blank line after the last ends its block
        if line.strip():
            start = start if block else number
            block.append(line.removesuffix("\n"))
        elif block:
            text = "\n".join(block).strip()
            tally.normalized += nfc(text) != text
            yield nfc(text), f"{path}:{start}"
            block = []


def stream_pairs(source: str | Path | Source, src: str = "ko", tgt: str = "en", skip_bad: bool = False,
                 encoding: str = "utf-8") -> Stream:
    """Parallel text pairs from the fields src and tgt of each row."""
    mapping = source.mapping if isinstance(source, Source) else {}
    parse = _pair_parser(src, tgt, mapping)
    return Stream(lambda tally: _parse_rows(tally, source_files(source), parse, skip_bad, encoding))


def load_pairs(source: str | Path | Source, src: str = "ko", tgt: str = "en", skip_bad: bool = False,
               encoding: str = "utf-8") -> Rows:
    return Rows.of(stream_pairs(source, src, tgt, skip_bad, encoding))


def _text_parser(field: str, output: str) -> Callable[[Path, int, dict[str, Any]], str]:
    def parse(path: Path, index: int, record: dict[str, Any]) -> str:
        if field not in record and output in record:
            return str(_field(record, "output", {"output": output}))
        return str(_field(record, "text", {"text": field}))

    return parse


def _pair_parser(src: str, tgt: str, mapping: Mapping[str, str]) -> Callable[[Path, int, dict[str, Any]], Pair]:
    return lambda path, index, r: Pair(str(_field(r, src, mapping)), str(_field(r, tgt, mapping)))


def lazy_rows(path: Path, kind: str, lang: str = "ko") -> JsonlRows:
    """A JSONL file in medko's own fields (as s0 writes them) as rows read when used (engine.rows.JsonlRows): kind
    "mcq", "reasoning", "text" or "pair" gives what load_mcq_file, load_reasoning, load_texts or load_pairs give."""
    parsers = {"mcq": _mcq_parser({}, lang, need_reasoning=False),
               "reasoning": _mcq_parser({}, lang, need_reasoning=True),
               "text": _text_parser("text", "output"), "pair": _pair_parser("ko", "en", {})}
    return JsonlRows(path, parsers[kind])


def load_instructions(source: str | Path | Source, mapping: Mapping[str, str] | None = None,
                      skip_bad: bool = False) -> Rows:
    """Instruction rows: instruction, optional input, output."""
    mapping = _mapping(source, mapping, {"instruction", "input", "output"})

    def parse(path: Path, index: int, record: dict[str, Any]) -> Instruction:
        prompt = str(_field(record, "instruction", mapping))
        extra = _field(record, "input", mapping, required=False)
        return Instruction(f"{prompt}\n\n{extra}" if extra else prompt, str(_field(record, "output", mapping)))

    return Rows.of(Stream(lambda tally: _parse_rows(tally, source_files(source), parse, skip_bad)))


def normalize_question(text: str) -> str:
    """Question text for overlap checks: NFKC, lower case, punctuation as spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def split_overlap(splits: Mapping[str, Sequence[MCQ]]) -> dict[str, list[tuple[str, str]]]:
    """For every pair of splits ("train/test", ...), the (id, id) pairs whose normalised questions are equal. Only a
    fingerprint of each question is held; the rows whose questions meet another split's are read again."""
    keys = {}
    for name, rows in splits.items():
        digests = bytearray()
        for row in rows:
            digests += fingerprint(normalize_question(row.question))
        keys[name] = np.frombuffer(bytes(digests), dtype="V16")

    def index(name: str, other: str) -> dict[str, list[str]]:
        """name's ids by normalised question, for the questions other also has, in name's order."""
        out: dict[str, list[str]] = {}
        for i in np.flatnonzero(np.isin(keys[name], keys[other])):
            row = splits[name][int(i)]
            out.setdefault(normalize_question(row.question), []).append(row.id)
        return out

    names = list(splits)
    out: dict[str, list[tuple[str, str]]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            index_b = index(b, a)
            out[f"{a}/{b}"] = [(x, y) for key, ids in index(a, b).items() for x in ids for y in index_b.get(key, ())]
    return out


def mcq_record(row: MCQ) -> dict[str, Any]:
    return {"id": row.id, "subset": row.subset, "question": row.question, **row.options, "answer": row.answer,
            **({"reasoning": row.reasoning} if row.reasoning else {})}
