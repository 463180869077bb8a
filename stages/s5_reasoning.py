"""s5 reasoning: the Korean train exam in a reasoning format ending in a one-letter answer (cross-entropy
plus a letter loss and an answer-line loss, with the per-layer English loss); format compliance and accuracy on the Korean dev
exam; then the English guard.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


@sl.stage_script("s5", __doc__)
def main(run: sl.StageRun) -> None:
    opts = run.opts
    model, tokenizer = run.load_previous()
    patterns = sl.added_layer_patterns(model) + sl.LANGUAGE_PATTERNS + sl.LORA_PATTERNS

    reasoning, cut = sl.reasoning_examples(tokenizer, run.data.reasoning, opts.max_len)
    budget = opts.reasoning_tokens or max(sum(e.target_mask) for e in reasoning)  # the EOS slot is one to spare

    def reasoning_scores() -> dict:
        scores = sl.reasoning_eval(model, tokenizer, run.dev("ko"), budget)
        return {f"reasoning_{k}": v for k, v in scores.items()}

    before = {**run.measure_entry(model, tokenizer), **reasoning_scores()}
    config = run.train_config()
    loss = sl.stage_loss(opts.layer_loss, run.layer_weight(), sl.letter_token_ids(tokenizer, chat=False),
                         ending=sl.answer_line_tokens(tokenizer))
    phase = run.train_phase("train", model, patterns, loss,
                            sl.mixed_batches(reasoning, run.text(tokenizer, run.data.en_text), config), config)
    after, guard = run.english_guard(model, tokenizer, patterns, run.measure(model, tokenizer))
    after.update(reasoning_scores())  # scored on the state the stage keeps, after any guard recovery
    run.save(model, {"before": before, "after": after, "phases": [phase], "guard": guard,
                     "reasoning_cut": cut, "reasoning_examples": len(reasoning), "reasoning_tokens": budget,
                     "verdicts": run.verdicts(before, after)})


if __name__ == "__main__":
    sys.exit(main())
