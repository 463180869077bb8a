"""s4 translate: duplicate the first and last decoder layers (identity at the start), train Korean text,
then Korean-English translation, each with the per-layer English loss; then the English guard.
"""
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


@sl.stage_script("s4", __doc__)
def main(run: sl.StageRun) -> None:
    opts, data = run.opts, run.data
    model, tokenizer = run.load_previous()
    sl.duplicate_edge_layers(model)
    patterns = sl.added_layer_patterns(model) + sl.LANGUAGE_PATTERNS + sl.LORA_PATTERNS
    before = {**run.measure_entry(model, tokenizer), **sl.translation_scores(model, tokenizer, data.pairs_heldout,
                                                                             opts.translate_tokens)}
    config = replace(run.train_config(), added_lr_scale=sl.ADDED_LR_SCALE)  # the duplicated layers' own rate
    english = run.text(tokenizer, data.en_text)
    translation = sl.translation_examples(run.run_dir, data, tokenizer, opts.max_len)
    phases = [run.train_phase(name, model, patterns, sl.stage_loss(opts.layer_loss, run.layer_weight()),
                              sl.mixed_batches(examples, english, config), config)
              for name, examples in (("korean", run.text(tokenizer, data.ko_text)), ("translation", translation))]
    after, guard = run.english_guard(model, tokenizer, patterns, run.measure(model, tokenizer))
    after.update(sl.translation_scores(model, tokenizer, data.pairs_heldout, opts.translate_tokens))  # the kept state
    run.save(model, {"before": before, "after": after, "phases": phases, "guard": guard, "pairs": len(translation),
                     "verdicts": run.verdicts(before, after)})


if __name__ == "__main__":
    sys.exit(main())
