"""The run report: report.md and report.png from the stages' meta.json records and the test split. Each training
stage shows its purpose and a verdict above noise, the report names the numbers that made decisions (all on the
dev split or held-out text), and it ends with the test split, scored once.

Imports engine.data (the exam's letters), engine.files and engine.stats; the curriculum hands it the stage table,
so it imports nothing above it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from engine.data import LETTERS
from engine.files import atomic_write, write_text_atomic
from engine.stats import accuracy_summary, describe, describe_agreement, judge, language_agreement

# How the plot names each formulation a stage scores (its per-question answers under X_correct in meta.json).
FORMULATIONS = {"ko_correct": "Korean exam, logits", "en_correct": "English exam, logits",
                "reasoning_correct": "Korean exam, generated reasoning"}
CHANCE = 1 / len(LETTERS)  # a uniform guess among the exam's options
# (name, title, directory) of each stage in run order, as the curriculum's stage table gives them.
StageRows = Sequence[tuple[str, str, str]]


def _change(meta: dict[str, Any], key: str, digits: int = 3) -> str:
    before, after = meta.get("before", {}).get(key), meta.get("after", {}).get(key)
    if after is None:
        return "–"
    return f"{'–' if before is None else f'{before:.{digits}f}'} → {after:.{digits}f}"


def _accuracy(summary: dict[str, float]) -> str:
    return f"{summary['value']:.3f} (n {summary['n']}, 95% CI {summary['low']:.3f}–{summary['high']:.3f})"


def _translation_note(gate: dict[str, Any]) -> str:
    t = gate.get("translation")
    if not t:
        return ""
    return (f" ({t['lines']} lines: {t['hit_budget']} used their whole length budget and may be cut, "
            f"{t['empty'] + t['degenerate']} came back empty or degenerate and kept their Korean)")


def _decisions(metas: dict[str, dict | None], titles: dict[str, str], training: Sequence[str]) -> list[str]:
    """The numbers that decided something: all measured on the dev split or held-out text, never on test."""
    lines = ["## Numbers that made decisions", "",
             "Every decision below used the dev split (English dev for the gate, s1.1's stop and the guard) or "
             "held-out text (English drift); the test split decided nothing.", ""]
    gate = metas.get("s1")
    if gate:
        lines.append("- gate: English dev accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in gate["scores"].items())
                     + f" against {gate['gate']} → {gate['chosen']} chosen, s1.1 "
                     + ("ran" if gate["needs_english"] else "skipped"))
        lines += [f"- gate: {skip} skipped, it cannot run on this GPU by the memory plan" for skip in gate.get("skipped", [])]
        if gate.get("plan"):
            lines.append(f"- cost: {gate['plan']['line']}")
    s11 = metas.get("s1_1")
    if s11:
        checks = ", ".join(f"{c['en_accuracy']:.3f} at step {c['steps']}" for c in s11.get("gate_checks", []))
        lines.append(f"- s1.1 stop: English dev accuracy {checks or 'not checked'} → "
                     + ("gate passed" if s11.get("gate_passed") else "step budget spent"))
    for stage in training:
        guard = (metas.get(stage) or {}).get("guard")
        if guard:
            lines.append(f"- guard after {titles[stage]}: {guard.get('verdict_line', guard['passed'])}")
            lines.append(f"- kept state after {titles[stage]}: "
                         + ("the trained state" if guard["rounds"] == 0 else
                            f"after {guard['rounds']} recovery round{'' if guard['rounds'] == 1 else 's'}, "
                            + ("the last" if guard["passed"] else "the best by English accuracy")))
    return lines + [""]


def _verdicts(metas: dict[str, dict | None], titles: dict[str, str], training: Sequence[str]) -> list[str]:
    lines = ["## Purposes and verdicts", "",
             "A change whose 95% interval holds zero is no detectable change (within noise), never a gain.", ""]
    for stage in training:
        m = metas.get(stage)
        if not m or "verdicts" not in m:
            continue
        v = m["verdicts"]
        lines.append(f"- **{titles[stage]}**: {v['purpose']}. Verdict: **purpose {v['verdict']}**.")
        lines += [f"  - {part}" for part in v["lines"]]
    return lines + [""]


def _paired(correct: Sequence[bool], preds: Sequence[str | None]) -> list[dict[str, Any]]:
    """A measurement's per-question lists as prediction entries, the position as the id (dev rows are aligned)."""
    return [{"id": i, "pred": p, "correct": c} for i, (c, p) in enumerate(zip(correct, preds))]


def _gap_lines(point: dict[str, Any], unseen: Sequence[int]) -> list[str]:
    if not all(k in point for k in ("ko_correct", "en_correct", "ko_preds", "en_preds")):
        return ["not measured"]
    ko, en = _paired(point["ko_correct"], point["ko_preds"]), _paired(point["en_correct"], point["en_preds"])
    lines = [describe_agreement(language_agreement(ko, en))]
    if unseen:
        keep = set(unseen)
        pick = lambda entries: [e for e in entries if e["id"] in keep]  # noqa: E731
        lines.append("questions whose answer no Korean training text holds: "
                     + describe_agreement(language_agreement(pick(ko), pick(en))))
    return lines


def _gap_section(metas: dict[str, dict | None], titles: dict[str, str], test: dict[str, Any] | None) -> list[str]:
    """The mission in one section: the formulation s1 decided on, and the EN–KO gap on the dev exam where the
    curriculum (or the baseline) starts and where it ends, then on the test split, with McNemar on each gap."""
    gate = metas.get("s1")
    if not gate or "formulation" not in gate:
        return []
    formulation = gate["formulation"]
    lines = ["## The English–Korean gap", "",
             f"Formulation: **{formulation}**, chosen at s1: {gate['formulation_why']}. The gate, s1.1's stop and the "
             f"guard's accuracy arm use it. 'Answer not in Korean training text': questions whose right option's text "
             f"appears in no Korean text, pair, reasoning or train question the run trains on (s0).", ""]
    unseen = (metas.get("s0") or {}).get("unseen_answers", {})
    end = next((s for s in ("s5", "sft") if metas.get(s)), None)
    points = [("entering s2", (metas.get("s2") or {}).get("before", {})),
              (f"after {titles[end]}" if end else "end", (metas.get(end) or {}).get("after", {}))]
    if end == "sft":
        points[0] = ("entering the baseline", metas["sft"].get("before", {}))
    for label, point in points:
        lines += [f"- dev, {label} ({formulation}): " + "; ".join(_gap_lines(point, unseen.get("dev", [])))]
    for mode, scored in ((test or {}).get("formulations") or {}).items():
        if "languages" in scored:
            lines.append(f"- test, final model ({mode}): {describe_agreement(scored['languages'])}")
            if "languages_unseen" in scored:
                lines.append(f"  - answer not in Korean training text: {describe_agreement(scored['languages_unseen'])}")
    return lines + [""]


def _test_section(test: dict[str, Any]) -> list[str]:
    ko = accuracy_summary([p["correct"] for p in test["predictions"]])
    lines = [f"## Test split (scored once, {test['model']}, {test.get('formulation', 'logits')})", "",
             f"- Korean accuracy {_accuracy(ko)}"]
    english = test.get("english")
    if english:
        lines.append(f"- English accuracy {_accuracy(accuracy_summary(english['correct']))}")
    reasoning = test.get("reasoning")
    if reasoning:
        lines.append(f"- strict answer-line compliance {_accuracy(accuracy_summary(reasoning['strict']))}, reasoning "
                     f"accuracy {_accuracy(accuracy_summary(reasoning['correct']))}")
    drift = test.get("drift")
    if drift:
        # Held-out text has no test split: the drift is that of the texts the guard decided on, and says so.
        lines.append(f"- English drift {drift['value']:.4f} nats/token (95% CI {drift['low']:.4f}–{drift['high']:.4f}, "
                     f"n {drift['n']}), from {drift.get('source', 'held-out English text')}: not test data")
    lines += ["", "| subset | n | Korean accuracy |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {s['n']} | {s['accuracy']:.3f} |" for name, s in test["subsets"].items()]
    return lines + [f"| all (micro) | {test['n']} | {test['accuracy']:.3f} |"]


def _row_checks(counts: dict[str, dict[str, int]]) -> list[str]:
    """s0's checks of rows within a source: repeats kept, repeats with another answer dropped, rows NFC changed."""
    parts = [f"{k} {v.get('repeated', 0)} repeated, {v.get('conflicting', 0)} dropped for another answer, "
             f"{v.get('normalized', 0)} NFC-normalised" for k, v in counts.items()
             if v.get("repeated") or v.get("conflicting") or v.get("normalized")]
    return ["Rows within a source: " + (", ".join(parts) or "no repeats, no conflicting answers, all text in NFC") + ".",
            ""]


SMOKE_NOTE = ("**This is a smoke run (`--smoke`): one training step a phase, a handful of questions and texts per "
              "measurement, a cut reasoning budget. It checks that every stage and the report run; its numbers mean "
              "nothing.**")


def write_run_report(run_dir: Path, stages: StageRows, training: Sequence[str], metas: dict[str, dict | None],
                     test: dict[str, Any] | None) -> Path:
    """report.md and report.png: data, gate, a summary table, purposes and verdicts, decisions, the test split."""
    titles = {name: title for name, title, _ in stages}
    lines = [f"# medko run report: {run_dir}", ""]
    smoke = any((m or {}).get("smoke") for m in metas.values())
    if smoke:
        lines += [SMOKE_NOTE, ""]
    if metas.get("s0"):
        m = metas["s0"]
        left_out = [f"{k} {v['skipped']} bad, {v['dropped']} repeated" for k, v in m.get("left_out", {}).items()
                    if v["skipped"] or v["dropped"]]
        lines += [f"Data from {m['source']}: " + ", ".join(f"{k.removesuffix('.jsonl')} {v}" for k, v in m["counts"].items())
                  + ". Rows left out: " + (", ".join(left_out) or "none")
                  + ". Question overlap between splits: " + ", ".join(f"{k} {v}" for k, v in m["overlap"].items()) + ".", ""]
        lines += _row_checks(m.get("left_out", {}))
    if metas.get("s1"):
        lines += [f"English exam translated by {metas['s1']['translated_with']}{_translation_note(metas['s1'])}.", ""]
    lines += ["## Summary (dev split and held-out text)", "",
              "| stage | trained | params | steps | ko acc | en acc | ko loss | en loss | drift | verdict |",
              "| --- | --- | ---: | ---: | --- | --- | --- | --- | --- | --- |"]
    for stage in training:
        m = metas.get(stage)
        if not m:
            continue
        phases = m.get("phases", [])
        patterns = sorted({p for ph in phases for p in ph["patterns"]})
        params = max((ph["trainable"] for ph in phases), default=0)
        steps = sum(ph["steps"] for ph in phases)
        verdict = m.get("verdicts", {}).get("verdict", "–")
        lines.append(f"| {titles[stage]} | {', '.join(f'`{p}`' for p in patterns)} | {params:,} | {steps} | "
                     f"{_change(m, 'ko_accuracy')} | {_change(m, 'en_accuracy')} | {_change(m, 'ko_loss')} | "
                     f"{_change(m, 'en_loss')} | {_change(m, 'drift', 4)} | {verdict} |")
    lines.append("")
    if metas.get("s4") and "chrf" in metas["s4"].get("after", {}):
        # Corpus chrF pools the pairs' n-gram counts; the verdict tests the mean of per-pair chrF (paired over pairs).
        lines += [f"s4 translation of held-out pairs: corpus chrF {_change(metas['s4'], 'chrf', 2)} (the verdict "
                  f"below tests the mean of each pair's chrF, paired).", ""]
    start, end = (metas.get("s2") or {}).get("before", {}), (metas.get("s5") or {}).get("after", {})
    if "ko_correct" in start and "ko_correct" in end and len(start["ko_correct"]) == len(end["ko_correct"]):
        # Measured where the curriculum starts and ends only: the stages between skip the Korean dev exam.
        j = judge("accuracy", start["ko_correct"], end["ko_correct"], "up")
        lines += [f"Korean dev accuracy across the curriculum (entering s2 → after s5, "
                  f"{(metas.get('s1') or {}).get('formulation', 'logits')}): {describe('accuracy', j)}.", ""]
    if metas.get("s5"):
        lines += [f"s5 reasoning on the Korean dev exam: strict format compliance "
                  f"{_change(metas['s5'], 'reasoning_compliance')} (looser extraction "
                  f"{_change(metas['s5'], 'reasoning_loose_compliance')}), accuracy "
                  f"{_change(metas['s5'], 'reasoning_accuracy')}.", ""]
    lines += _gap_section(metas, titles, test) + _verdicts(metas, titles, training) + _decisions(metas, titles, training)
    if test:
        lines += _test_section(test)
    plot_run(run_dir, stages, training, metas, test, smoke)
    lines += ["", "![accuracy and training loss](report.png)", ""]
    out = run_dir / "report.md"
    write_text_atomic("\n".join(lines), out)
    return out


def accuracy_series(slots: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, list[tuple[int, float, float, float]]]:
    """Every accuracy formulation the slots scored (each list of right/wrong answers, `X_correct`), as points
    (slot, accuracy, Wilson low, Wilson high) on the slots that scored it: s2 skips the English exam, Korean dev is
    scored at the run's ends, s5 alone generates reasoning."""
    series: dict[str, list[tuple[int, float, float, float]]] = {}
    for x, (_, measured) in enumerate(slots):
        for key, correct in measured.items():
            if key.endswith("_correct") and correct:
                s = accuracy_summary(correct)
                label = FORMULATIONS.get(key, key.removesuffix("_correct").replace("_", " "))
                series.setdefault(label, []).append((x, s["value"], s["low"], s["high"]))
    return series


def plot_run(run_dir: Path, stages: StageRows, training: Sequence[str], metas: dict[str, dict | None],
             test: dict[str, Any] | None = None, smoke: bool = False) -> None:
    """report.png: each accuracy with its 95% Wilson interval and the chance line, and the training loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = {name: title.split()[0] for name, title, _ in stages}
    directory = {name: d for name, _, d in stages}
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    slots = [(short[s], metas[s]["after"]) for s in training if (metas.get(s) or {}).get("after")]
    if test:
        slots.append(("test", {"ko_correct": [p["correct"] for p in test["predictions"]],
                               "en_correct": (test.get("english") or {}).get("correct")}))
    series = accuracy_series(slots)
    for i, (label, points) in enumerate(series.items()):
        shift = (i - (len(series) - 1) / 2) * 0.08  # side by side, so the interval bars do not hide each other
        xs, ys = [x + shift for x, *_ in points], [y for _, y, _, _ in points]
        acc_ax.errorbar(xs, ys, yerr=[[y - low for _, y, low, _ in points], [high - y for _, y, _, high in points]],
                        fmt="o", capsize=3, label=label)  # no lines: a line would suggest a trend
    acc_ax.axhline(CHANCE, color="grey", linestyle="--", linewidth=1, label=f"chance ({CHANCE:.1f})")
    acc_ax.set_xticks(range(len(slots)), [name for name, _ in slots])
    acc_ax.set_ylim(0, 1)
    acc_ax.set_title("accuracy after each stage (dev) and on test, 95% Wilson intervals", fontsize=10)
    if smoke:
        fig.suptitle("SMOKE RUN (--smoke): these numbers mean nothing", color="red")
    acc_ax.legend(fontsize=7)
    offset = 0
    for stage in training:
        d = run_dir / directory[stage]
        for metrics in sorted(d.glob("*/metrics.jsonl")) if d.is_dir() else []:
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if "loss" in r and "step" in r]
            if rows:
                loss_ax.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], marker="o", markersize=3,
                             label=f"{short[stage]} {metrics.parent.name}")  # a marker: a 1-step phase is one point
                offset += rows[-1]["step"]
    loss_ax.set_title("training loss")
    loss_ax.set_xlabel("step (phases in order)")
    if loss_ax.lines:  # a run with no training phase yet has no curve to name
        loss_ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(run_dir / "report.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
