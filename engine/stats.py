"""Statistics for every number a run reports: Wilson intervals for accuracies, exact McNemar tests for paired
accuracy changes, seeded bootstrap intervals for per-text loss and drift changes, the verdict that turns them
into "met / not met / within noise", and chrF for translation quality.

Imports nothing of ours (the standard library only), so any module may use it.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any, Sequence

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
MET, NOT_MET, NOISE = "met", "not met", "within noise"


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion correct/n; (0, 1) when there is nothing to measure."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0/n and n/n the closed form gives 0 and 1 exactly; floating point would leave a 1e-17 either side.
    return (0.0 if correct == 0 else centre - half), (1.0 if correct == n else centre + half)


def mcnemar(before: Sequence[bool], after: Sequence[bool]) -> dict[str, float]:
    """Exact McNemar test on paired outcomes of the same questions: two-sided binomial on the discordant pairs.

    Returns gained (wrong → right), lost (right → wrong) and p (1.0 when nothing changed).
    """
    if len(before) != len(after):
        raise ValueError(f"McNemar needs the same questions before and after ({len(before)} vs {len(after)})")
    gained = sum((not b) and a for b, a in zip(before, after))
    lost = sum(b and (not a) for b, a in zip(before, after))
    n, k = gained + lost, min(gained, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n if n else 1.0
    return {"gained": gained, "lost": lost, "p": min(1.0, 2 * tail)}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def bootstrap_mean(values: Sequence[float], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% bootstrap interval of the mean over texts (seeded, so a report is reproducible)."""
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return means[int(0.025 * (samples - 1))], means[int(math.ceil(0.975 * (samples - 1)))]


def bootstrap_difference(before: Sequence[float], after: Sequence[float], samples: int = 2000,
                         seed: int = 0) -> dict[str, float]:
    """Mean of after - before over the same texts, with a paired bootstrap 95% interval."""
    if len(before) != len(after):
        raise ValueError(f"a paired change needs the same texts before and after ({len(before)} vs {len(after)})")
    diffs = [a - b for b, a in zip(before, after)]
    low, high = bootstrap_mean(diffs, samples, seed)
    return {"before": mean(before), "after": mean(after), "change": mean(diffs), "low": low, "high": high,
            "n": len(diffs)}


def change_verdict(low: float, high: float, want: str) -> str:
    """A change whose interval holds zero is no detectable change; want is "down" or "up"."""
    if low <= 0 <= high:
        return NOISE
    return MET if (high < 0) == (want == "down") else NOT_MET


def bound_verdict(low: float, high: float, bound: float, want: str) -> str:
    """Whether an interval lies below ("below") or at/above ("above") a bound; straddling it is within noise."""
    if want == "below":
        return MET if high <= bound else NOT_MET if low > bound else NOISE
    return MET if low >= bound else NOT_MET if high < bound else NOISE


def paired_accuracy_verdict(before: Sequence[bool], after: Sequence[bool], want: str = "up",
                            alpha: float = 0.05) -> tuple[dict[str, float], str]:
    """McNemar on the same questions; a change is met or not met only when p < alpha."""
    test = mcnemar(before, after)
    if test["p"] >= alpha:
        return test, NOISE
    up = test["gained"] > test["lost"]
    return test, MET if up == (want == "up") else NOT_MET


def _ngrams(text: str, n: int) -> Counter:
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf(hypotheses: Sequence[str], references: Sequence[str], order: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF (Popović 2015), on a 0-100 scale.

    Whitespace is removed; character n-gram matches of orders 1..order are summed over the corpus, precision and
    recall are averaged over the orders that occur in both, and F-beta weighs recall beta times as much as
    precision. (sacreBLEU averages per-order F scores instead, so its figures differ slightly.)
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"chrF needs one reference per hypothesis ({len(hypotheses)} vs {len(references)})")
    stats = [[0, 0, 0] for _ in range(order)]  # matches, hypothesis n-grams, reference n-grams per order
    for hyp, ref in zip(hypotheses, references):
        hyp, ref = "".join(hyp.split()), "".join(ref.split())
        for n in range(1, order + 1):
            h, r = _ngrams(hyp, n), _ngrams(ref, n)
            stats[n - 1][0] += sum((h & r).values())
            stats[n - 1][1] += sum(h.values())
            stats[n - 1][2] += sum(r.values())
    used = [s for s in stats if s[1] and s[2]]
    if not used:
        return 0.0
    precision = sum(m / h for m, h, _ in used) / len(used)
    recall = sum(m / r for m, _, r in used) / len(used)
    if precision + recall == 0:
        return 0.0
    return 100 * (1 + beta ** 2) * precision * recall / (beta ** 2 * precision + recall)


def sentence_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
    """chrF of each pair on its own, for bootstrap intervals over pairs."""
    return [chrf([h], [r]) for h, r in zip(hypotheses, references)]


def accuracy_summary(correct: Sequence[bool]) -> dict[str, float]:
    """Accuracy with its n and 95% Wilson interval."""
    n, k = len(correct), sum(bool(c) for c in correct)
    low, high = wilson(k, n)
    return {"value": k / n if n else float("nan"), "n": n, "low": low, "high": high}


def judge(kind: str, before: Sequence | None, after: Sequence, want: str, bound: float | None = None,
          seed: int = 0) -> dict[str, object]:
    """One measured purpose, decided above noise.

    kind "accuracy": paired outcomes of the same questions, exact McNemar (want up/down).
    kind "change": per-text values before and after, paired bootstrap of the mean change (want up/down, or
    "hold": only a detectable rise fails). kind "bound": the mean of per-text values after (bootstrap) or, for
    outcomes (bools), a Wilson interval, against `bound` (want below/above).
    """
    if kind == "accuracy":
        test, verdict = paired_accuracy_verdict(before, after, want)
        b, a = accuracy_summary(before), accuracy_summary(after)
        return {"kind": kind, "before": b, "after": a, **test, "verdict": verdict}
    if kind == "change":
        diff = bootstrap_difference(before, after, seed=seed)
        if want == "hold":
            verdict = NOT_MET if diff["low"] > 0 else MET
        else:
            verdict = change_verdict(diff["low"], diff["high"], want)
        return {"kind": kind, **diff, "verdict": verdict}
    if kind == "bound":
        if after and isinstance(after[0], bool):
            summary = accuracy_summary(after)
        else:
            low, high = bootstrap_mean(after, seed=seed)
            summary = {"value": mean(after), "n": len(after), "low": low, "high": high}
        return {"kind": kind, **summary, "bound": bound, "want": want,
                "verdict": bound_verdict(summary["low"], summary["high"], bound, want)}
    raise ValueError(f"unknown kind of judgement {kind!r}")


def overall_verdict(verdicts: Sequence[str]) -> str:
    """A purpose is met when every measure of it is; any measure not met fails it; else it is within noise."""
    if verdicts and all(v == MET for v in verdicts):
        return MET
    return NOT_MET if NOT_MET in verdicts else NOISE


def describe(name: str, j: dict) -> str:
    """One line of a judgement, numbers and interval first, verdict last."""
    if j["kind"] == "accuracy":
        b, a = j["before"], j["after"]
        return (f"{name} {b['value']:.3f} → {a['value']:.3f} (n {a['n']}, 95% CI {a['low']:.3f}–{a['high']:.3f}; "
                f"McNemar +{j['gained']}/−{j['lost']}, p {j['p']:.3g}): {j['verdict']}")
    if j["kind"] == "change":
        return (f"{name} {j['before']:.4f} → {j['after']:.4f} (change {j['change']:+.4f}, 95% CI "
                f"{j['low']:+.4f} to {j['high']:+.4f}, n {j['n']}): {j['verdict']}")
    relation = "≤" if j["want"] == "below" else "≥"
    return (f"{name} {j['value']:.4f} (95% CI {j['low']:.4f}–{j['high']:.4f}, n {j['n']}) {relation} "
            f"{j['bound']}: {j['verdict']}")


def guard_check(correct: Sequence[bool], drifts: Sequence[float], floor: float, tolerance: float,
                drift_bound: float) -> dict[str, Any]:
    """The English guard's decision on one state, with the intervals it is shown with: English dev accuracy
    (Wilson) at or above floor - max(tolerance, one question), and mean English drift (bootstrap over texts) not
    detectably above `drift_bound`. A tolerance finer than one question would turn a single answer into the
    verdict; drift fails only when its whole 95% interval lies above the bound, the rule the stage verdicts use
    (bound_verdict), so the guard and the report never disagree on the same numbers."""
    acc = accuracy_summary(correct)
    tolerance = max(tolerance, 1 / max(acc["n"], 1))
    threshold = floor - tolerance
    drift, (low, high) = mean(drifts), bootstrap_mean(drifts)
    drift_verdict = bound_verdict(low, high, drift_bound, "below")
    accuracy_ok, drift_ok = acc["value"] >= threshold - 1e-9, drift_verdict != NOT_MET
    relation = {MET: "≤", NOISE: "within noise of", NOT_MET: "above"}[drift_verdict]
    line = (f"English dev accuracy {acc['value']:.3f} (n {acc['n']}, 95% CI {acc['low']:.3f}–{acc['high']:.3f}) "
            f"{'≥' if accuracy_ok else '<'} {threshold:.3f}; English drift {drift:.4f} nats/token (95% CI "
            f"{low:.4f}–{high:.4f}) {relation} {drift_bound}")
    return {"accuracy": acc["value"], "accuracy_ci": [acc["low"], acc["high"]], "n": acc["n"], "tolerance": tolerance,
            "threshold": threshold, "drift": drift,
            "drift_ci": [low, high], "accuracy_ok": accuracy_ok, "drift_ok": drift_ok,
            "passed": accuracy_ok and drift_ok, "line": line}


def language_agreement(korean: Sequence[dict], english: Sequence[dict]) -> dict[str, Any]:
    """EN↔KO agreement of two row-aligned exams' predictions (entries with id, pred, correct; English ids may carry
    the same row ids): the share answered alike, the 2×2 table of right/wrong, both accuracies with Wilson
    intervals, the English − Korean gap and exact McNemar on it (its discordant cells are English only and Korean
    only)."""
    en = {e["id"]: e for e in english}
    pairs = [(k, en[k["id"]]) for k in korean if k["id"] in en]
    if not pairs:
        raise ValueError("the Korean and English predictions share no question id; compare row-aligned exams")
    ko_right, en_right = [bool(k["correct"]) for k, _ in pairs], [bool(e["correct"]) for _, e in pairs]
    test = mcnemar(ko_right, en_right)  # "gained" = right in English only, "lost" = right in Korean only
    ko_acc, en_acc = accuracy_summary(ko_right), accuracy_summary(en_right)
    return {"n": len(pairs), "alike": sum(k["pred"] == e["pred"] for k, e in pairs) / len(pairs),
            "both": sum(k and e for k, e in zip(ko_right, en_right)), "en_only": test["gained"],
            "ko_only": test["lost"], "neither": sum(not (k or e) for k, e in zip(ko_right, en_right)),
            "ko_accuracy": ko_acc, "en_accuracy": en_acc, "gap": en_acc["value"] - ko_acc["value"], "p": test["p"]}


def describe_agreement(a: dict[str, Any]) -> str:
    """One line: both accuracies with intervals, the gap with McNemar, the 2×2 table and the share alike."""
    ko, en = a["ko_accuracy"], a["en_accuracy"]
    return (f"English {en['value']:.3f} [{en['low']:.3f}, {en['high']:.3f}], Korean {ko['value']:.3f} "
            f"[{ko['low']:.3f}, {ko['high']:.3f}] (n {a['n']}): gap {a['gap']:+.3f} (McNemar: right in English only "
            f"{a['en_only']}, Korean only {a['ko_only']}, p {a['p']:.3g}); right in both {a['both']}, neither "
            f"{a['neither']}; answered alike {a['alike']:.3f}")
