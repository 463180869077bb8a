"""s1 gate: translate the Korean dev and train exams to English with the model itself (the bundled sample
data uses its bundled reference translations unless --english-exam model), score each candidate on the
English dev exam in both formulations (letters and cloze; each candidate is scored in the one it does better
in, OLMES's rule, and the chosen model's decides for the run), choose the smallest at or above --gate; if none
passes, s1.1 runs next.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


@sl.stage_script("s1", __doc__)
def main(run: sl.StageRun) -> None:
    opts, names = run.opts, sl.gate_candidates(run.opts.size, run.opts.candidates, run.opts.model)
    # Before any download, each candidate against this GPU by the memory plan: one that cannot run the curriculum is
    # skipped (it would win the gate and fail later); NF4 only for a model the user named that fits no other way.
    asked = set(names) if opts.candidates or opts.model else {opts.size or "270m"}
    nf4 = sl.candidates_that_fit(names, asked, opts.quantize == "4bit", opts.device, opts.model)
    candidates = [name for name in names if name in nf4]
    reference = sl.reference_translations(run.run_dir, opts)
    scores, correct, preds, formulations, translated_with, translation = {}, {}, {}, {}, None, {}
    for name in reversed(candidates):  # the largest translates, as it translates best
        model, tokenizer, path = sl.load_candidate(name, opts, nf4[name])
        if translated_with is None:
            translated_with = f"reference {reference}" if reference else name
            for split in ("dev", "train", "test"):  # test: for the EN↔KO gap at the end; never trained on
                korean = run.data.exam[split]
                english = (sl.reference_exam(reference, korean, split, opts.subsets) if reference else
                           sl.translate_mcqs(korean, model, tokenizer, "en", cache_path=run.out / "translations.jsonl",
                                             batch_size=16, max_new_tokens=opts.translate_tokens, progress=True,
                                             model_id=str(path), stats=translation))
                sl.write_jsonl_atomic(map(sl.mcq_record, english), run.out / f"en_exam_{split}.jsonl")
        formulations[name] = sl.choose_formulation(model, tokenizer, run.dev("en"))
        report = formulations[name].pop("reports")[formulations[name]["formulation"]]
        scores[name], correct[name] = report.accuracy, [p["correct"] for p in report.predictions]
        preds[name] = [p["pred"] for p in report.predictions]
        sl.log.info("gate: %s scores %.3f on the English dev exam (gate %.2f); formulation: %s", name, scores[name],
                    opts.gate, formulations[name]["why"])
        del model
    passing = [c for c in candidates if scores[c] >= opts.gate]
    chosen = passing[0] if passing else max(candidates, key=lambda c: (scores[c], -candidates.index(c)))
    sl.log.info("gate: chose %s; every later stage builds on it, whatever --size it is given", chosen)
    plan = sl.base_plan(chosen, nf4[chosen], opts.device, opts.model)  # what training it costs here, for the report
    if plan:
        sl.log.info("gate: %s", plan["line"])
    run.save(None, {"scores": scores, "en_correct": correct, "en_preds": preds, "gate": opts.gate, "chosen": chosen,
                    "formulation": formulations[chosen]["formulation"], "formulation_why": formulations[chosen]["why"],
                    "formulations": formulations, "plan": plan, "skipped": [name for name in names if name not in nf4],
                    "base": {"size": "270m" if opts.model else chosen, "model": opts.model,
                             "quantize": "4bit" if nf4[chosen] else None},
                    "needs_english": not passing, "translated_with": translated_with, "translation": translation})


if __name__ == "__main__":
    sys.exit(main())
