"""Typed command-line options: a dataclass's fields carry their help, parser type, choices and the commands that
take them (`option`), and `add_options` turns them into argparse options whose numbers are checked when parsed.

Imports nothing of medko's.
"""
from __future__ import annotations

import argparse
from dataclasses import field, fields
from typing import Any, Callable, Sequence


def option(default: Any, help: str, type: Callable | None = None, choices: Sequence[str] | None = None,
           stages: Sequence[str] | None = None) -> Any:
    """An options field: its default, --help text, parser type, choices and the stages that take it (None: all)."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "stages": stages})


def number(kind: type, low: float, high: float = float("inf"), low_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: a kind of number in [low, high] ((low, high] when low_open), refused in one sentence."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value > high or value < low or (low_open and value == low):
            bound = f"{'above' if low_open else 'at least'} {low}" + (f" and at most {high}" if high < float("inf") else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a value {bound}")
        return value
    return parse


POSITIVE, COUNT, FRACTION, ZERO_OR_MORE = number(float, 0, low_open=True), number(int, 1), number(float, 0, 1), number(int, 0)


def add_options(parser: argparse.ArgumentParser, options: type, names: Sequence[str] | None = None,
                stage: str | None = None, **defaults: Any) -> None:
    """Adds an options dataclass's fields to a parser: those named, or those `stage` takes; `defaults` override."""
    for f in fields(options):
        stages = f.metadata["stages"]
        if (names is not None and f.name not in names) or (names is None and stages and stage not in stages):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(flag, default=defaults.get(f.name, f.default), type=f.metadata["type"],
                                choices=f.metadata["choices"], help=f.metadata["help"])
