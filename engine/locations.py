"""Where a data set's files are: a local file or directory, or a hub repository's split (cached, offline when
HF_HUB_OFFLINE=1), through Source (a location and a field mapping); the default hub source of each role.

Imports engine.errors and engine.hub.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

from engine.errors import MedkoError
from engine.hub import hub_snapshot

DATA_SUFFIXES_BY_PREFERENCE = (".parquet", ".jsonl", ".json", ".csv", ".txt")


@dataclass
class Source:
    """A data set on the hub or in a local file or directory, read through a field mapping.

    Hub schemas change, so every field can be renamed: mapping is medko's field name -> the source's.
    """

    location: str  # hub id "owner/name", or a local file or directory
    mapping: dict[str, str] = field(default_factory=dict)  # e.g. {"question": "q", "answer": "label"}
    split: str = "train"  # hub split, matched against file names ({split}-*.parquet, {split}.jsonl)
    subset: str = ""  # hub sub-directory (a config such as "doctor"); empty for none


# Default hub sources by role (DESIGN "Data"); a local file with a mapping replaces any of them.
SOURCES: Mapping[str, Source] = MappingProxyType({
    "medqa": Source("GBaker/MedQA-USMLE-4-options", {"answer": "answer_idx"}),  # "answer" holds the text
    "ko_text": Source("ChuGyouk/Asan-AMC-Healthinfo"),  # instruction/output rows: load_instructions
    # Columns inferred from third-party code, not verified: question, A-E, answer (1-5), thinking, response.
    "reasoning": Source("ChuGyouk/medical-reasoning-train-kormedmcqa", {"reasoning": "thinking"}),
})


def _hub_matches(repo_id: str, patterns: list[str], local_hint: str) -> list[Path]:
    root = hub_snapshot(repo_id, patterns, local_hint=local_hint)
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and any(fnmatch.fnmatch(p.relative_to(root).as_posix(), pat) for pat in patterns))


def hub_files(repo_id: str, patterns: list[str], local_hint: str, single_file: bool = False) -> list[Path]:
    """The repository's files matching patterns; with single_file, a repository holding one data file whose name
    names no split (Asan-AMC-Healthinfo.jsonl) gives that file when the patterns match nothing."""
    files = _hub_matches(repo_id, patterns, local_hint)
    if not files and single_file:
        data = _hub_matches(repo_id, [f"*{suffix}" for suffix in DATA_SUFFIXES_BY_PREFERENCE if suffix != ".json"],
                            local_hint)
        files = data if len(data) == 1 else []
    if not files:
        raise MedkoError(f"{repo_id} has no files matching {patterns}"
                         f"{' nor a single data file' if single_file else ''} in the cache or on the hub; check "
                         f"the split and subset names, {local_hint}")
    return files


def source_files(source: str | Path | Source) -> list[Path]:
    """The data files behind a source: a local file, a local directory's {split}* files, or a hub split."""
    if not isinstance(source, Source):
        source = Source(str(source))
    path = Path(source.location)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = one_format(sorted(p for p in path.rglob("*") if p.name.startswith(source.split)))
        if not files:
            raise MedkoError(f"{path} holds no {source.split}*.jsonl/.parquet/.csv files; check the split name")
        return files
    if path.suffix in DATA_SUFFIXES_BY_PREFERENCE:
        raise MedkoError(f"{path} does not exist; check the path")
    prefix = f"{source.subset}/" if source.subset else ""
    patterns = [f"{prefix}*{source.split}{tail}" for tail in ("-*.parquet", ".parquet", "-*.jsonl", ".jsonl", ".csv")]
    return one_format(hub_files(source.location, patterns, "or give a local file with a field mapping",
                                  single_file=not source.subset))


def one_format(files: Sequence[Path]) -> list[Path]:
    # A repository may hold the same split in two formats (parquet beside jsonl); read only one.
    for suffix in DATA_SUFFIXES_BY_PREFERENCE:
        chosen = [f for f in files if f.suffix == suffix]
        if chosen:
            return chosen
    return []
