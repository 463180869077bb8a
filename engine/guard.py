"""The English guard's loop: a state is checked; while the check fails and rounds are left, a recovery round trains
and the state is checked again; the best state (passing, then by English accuracy, then by drift) is kept. What a
check measures and what a round trains are the caller's (the curriculum's english_guard).

Imports engine.adapters and engine.model.
"""
from __future__ import annotations

from typing import Any, Callable

from engine.adapters import additions_state_dict, load_additions
from engine.model import Gemma3


def _rank(check: dict[str, Any]) -> tuple:
    return check["passed"], check["accuracy"], -check["drift"]


def _snapshot(model: Gemma3) -> dict:
    return {k: v.detach().clone() for k, v in additions_state_dict(model).items()}


def recover(model: Gemma3, first: dict[str, Any], check: Callable[[], dict[str, Any]],
            train_round: Callable[[int, dict[str, Any]], None], rounds: int) -> tuple[list[dict[str, Any]], bool, int]:
    """Runs up to `rounds` recovery rounds after the check `first` of the model as it stands; returns every check,
    whether the last passed and the rounds run. A state that never passed leaves the model at the best one."""
    checks, best, done = [first], (first, _snapshot(model)), 0
    while not checks[-1]["passed"] and done < rounds:
        done += 1
        train_round(done, checks[-1])
        checks.append(check())
        if _rank(checks[-1]) > _rank(best[0]):
            best = (checks[-1], _snapshot(model))
    passed = checks[-1]["passed"]
    if not passed:
        load_additions(model, best[1], "the best guard state")
        checks.append(best[0])  # the kept state's check, last
    return checks, passed, done


def guard_record(checks: list[dict[str, Any]], passed: bool, rounds: int, reference: float, drift_bound: float
                 ) -> dict[str, Any]:
    """meta.json's guard: the reference, the kept check and its verdict line, and the history of the checks."""
    kept, history = checks[-1], checks if passed else checks[:-1]
    return {"reference": reference, "tolerance": kept["tolerance"], "threshold": kept["threshold"],
            "drift_bound": drift_bound, "history": [c["accuracy"] for c in history],
            "drift_history": [c["drift"] for c in history], "rounds": rounds, "passed": passed,
            "kept_accuracy": kept["accuracy"], "kept": kept,
            "verdict_line": f"{'passed' if passed else 'FAILED'}: {kept['line']} after {rounds} recovery "
                            f"round{'' if rounds == 1 else 's'}"}
