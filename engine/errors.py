"""medko's one error type and its logger.

Imports nothing of medko's.
"""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("medko")


class MedkoError(Exception):
    """An error a user can fix; its message is one sentence that says what to do."""


def setup_logging(level: int = logging.INFO) -> None:
    """Logs go to stderr so stdout carries only results."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s medko: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
