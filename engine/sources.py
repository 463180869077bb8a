"""s0's sources and held-out sets: every role (exam, English MCQ, Korean and English text, pairs, reasoning)
read from the bundled data, a local directory, a file per role or the hub, each through its field mapping, once,
into a spool (engine.spool), so that no source is held whole; skip and repeat counts per source; the held-out sets
that are never trained on; and reference translations of an exam, row for row.

Imports engine.data, engine.errors, engine.locations and engine.spool.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from engine.data import (KORMEDMCQA_SPLITS, MCQ, Pair, Stream, load_kormedmcqa, require_rows, stream_kormedmcqa,
                         stream_mcq_file, stream_pairs, stream_texts)
from engine.errors import MedkoError
from engine.locations import SOURCES, Source
from engine.spool import Spool, check_repeats, held_out

# role: its file name in a local data directory (the hub sources are engine.locations.SOURCES)
LOCAL_FILES = {"medqa": "medqa_en.jsonl", "ko_text": "ko_medical_text.jsonl", "en_text": "en_medical_text.jsonl",
               "pairs": "ko_en_pairs.jsonl", "reasoning": "reasoning_ko.jsonl"}
HELD_OUT_FILES = {"ko_text": "ko_medical_text_heldout.jsonl", "en_text": "en_medical_text_heldout.jsonl",
                  "pairs": "ko_en_pairs_heldout.jsonl"}  # held-out sets beside a local source's training files


def read_sources(root: Path | None, files: dict[str, str | None], maps: dict[str, dict[str, str]],
                 subsets: Sequence[str], skip_bad: bool, max_bad: float, directory: Path, encoding: str = "utf-8"
                 ) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    """The rows by role from `root` (None: the hub), each role replaceable by a file in `files`, each read through
    its field mapping (`maps`, over any default) and its text files decoded as `encoding` (engine.records), each
    into a spool in `directory` (the exam: one a split). Returns the spools and, per source, the rows skipped as
    bad (under skip_bad), dropped as repeats, dropped for conflicting answers (check_repeats), repeated and kept,
    and changed by NFC; a source that yields no rows, or whose bad share passes max_bad, is refused."""

    def source(role: str) -> Source | None:
        """The role's file, else the data directory's file, else the hub source; --map goes over any of them."""
        flag, hub_source = files.get(role), SOURCES.get(role)
        path = flag or (None if root is None else root / LOCAL_FILES[role])
        if path is None and hub_source is None:
            return None
        if path is None:
            default = hub_source.mapping
        else:  # a local directory's MedQA keeps the hub's columns; a file given by flag is read as it is
            default = {} if flag or role != "medqa" else hub_source.mapping
        return Source(str(path) if path else hub_source.location, {**default, **maps.get(role, {})})

    def spooled(name: str, kind: str, role: str, src: Source | None, load: Callable[[Source], Stream],
                lang: str = "ko") -> Spool:
        spool = Spool(directory, name, kind, lang)
        if src is not None:
            spool.fill(load(src))
            require_rows(len(spool), spool.tally, role, src)
        return spool

    location = "hub" if root is None else str(root / "kormedmcqa")
    exam = {s: spooled(f"exam_{s}", "mcq", "exam", Source(location, maps.get("exam", {})),
                       lambda src, s=s: stream_kormedmcqa(list(subsets), s, src.location, skip_bad=skip_bad,
                                                          mapping=src.mapping, encoding=encoding))
            for s in KORMEDMCQA_SPLITS}
    en_mcq = spooled("en_mcq", "mcq", "medqa", source("medqa"),
                     lambda src: stream_mcq_file(src, lang="en", skip_bad=skip_bad, encoding=encoding), lang="en")
    ko_text = spooled("ko_text", "text", "ko_text", source("ko_text"),
                      lambda src: stream_texts(src, skip_bad=skip_bad, encoding=encoding))
    en_src = source("en_text")
    # The hub has no English text source of its own: MedQA vignettes serve as English medical text.
    en_text = spooled("en_text", "text", "en_text", en_src,
                      lambda src: stream_texts(src, skip_bad=skip_bad, encoding=encoding)) if en_src else \
        Spool(directory, "en_text", "text").fill((r.question, "") for r in en_mcq.rows)
    pairs = spooled("pairs", "pair", "pairs", source("pairs"),
                    lambda src: stream_pairs(src, skip_bad=skip_bad, encoding=encoding))
    reasoning = spooled("reasoning", "reasoning", "reasoning", source("reasoning"),
                        lambda src: stream_mcq_file(src, lang="ko", skip_bad=skip_bad, encoding=encoding,
                                                    need_reasoning=True))
    by_source = {**{f"exam_{s}": r for s, r in exam.items()}, "en_mcq": en_mcq, "ko_text": ko_text,
                 "en_text": en_text if en_src else None, "pairs": pairs, "reasoning": reasoning}
    for name, spool in by_source.items():
        if spool is not None:
            bad, n = spool.tally.skipped, len(spool) + spool.tally.skipped
            if bad > max_bad * n:
                raise MedkoError(f"{bad} of {n} rows of {name} are bad, more than --max-bad {max_bad:.0%}; fix that "
                                 f"source or raise --max-bad")
            check_repeats(spool, skip_bad)
    counts = {name: {"skipped": r.tally.skipped, "dropped": r.tally.dropped, "conflicting": r.conflicting,
                     "repeated": r.repeated, "normalized": r.tally.normalized} if r else NO_COUNTS
              for name, r in by_source.items()}
    return {"exam": exam, "en_mcq": en_mcq, "ko_text": ko_text, "en_text": en_text, "pairs": pairs,
            "reasoning": reasoning}, counts


NO_COUNTS = {"skipped": 0, "dropped": 0, "conflicting": 0, "repeated": 0, "normalized": 0}  # the hub's English text


def held_out_sets(source: str, spools: dict[str, Any], directory: Path, encoding: str = "utf-8"
                  ) -> dict[str, tuple[tuple[Spool, range], tuple[Spool, range]]]:
    """((spool, training rows), (spool, held-out rows)) for Korean text, English text and pairs. A local source
    names its held-out sets explicitly (HELD_OUT_FILES, written apart from the training files; spooled in
    `directory`); the hub has none, so its last tenth is held out. A held-out row that also appears in training is
    refused."""
    out = {}
    for role, name in HELD_OUT_FILES.items():
        path, train = Path(source) / name, spools[role]
        if source != "hub" and path.is_file():
            kind, load = ("pair", stream_pairs) if role == "pairs" else ("text", stream_texts)
            held = Spool(directory, f"{role}_heldout", kind).fill(load(path, encoding=encoding))
            key = (lambda p: p.src) if role == "pairs" else (lambda t: t)  # noqa: E731
            shared = {key(held.rows[int(i)]) for i in np.flatnonzero(np.isin(held.about, train.about))}
            if shared:
                raise MedkoError(f"{path} shares {len(shared)} rows with the training set, e.g. {sorted(shared)[0]!r}")
            out[role] = ((train, range(len(train))), (held, range(len(held))))
        else:
            rows, held_rows = held_out(train)
            out[role] = ((train, rows), (train, held_rows))
    return out


def reference_exam(reference: Path, rows: Sequence[MCQ], split: str, subsets: str) -> list[MCQ]:
    """The English versions of `rows` from a directory of reference translations, row for row."""
    by_id = {r.id: r for r in load_kormedmcqa(subsets.split(","), split, reference, lang="en")}
    missing = [r.id for r in rows if r.id not in by_id]
    if missing:
        raise MedkoError(f"--english-exam {reference} lacks questions {missing[:5]}; give translations of every "
                         f"{split} question")
    return [by_id[r.id] for r in rows]


def korean_training_text(texts: Iterable[str], pairs: Iterable[Pair], reasoning: Iterable[MCQ],
                         train_exam: Iterable[MCQ]) -> Iterator[str]:
    """The Korean every later stage trains on, for unseen_answers, read as it is used: texts, pairs' sources,
    reasoning rows (question, options, reasoning) and the train exam (question and options; s4 translates it)."""
    yield from texts
    yield from (p.src for p in pairs)
    yield from (f"{r.question} {' '.join(r.options.values())} {r.reasoning}" for r in reasoning)
    yield from (f"{r.question} {' '.join(r.options.values())}" for r in train_exam)


def unseen_answers(questions: Sequence[MCQ], korean_training: Iterable[str]) -> list[int]:
    """Positions of the questions whose right option's text appears in no Korean text a run trains on: what the
    model gets right there in Korean it did not read in Korean. On the bundled data these are the questions on the
    conditions held out of every training text (data/README.md), and some others.

    One scan of the text finds every answer at once, so the cost grows with the text and not with answers x text,
    which at the hub's volumes (4,000 answers, 25M characters) took a minute, and 100 at ten times. The scan's
    pattern holds only the answers' first two characters (starts_pattern): a pattern of whole answers took 20 MB
    to compile at those volumes, and 200 MB at ten times; where one matches, the answers that begin so are looked
    up by their lengths."""
    answer_of = [row.options[row.answer].strip() for row in questions]
    searched = set(answer_of) - {""}  # the empty answer is in every text
    lengths: dict[str, set[int]] = {}  # first two characters (all of a one-character answer): the answers' lengths
    for answer in searched:
        lengths.setdefault(answer[:2], set()).add(len(answer))
    found: set[str] = set()
    if searched:
        pattern = starts_pattern(set(lengths))
        for text in korean_training:
            for match in pattern.finditer(text):
                at = match.start()
                for head in (text[at], text[at:at + 2]):
                    found.update(text[at:at + n] for n in lengths.get(head, ()) if text[at:at + n] in searched)
    return [i for i, answer in enumerate(answer_of) if answer and answer not in found]


def starts_pattern(heads: set[str]) -> re.Pattern[str]:
    """A pattern that matches, empty, at every position of a text where one of `heads` begins: the heads as a
    trie, each branch point an alternation of distinct next characters and each head's end an optional
    continuation, inside a lookahead so that matches may overlap."""
    trie: dict[str, Any] = {}
    for head in heads:
        node = trie
        for ch in head:
            node = node.setdefault(ch, {})
        node[""] = {}

    def render(node: dict[str, Any]) -> str:
        branches = [re.escape(ch) + render(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        return f"(?:{body})?" if "" in node else body

    return re.compile(f"(?={render(trie)})")
