"""s1 gate: translate the Korean dev and train exams to English with the model itself (the bundled sample
data uses its bundled reference translations unless --english-exam model), score each candidate on the
English dev exam, choose the smallest at or above --gate; if none passes, s1.1 runs next.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


@sl.stage_script("s1", __doc__)
def main(run: sl.StageRun) -> None:
    opts, candidates = run.opts, sl.gate_candidates(run.opts)
    reference = sl.reference_translations(run.run_dir, opts)
    scores, correct, translated_with, translation = {}, {}, None, {}
    for name in reversed(candidates):  # the largest translates, as it translates best
        model, tokenizer, path = sl.load_candidate(name, opts)
        if translated_with is None:
            translated_with = f"reference {reference}" if reference else name
            for split in ("dev", "train"):
                korean = run.data.exam[split]
                english = (sl.reference_exam(reference, korean, split, opts.subsets) if reference else
                           sl.translate_mcqs(korean, model, tokenizer, "en", cache_path=run.out / "translations.jsonl",
                                             batch_size=run.generation_rows(name), progress=True,
                                             max_new_tokens=opts.translate_tokens, model_id=str(path),
                                             stats=translation))
                sl.write_jsonl_atomic([sl.mcq_record(r) for r in english], run.out / f"en_exam_{split}.jsonl")
        report = sl.evaluate(model, tokenizer, run.dev("en"), "logits", "en", progress=True)
        scores[name], correct[name] = report.accuracy, [p["correct"] for p in report.predictions]
        sl.log.info("gate: %s scores %.3f on the English dev exam (gate %.2f)", name, scores[name], opts.gate)
        del model
    passing = [c for c in candidates if scores[c] >= opts.gate]
    chosen = passing[0] if passing else max(candidates, key=lambda c: (scores[c], -candidates.index(c)))
    sl.log.info("gate: chose %s; every later stage builds on it, whatever --size it is given", chosen)
    run.save(None, {"scores": scores, "en_correct": correct, "gate": opts.gate, "chosen": chosen,
                    "base": {"size": "270m" if opts.model else chosen, "model": opts.model},
                    "needs_english": not passing, "translated_with": translated_with, "translation": translation})


if __name__ == "__main__":
    sys.exit(main())
