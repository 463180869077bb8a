"""The test split scored for comparison, and two models compared on the same test questions and held-out texts (`medko.py compare`): Korean and English
accuracy in each formulation, the English–Korean gap and how often the two languages answer alike, strict
answer-line compliance where both have it, and English held-out loss and drift from the base. Every row is paired:
exact McNemar for right/wrong outcomes, a paired bootstrap over questions or texts for means.

Imports engine.data, engine.errors, engine.evaluate, engine.model, engine.rows, engine.stats and engine.tokenizer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from engine.data import MCQ
from engine.errors import MedkoError
from engine.evaluate import evaluate
from engine.model import Gemma3
from engine.rows import Mapped
from engine.stats import accuracy_summary, bootstrap_difference, language_agreement, mcnemar
from engine.tokenizer import Tokenizer


@dataclass
class Side:
    """One model as compare sees it."""

    name: str  # a run directory, or "base (270m)"
    test: dict[str, Any]  # its test_report.json (engine.evaluate reports by formulation, as score_test_split writes)
    en_losses: list[float] = field(default_factory=list)  # per held-out English text
    drifts: list[float] = field(default_factory=list)  # per held-out English text, KL(base || model)


def score_exams(model: Gemma3, tokenizer: Tokenizer, rows: Sequence[MCQ], english: Sequence[MCQ] | None,
                formulation: str, unseen: set[str], name: str) -> dict[str, Any]:
    """A Korean exam and (when given) its row-aligned English version, each in both formulations, with EN↔KO
    agreement overall and on the `unseen` question ids; the top level is the Korean exam in `formulation`, and
    "english" the English one's outcomes."""
    if english is not None:  # row-aligned by id; a smoke run scores the first Korean rows only
        at = {r.id: k for k, r in enumerate(english)}  # ids alone: the rows stay where they are read from
        english = Mapped([at[r.id] for r in rows if r.id in at], english.__getitem__)
    formulations = {}
    for mode in ("logits", "cloze"):
        ko = evaluate(model, tokenizer, rows, mode, "ko", progress=True, model_name=name)
        scored = {"ko": asdict(ko)}
        if english is not None:
            en = evaluate(model, tokenizer, english, mode, "en", progress=True, model_name=name)
            scored["en"] = asdict(en)
            scored["languages"] = language_agreement(ko.predictions, en.predictions)
            if unseen:
                pick = lambda preds: [p for p in preds if p["id"] in unseen]  # noqa: E731
                scored["languages_unseen"] = language_agreement(pick(ko.predictions), pick(en.predictions))
        formulations[mode] = scored
    report = {**formulations[formulation]["ko"], "formulation": formulation, "formulations": formulations}
    if "en" in formulations[formulation]:
        en = formulations[formulation]["en"]
        report["english"] = {"accuracy": en["accuracy"], "n": en["n"], "correct": [e["correct"] for e in en["predictions"]]}
    return report


def _correct(test: dict[str, Any], mode: str, lang: str, ids: Sequence[str] | None = None) -> list[bool] | None:
    scored = test.get("formulations", {}).get(mode, {}).get(lang)
    if scored is None:
        return None
    by_id = {p["id"]: p for p in scored["predictions"]}
    return [bool(by_id[i]["correct"]) for i in (ids if ids is not None else by_id)]


def _preds(test: dict[str, Any], mode: str, lang: str) -> dict[str, str | None]:
    return {p["id"]: p["pred"] for p in test["formulations"][mode][lang]["predictions"]}


def _accuracy_row(label: str, a: list[bool], b: list[bool]) -> dict[str, Any]:
    test = mcnemar(a, b)
    return {"measure": label, "kind": "accuracy", "a": accuracy_summary(a), "b": accuracy_summary(b),
            "change": accuracy_summary(b)["value"] - accuracy_summary(a)["value"], **test}


def _mean_row(label: str, a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    diff = bootstrap_difference(a, b)
    return {"measure": label, "kind": "mean", "a": {"value": diff["before"], "n": diff["n"]},
            "b": {"value": diff["after"], "n": diff["n"]}, "change": diff["change"], "low": diff["low"],
            "high": diff["high"]}


def compare(a: Side, b: Side, unseen: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The rows of the comparison of b against a (change = b − a), on the questions both were scored on."""
    rows = []
    ids = [p["id"] for p in a.test["predictions"] if p["id"] in {q["id"] for q in b.test["predictions"]}]
    if not ids:
        raise MedkoError(f"{a.name} and {b.name} share no test question; compare runs made from the same data")
    for mode in ("cloze", "logits"):
        ko_a, ko_b = _correct(a.test, mode, "ko", ids), _correct(b.test, mode, "ko", ids)
        if ko_a is None or ko_b is None:
            continue
        rows.append(_accuracy_row(f"Korean {mode}", ko_a, ko_b))
        keep = [i for i, q in enumerate(ids) if q in set(unseen)]
        if keep:
            rows.append(_accuracy_row(f"Korean {mode}, answer not in Korean training text",
                                      [ko_a[i] for i in keep], [ko_b[i] for i in keep]))
        en_a, en_b = _correct(a.test, mode, "en", ids), _correct(b.test, mode, "en", ids)
        if en_a is None or en_b is None:
            continue
        rows.append(_accuracy_row(f"English {mode}", en_a, en_b))
        gap = lambda en, ko: [float(e) - float(k) for e, k in zip(en, ko)]  # noqa: E731
        rows.append(_mean_row(f"EN−KO gap {mode}", gap(en_a, ko_a), gap(en_b, ko_b)))
        alike = [[side_preds["ko"][q] == side_preds["en"][q] for q in ids]
                 for side_preds in ({lang: _preds(s.test, mode, lang) for lang in ("ko", "en")} for s in (a, b))]
        rows.append(_accuracy_row(f"answered alike EN/KO {mode}", alike[0], alike[1]))
    if a.test.get("reasoning") and b.test.get("reasoning"):
        rows.append(_accuracy_row("strict answer-line compliance", a.test["reasoning"]["strict"],
                                  b.test["reasoning"]["strict"]))
    if a.en_losses and b.en_losses:
        rows.append(_mean_row("English held-out loss", a.en_losses, b.en_losses))
        rows.append(_mean_row("English drift from the base", a.drifts, b.drifts))
    return rows


def _value(row: dict[str, Any], side: str) -> str:
    v = row[side]
    if row["kind"] == "accuracy":
        return f"{v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
    return f"{v['value']:.4f}"


def _test(row: dict[str, Any]) -> str:
    if row["kind"] == "accuracy":
        return f"{row['change']:+.3f} (McNemar +{row['gained']}/−{row['lost']}, p {row['p']:.3g})"
    return f"{row['change']:+.4f} (95% CI {row['low']:+.4f} to {row['high']:+.4f}, paired bootstrap)"


def table(a: Side, b: Side, rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row a measure, A, B, and the paired change B − A with its test; n in each accuracy cell's
    interval and in the header."""
    n = rows[0]["a"]["n"] if rows else 0
    lines = [f"A = {a.name}, B = {b.name}; test split, n {n} questions (held-out English: texts)", "",
             "| measure | A | B | B − A |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['measure']} (n {r['a']['n']}) | {_value(r, 'a')} | {_value(r, 'b')} | {_test(r)} |" for r in rows]
    return "\n".join(lines)
