"""Training examples and their batches: Example (ids and which tokens are targets), ExampleFile (a stage's examples
on disk), language-modelling examples from prompts and targets (the end cut, or the middle of a long body), plain
collation and packing several examples into one row with attention confined to each.

Imports engine.errors, engine.rows and engine.tokenizer.
"""
from __future__ import annotations

import tempfile
import weakref
from array import array
from dataclasses import dataclass
from typing import Sequence

import torch

from engine.errors import MedkoError, log
from engine.rows import View
from engine.tokenizer import Tokenizer


@dataclass
class Example:
    """One training example, stored compactly (5 bytes a token, where a list of Python ints costs up to 36)."""

    ids: Sequence[int]  # BOS, prompt tokens, target tokens, EOS (kept as array("i"))
    target_mask: Sequence[bool]  # where the token itself is a target, not BOS or a prompt token (array("b") of 0/1)

    def __post_init__(self) -> None:
        self.ids = array("i", self.ids)
        self.target_mask = array("b", self.target_mask)


class ExampleFile(View):
    """Examples in an unlinked temporary file (the ids, then the mask, of each), only each one's byte offset in
    memory, so that a stage's examples cost no memory however large the data. Each process writes its own; the file
    has no name, so a failure leaves nothing behind. Read-only once built; `+` chains without copying."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()
        weakref.finalize(self, self._file.close)
        self._ends = array("q", [0])  # example k is bytes [ends[k], ends[k + 1]): 4 a token of ids, 1 of mask

    def append(self, ids: Sequence[int], target_mask: Sequence[bool]) -> None:
        self._file.seek(0, 2)
        self._file.write(array("i", ids).tobytes() + array("b", target_mask).tobytes())
        self._ends.append(self._ends[-1] + 5 * len(ids))

    def __len__(self) -> int:
        return len(self._ends) - 1

    def _one(self, k: int) -> Example:
        start, tokens = self._ends[k], (self._ends[k + 1] - self._ends[k]) // 5
        self._file.seek(start)
        data = self._file.read(5 * tokens)
        ids, mask = array("i"), array("b")
        ids.frombytes(data[:4 * tokens])
        mask.frombytes(data[4 * tokens:])
        return Example(ids, mask)


def lm_examples(tokenizer: Tokenizer, prompts: Sequence[str], targets: Sequence[str],
                max_len: int) -> ExampleFile:
    """Language-modelling examples: the targets, and EOS after them, are learned; the prompts are context.

    Plain text is a target with prompt "". An example longer than max_len loses its end; one left with
    no target token is dropped. Both are counted and logged.
    """
    if len(prompts) != len(targets):
        raise MedkoError(f"lm_examples got {len(prompts)} prompts but {len(targets)} targets; "
                         f"pass one of each per example")
    # Prompt and target are encoded apart, as at inference, where the prompt is encoded alone.
    examples, truncated, dropped = ExampleFile(), 0, 0
    for prompt, target in zip(tokenizer.encode_each(prompts), tokenizer.encode_each(targets, bos=False)):
        ids = prompt + target + [tokenizer.eos_id]
        mask = [False] * len(prompt) + [True] * (len(target) + 1)
        if len(ids) > max_len:
            truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask):
            dropped += 1
            continue
        examples.append(ids, mask)
    if truncated:
        log.info("lm_examples: truncated %d of %d examples to max_len %d tokens; dropped %d left with no target",
                 truncated, len(prompts), max_len, dropped)
    if not examples:
        raise MedkoError(f"every example's prompt fills max_len {max_len}; raise max_len or shorten the prompts")
    return examples


def cut_middle_examples(tokenizer: Tokenizer, prompts: Sequence[str], bodies: Sequence[str], endings: Sequence[str],
                        max_len: int, marker: str = " … ") -> tuple[ExampleFile, int]:
    """Examples whose target is body + ending (EOS after it); one longer than max_len loses the middle of its body,
    marked by `marker`, so that the prompt and the ending (an answer line) stay whole. Returns the examples and how
    many were cut; one whose prompt and ending alone overflow is dropped and logged."""
    mark = tokenizer.encode(marker, bos=False)
    examples, cut, dropped = ExampleFile(), 0, 0
    for prompt, body, ending in zip(tokenizer.encode_each(prompts), tokenizer.encode_each(bodies, bos=False),
                                    tokenizer.encode_each(endings, bos=False)):
        room = max_len - len(prompt) - len(ending) - 1
        if len(body) > room:
            keep = room - len(mark)
            if keep < 2:
                dropped += 1
                continue
            body = body[:keep // 2] + mark + body[len(body) - (keep - keep // 2):]
            cut += 1
        target = body + ending + [tokenizer.eos_id]
        examples.append(prompt + target, [False] * len(prompt) + [True] * len(target))
    if cut or dropped:
        log.info("cut the middle of %d of %d examples to fit max_len %d tokens; dropped %d whose prompt and ending "
                 "alone overflow", cut, len(prompts), max_len, dropped)
    if not examples:
        raise MedkoError(f"every example's prompt and ending overflow max_len {max_len}; raise --max-len")
    return examples, cut


def collate(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Right-padded {input_ids, attention_mask, target_mask}; target_mask[b, t] marks token t as a target.

    A loss therefore compares logits[:, :-1] with input_ids[:, 1:] where target_mask[:, 1:] is set.
    """
    width = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)  # pad slots are masked, so any id works
    attention = torch.zeros(len(examples), width, dtype=torch.bool)
    targets = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        attention[i, :len(e.ids)] = True
        targets[i, :len(e.ids)] = torch.tensor(e.target_mask, dtype=torch.bool)
    return {"input_ids": ids, "attention_mask": attention, "target_mask": targets}


def _first_fit(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of sizes (longest first) in rows of at most `capacity` (a longer one alone in its row)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        row = next((r for r, free in enumerate(room) if free >= sizes[i]), None)
        if row is None:
            rows.append([]), room.append(max(capacity, sizes[i]))
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= sizes[i]
    return rows


def pack(examples: Sequence[Example], max_len: int) -> dict[str, torch.Tensor]:
    """The examples in as few rows of at most max_len tokens as first-fit-decreasing finds, as short as that allows.

    attention_mask numbers the examples of a row 1, 2, ... (0 is padding); the model keeps attention inside each
    example and restarts its positions, so every example computes what it would alone. Targets never cross an
    example: each starts with BOS, which is not a target.
    """
    sizes = [len(e.ids) for e in examples]
    rows = _first_fit(sizes, max_len)
    # Filled to max_len, the last row is often short and the batch pads it to the longest: the smallest capacity
    # that keeps the row count spreads the tokens evenly (680 tokens: two rows of ~340 instead of 512 + 168).
    low, high = max(max(sizes), -(-sum(sizes) // len(rows))), max_len
    while low < high:
        capacity = (low + high) // 2
        if len(_first_fit(sizes, capacity)) <= len(rows):
            high = capacity
        else:
            low = capacity + 1
    rows = min(rows, _first_fit(sizes, high), key=lambda rs: (len(rs), max(sum(sizes[i] for i in r) for r in rs)))
    width = max(sum(sizes[i] for i in row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    segments = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row, 1):
            e = examples[i]
            ids[r, at:at + len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            segments[r, at:at + len(e.ids)] = k
            targets[r, at:at + len(e.ids)] = torch.tensor(e.target_mask, dtype=torch.bool)
            at += len(e.ids)
    return {"input_ids": ids, "attention_mask": segments, "target_mask": targets}


def text_examples(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> ExampleFile:
    return lm_examples(tokenizer, [""] * len(texts), texts, max_len)
