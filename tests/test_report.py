"""The run report's plot: every accuracy formulation the run scored, each point with its 95% Wilson interval, and
the chance line; a smoke run says so at the top."""
import os
import stat

import engine.report as report
from engine.stats import wilson

STAGES = [("s1_1", "s1.1 english", "s1_1_english"), ("s2", "s2 embed", "s2_embed"),
          ("s5", "s5 reasoning", "s5_reasoning")]
TRAINING = ("s1_1", "s2", "s5")


def answers(right: int, n: int) -> list[bool]:
    return [True] * right + [False] * (n - right)


def metas(smoke: bool = False) -> dict:
    """Three stages: s2 scores no exam, s5 also generates reasoning."""
    m = {"s1_1": {"after": {"ko_correct": answers(15, 84), "en_correct": answers(14, 84)}},
         "s2": {"after": {"ko_loss": 3.6}},
         "s5": {"after": {"ko_correct": answers(22, 84), "en_correct": answers(21, 84),
                          "reasoning_correct": answers(17, 84)}}}
    if smoke:
        m["s5"]["smoke"] = True
    return m


def test_accuracy_series_hold_each_formulation_with_its_wilson_interval():
    slots = [(s, metas()[s]["after"]) for s in TRAINING]
    series = report.accuracy_series(slots)
    assert set(series) == {"Korean exam, logits", "English exam, logits", "Korean exam, generated reasoning"}
    assert [x for x, *_ in series["Korean exam, logits"]] == [0, 2]  # the slots that scored it; s2 scored none
    x, value, low, high = series["Korean exam, generated reasoning"][0]
    assert (x, value, (low, high)) == (2, 17 / 84, wilson(17, 84))
    assert low < value < high


def test_the_plot_draws_interval_bars_and_the_chance_line(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)  # keep the figure to look at it
    test = {"predictions": [{"correct": c} for c in answers(23, 108)], "english": {"correct": answers(22, 108)}}
    report.plot_run(tmp_path, STAGES, TRAINING, metas(), test)
    acc_ax = drawn[0].axes[0]
    bars = {c.get_label(): c for c in acc_ax.containers}
    assert set(bars) == {"Korean exam, logits", "English exam, logits", "Korean exam, generated reasoning"}
    # each bar spans the Wilson interval: Korean at s1.1, s5 and test
    segments = bars["Korean exam, logits"].lines[2][0].get_segments()
    spans = [(round(seg[0][1], 6), round(seg[1][1], 6)) for seg in segments]
    expected = [wilson(15, 84), wilson(22, 84), wilson(23, 108)]
    assert spans == [(round(lo, 6), round(hi, 6)) for lo, hi in expected]
    chance = [line for line in acc_ax.lines if line.get_label().startswith("chance")]
    assert len(chance) == 1 and set(chance[0].get_ydata()) == {0.2}
    assert [t.get_text() for t in acc_ax.get_xticklabels()] == ["s1.1", "s2", "s5", "test"]


def test_report_files_are_readable_by_others_and_a_smoke_run_says_so(tmp_path):
    old = os.umask(0o022)
    try:
        out = report.write_run_report(tmp_path, STAGES, TRAINING, metas(smoke=True), None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 and stat.S_IMODE((tmp_path / "report.png").stat().st_mode) == 0o644
    assert out.read_text().splitlines()[2] == report.SMOKE_NOTE and "numbers mean nothing" in report.SMOKE_NOTE
    plain = tmp_path / "plain"
    plain.mkdir()
    assert "smoke" not in report.write_run_report(plain, STAGES, TRAINING, metas(), None).read_text()
