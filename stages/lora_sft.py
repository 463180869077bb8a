"""lora-sft: the baseline, what users run without medko (`bash run.sh --recipe lora-sft`). LoRA lora1 with the
curriculum's rank, alpha and targets on the base s1 chose, trained by cross-entropy alone on the Korean data the
curriculum trains on (Korean text, and the Korean train exam's reasoning ending in the answer line) for as many
tokens as the curriculum's s2-s5 train on their own data. No language embeddings, no per-layer loss, no added
layers, no guard.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


@sl.stage_script("sft", __doc__)
def main(run: sl.StageRun) -> None:
    opts, data = run.opts, run.data
    model, tokenizer = run.load_previous()
    reasoning, cut = sl.reasoning_examples(tokenizer, data.reasoning, opts.max_len)
    examples = run.text(tokenizer, data.ko_text) + reasoning
    budget = sl.curriculum_tokens(opts, data, tokenizer)
    config = run.train_config(1)
    steps = sl.steps_for_tokens(examples, config, sum(budget.values()))  # --max-steps sets the curriculum's phases
    sl.log.info("lora-sft: %d steps to match the curriculum's %d tokens (s2-s5: %s)", steps, sum(budget.values()),
                budget)
    tokens = opts.reasoning_tokens or max(sum(e.target_mask) for e in reasoning)

    def reasoning_scores() -> dict:
        return {f"reasoning_{k}": v for k, v in sl.reasoning_eval(model, tokenizer, run.dev("ko"), tokens).items()}

    # The base is its own teacher: drift 0 by definition, so no teacher pass (as s2's entry).
    before = {**run.gate_english(model, tokenizer), **run.measure(model, tokenizer, ("ko_exam", "ko_text", "en_loss"))}
    before.update(drift=0.0, drifts=[0.0] * len(before["en_losses"]))
    sl.add_lora(model, "lora1", rank=opts.lora_rank, alpha=opts.lora_alpha)
    config = run.train_config(steps)
    phase = run.train_phase("train", model, sl.LORA_PATTERNS, sl.stage_loss(opts.layer_loss, 0.0),
                            sl.mixed_batches(examples, None, config), config)
    after = {**run.measure(model, tokenizer), **reasoning_scores()}  # drift: from the base (no teacher snapshot)
    run.save(model, {"before": before, "after": after, "phases": [phase], "curriculum_tokens": budget,
                     "trained_tokens": phase["tokens"], "reasoning_cut": cut, "reasoning_examples": len(reasoning),
                     "reasoning_tokens": tokens, "verdicts": run.verdicts(before, after)})


if __name__ == "__main__":
    sys.exit(main())
