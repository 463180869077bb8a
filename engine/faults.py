"""What a user sees when a command ends early: SIGTERM taken like Ctrl-C, and an unexpected exception told in one
sentence with the path of a crash log that holds its traceback.

A cluster preempts a job with SIGTERM and then SIGKILL. `catch_sigterm` makes SIGTERM raise `Terminated`, a
KeyboardInterrupt, so it takes the path Ctrl-C takes (the trainer saves the last completed step) and the command
exits with 143, the shell's code for a process ended by SIGTERM, where Ctrl-C exits with 130.

Imports engine.errors.
"""
from __future__ import annotations

import datetime
import os
import signal
import traceback
from pathlib import Path
from typing import Sequence

from engine.errors import log


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised where Ctrl-C raises KeyboardInterrupt, so both save and stop alike."""


def _raise_terminated(signum: int, frame: object) -> None:
    # A second SIGTERM while the first one's save runs must not cut that save short; SIGKILL still ends it.
    signal.signal(signal.SIGTERM, _ignore_again)
    raise Terminated()


def _ignore_again(signum: int, frame: object) -> None:
    log.info("SIGTERM again: still saving the last completed step")


def catch_sigterm() -> None:
    """SIGTERM raises Terminated from now on (in the main thread, the only one Python delivers signals to)."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def interrupt_code(err: KeyboardInterrupt) -> int:
    """The exit code of an interrupted command: 143 for SIGTERM (128 + 15), 130 for Ctrl-C (128 + 2)."""
    return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)


def interrupt_word(err: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"


def interrupt_line(err: KeyboardInterrupt, what: str, then: str) -> str:
    """The one line of an interrupted stage: what stopped, how, what was lost (err.kept, set by the trainer when
    FSDP2 could not save the last step) and what to do `then`."""
    lost = f"{err.kept}; " if hasattr(err, "kept") else ""
    return f"medko: {what} {interrupt_word(err)}; {lost}{then}"


def crash_directory() -> Path:
    """Where commands without a stage directory keep their crash logs: ~/.cache/medko, or $MEDKO_CACHE."""
    return Path(os.environ.get("MEDKO_CACHE", "~/.cache/medko")).expanduser()


def crash_report(err: BaseException, what: str, directories: Sequence[Path] = (), debug: bool = False) -> str:
    """One line for an exception nobody foresaw, "medko: " and a sentence: what failed, the exception, and the crash
    log holding the full traceback, written in the first of `directories` that exists, else crash_directory(). With
    debug the traceback comes first, inline."""
    text = "".join(traceback.format_exception(err))
    name = f"crash-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}-{os.getpid()}.log"
    saved = ""
    for where in [d for d in directories if d.is_dir()][:1] + [crash_directory()]:
        try:
            where.mkdir(parents=True, exist_ok=True)
            (where / name).write_text(text, encoding="utf-8")
            saved = f"; the full traceback is in {where / name}"
            break
        except OSError:
            continue
    summary = str(err).splitlines()[0] if str(err) else "no message"
    sentence = (f"medko: {what} failed unexpectedly with {type(err).__name__}: {summary}{saved}; please report it with that "
                f"file, or run again with --debug to see the traceback here")
    return f"{text}{sentence}" if debug else sentence
