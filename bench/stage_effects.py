"""Which stage moves what: Korean and English accuracy on the dev exam after each finished stage of a run, in the
cloze formulation (and letters with --mode logits), with the EN-KO gap and McNemar against the stage before.

    python bench/stage_effects.py --run-dir runs/default
    python bench/stage_effects.py --run-dir runs/lora-sft

Dev only, never test: this is where settings are chosen. Each stage's model is rebuilt from the run (base, surgery,
additions), as every later stage and `medko.py test` load it; the first row is the base itself.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shared_logic as sl  # noqa: E402
from engine.checkpoints import load_base  # noqa: E402
from engine.stats import accuracy_summary, language_agreement, mcnemar  # noqa: E402


def cell(correct: list[bool]) -> str:
    s = accuracy_summary(correct)
    return f"{s['value']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/default"))
    parser.add_argument("--mode", default="cloze", choices=["cloze", "logits"])
    parser.add_argument("--limit", type=int, default=None, help="the first N dev questions only")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    data = sl.load_run_data(args.run_dir)
    exams = {"ko": sl.limited(data.exam["dev"], args.limit), "en": sl.limited(sl.english_exam(args.run_dir, "dev"),
                                                                              args.limit)}
    base = sl.run_base(args.run_dir, None, None)
    stages = [s.name for s in sl.STAGE_TABLE if s.name in sl.TRAINING_STAGES and sl.stage_meta(args.run_dir, s.name)]
    rows, previous = [], None
    print(f"{args.run_dir}, dev exam ({args.mode}), n {len(exams['ko'])}; McNemar against the row above")
    print("| after | Korean | English | EN-KO gap (McNemar p) | Korean change (p) | English change (p) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for stage in ["base", *stages]:
        if stage == "base":
            model, tokenizer, _ = load_base(base["size"], base["model"], None)
        else:
            model, tokenizer, _ = sl.load_run_model_after(args.run_dir, stage)
        reports = {lang: sl.evaluate(model, tokenizer, rows_, args.mode, lang, progress=False)
                   for lang, rows_ in exams.items()}
        correct = {lang: [p["correct"] for p in r.predictions] for lang, r in reports.items()}
        gap = language_agreement(reports["ko"].predictions, reports["en"].predictions)
        changes = ["–", "–"] if previous is None else [
            f"{sum(correct[lang]) - sum(previous[lang]):+d} (p {mcnemar(previous[lang], correct[lang])['p']:.3g})"
            for lang in ("ko", "en")]
        print(f"| {stage} | {cell(correct['ko'])} | {cell(correct['en'])} | {gap['gap']:+.3f} (p {gap['p']:.3g}) | "
              f"{changes[0]} | {changes[1]} |", flush=True)
        rows.append({"stage": stage, "correct": correct, "gap": gap})
        previous = correct
        del model
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
