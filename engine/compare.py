"""The test split scored for comparison, and two models compared on the same test questions and held-out texts (`medko.py compare`): Korean and English
accuracy in each formulation, the English–Korean gap and how often the two languages answer alike, strict
answer-line compliance where both have it, and English held-out loss and drift from the base. Every row is paired:
exact McNemar for right/wrong outcomes, a paired bootstrap over questions or texts for means.

Imports engine.data, engine.distributed, engine.errors, engine.evaluate, engine.files, engine.model, engine.rows,
engine.stats and engine.tokenizer.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from engine import distributed
from engine.data import MCQ
from engine.errors import MedkoError
from engine.evaluate import evaluate
from engine.files import atomic_write, read_json
from engine.model import Gemma3
from engine.rows import JsonlRows, Mapped
from engine.stats import accuracy_summary, bootstrap_difference, language_agreement, mcnemar
from engine.tokenizer import Tokenizer


@dataclass
class Side:
    """One model as compare sees it."""

    name: str  # a run directory, or "base (270m)"
    test: dict[str, Any]  # its test report as read_test_report reads it (by formulation, as score_exams writes)
    en_losses: list[float] = field(default_factory=list)  # per held-out English text
    drifts: list[float] = field(default_factory=list)  # per held-out English text, KL(base || model)


def score_exams(model: Gemma3, tokenizer: Tokenizer, rows: Sequence[MCQ], english: Sequence[MCQ] | None,
                formulation: str, unseen: set[str], name: str, predictions: Path) -> dict[str, Any]:
    """A Korean exam and (when given) its row-aligned English version, each in both formulations, with EN↔KO
    agreement overall and on the `unseen` question ids; the top level is the Korean exam in `formulation`, and
    "english" the English one's outcomes.

    Each scoring's predictions go to predictions/MODE_LANG.jsonl as they are made, each file whole or absent, and
    the report names it ("predictions_file", relative to the report's directory, predictions.parent): only each
    question's letter and right/wrong stay in memory. read_test_report reads them back."""
    if english is not None:  # row-aligned by id; a smoke run scores the first Korean rows only
        at = {r.id: k for k, r in enumerate(english)}  # ids alone: the rows stay where they are read from
        english = Mapped([at[r.id] for r in rows if r.id in at], english.__getitem__)
    if distributed.is_main():
        predictions.mkdir(parents=True, exist_ok=True)
    formulations, report = {}, {}
    for mode in ("logits", "cloze"):
        scored = {"ko": _scored(model, tokenizer, rows, mode, "ko", name, predictions)}
        outcomes = {"ko": scored["ko"].pop("outcomes")}
        if english is not None:
            scored["en"] = _scored(model, tokenizer, english, mode, "en", name, predictions)
            outcomes["en"] = scored["en"].pop("outcomes")
            scored["languages"] = language_agreement(outcomes["ko"], outcomes["en"])
            if unseen:
                pick = lambda entries: [e for e in entries if e["id"] in unseen]  # noqa: E731
                scored["languages_unseen"] = language_agreement(pick(outcomes["ko"]), pick(outcomes["en"]))
            if mode == formulation:
                en = scored["en"]
                report["english"] = {"accuracy": en["accuracy"], "n": en["n"],
                                     "correct": [e["correct"] for e in outcomes["en"]]}
        formulations[mode] = scored
    return {**formulations[formulation]["ko"], "formulation": formulation, "formulations": formulations, **report}


def _scored(model: Gemma3, tokenizer: Tokenizer, rows: Sequence[MCQ], mode: str, lang: str, name: str,
            predictions: Path) -> dict[str, Any]:
    """One scoring's report, its predictions written to their file on rank 0, with "outcomes": each question's id,
    letter and right/wrong (what language_agreement pairs), for the caller to take out."""
    path = predictions / f"{mode}_{lang}.jsonl"
    outcomes: list[dict[str, Any]] = []
    with (atomic_write(path) if distributed.is_main() else nullcontext(None)) as tmp, \
            (tmp.open("w", encoding="utf-8") if tmp else nullcontext(None)) as f:
        def keep(entry: dict[str, Any]) -> None:
            outcomes.append({"id": entry["id"], "pred": entry["pred"], "correct": entry["correct"]})
            if f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")

        report = evaluate(model, tokenizer, rows, mode, lang, progress=True, model_name=name, sink=keep)
    scored = {k: v for k, v in asdict(report).items() if k != "predictions"}
    return {**scored, "predictions_file": f"{predictions.name}/{path.name}", "outcomes": outcomes}


def _rows(path: Path) -> JsonlRows:
    return JsonlRows(path, lambda _path, _index, record: record)


def read_test_report(path: Path) -> dict[str, Any]:
    """A test report (test_report.json, base_test_report.json) with each scoring's "predictions" read from its file
    as they are used (engine.rows: only each line's offset resident). A report written before the predictions had
    files of their own holds them inline and reads as it is."""
    report = read_json(path)
    scorings = [report] + [s for f in report.get("formulations", {}).values() for s in (f.get("ko"), f.get("en")) if s]
    for scored in scorings:
        if "predictions_file" in scored:
            file = Path(path).parent / scored["predictions_file"]
            if not file.is_file():
                raise MedkoError(f"{file} is missing, and {path} names it: delete {path} and score the test split "
                                 f"again (python medko.py test --run-dir {Path(path).parent})")
            scored["predictions"] = _rows(file)
    return report


def _correct(test: dict[str, Any], mode: str, lang: str, ids: Sequence[str] | None = None) -> list[bool] | None:
    scored = test.get("formulations", {}).get(mode, {}).get(lang)
    if scored is None:
        return None
    by_id = {p["id"]: bool(p["correct"]) for p in scored["predictions"]}
    return [by_id[i] for i in (ids if ids is not None else by_id)]


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
    rows, unseen = [], set(unseen)
    in_b = {q["id"] for q in b.test["predictions"]}  # once: inside the comprehension it was built per question
    ids = [p["id"] for p in a.test["predictions"] if p["id"] in in_b]
    if not ids:
        raise MedkoError(f"{a.name} and {b.name} share no test question; compare runs made from the same data")
    for mode in ("cloze", "logits"):
        ko_a, ko_b = _correct(a.test, mode, "ko", ids), _correct(b.test, mode, "ko", ids)
        if ko_a is None or ko_b is None:
            continue
        rows.append(_accuracy_row(f"Korean {mode}", ko_a, ko_b))
        keep = [i for i, q in enumerate(ids) if q in unseen]
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
