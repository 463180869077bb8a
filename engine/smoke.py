"""What `--smoke` cuts, in one place: a run that checks an install (every stage, the test split and the report)
in a few minutes on two CPU cores, whose numbers mean nothing and whose report says so.

It works on the curriculum's option and data dataclasses by field name, so it imports nothing of ours.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

T = TypeVar("T")

# Options a smoke run sets unless given: one step a phase of one example, 8 questions per exam, 8 new tokens per
# generation (decoding is the costliest measurement per item on a busy CPU: 4 held-out translations of 16 tokens took
# 34 s where scoring 8 questions took 5 s, on two shared cores). The guard's accuracy tolerance is opened fully: 8
# questions cannot hold accuracy above noise, and a smoke run must not stop on it (the guard still runs, and its
# drift bound still holds).
SMOKE_OPTIONS = {"max_steps": 1, "batch_size": 1, "eval_limit": 8, "translate_tokens": 8, "reasoning_tokens": 8}
SMOKE_TOLERANCE = 1.0
SMOKE_HELD_OUT = 4  # held-out texts and pairs per measurement
SMOKE_TEST_QUESTIONS = SMOKE_OPTIONS["eval_limit"]  # of the test split, scored once at the end


def smoke_options(opts: T) -> T:
    """`opts` with the smoke run's limits where the user gave none, when opts.smoke is set; else `opts`."""
    if not opts.smoke:
        return opts
    given = {k: v for k, v in SMOKE_OPTIONS.items() if getattr(opts, k) is None}
    return replace(opts, **given, tolerance=SMOKE_TOLERANCE)


def smoke_data(data: T, smoke: bool) -> T:
    """The run's data with its held-out sets cut to SMOKE_HELD_OUT in a smoke run; else `data`."""
    if not smoke:
        return data
    held_out = ("ko_heldout", "en_heldout", "pairs_heldout")
    return replace(data, **{k: getattr(data, k)[:SMOKE_HELD_OUT] for k in held_out})
