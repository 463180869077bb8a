"""s1.1 english: LoRA lora1 trained on the English train exam and English medical data until the English
dev exam passes the gate or the step budget ends. Runs only when s1 found no model at the gate.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


@sl.stage_script("s1_1", __doc__)
def main(run: sl.StageRun) -> None:
    opts, data = run.opts, run.data
    model, tokenizer = run.load_previous()
    # lora1 comes before the model first runs: under torchrun FSDP2 shards it then, and it takes no surgery after.
    sl.add_lora(model, "lora1", rank=opts.lora_rank, alpha=opts.lora_alpha)
    # What s1.1 is judged on, lora1 off (it is zero anyway): the English dev answers s1 gave for this very model,
    # and the held-out texts, where the model is its own teacher (drift 0, no teacher pass).
    with sl.teacher_mode(model):
        before = {**run.gate_english(model, tokenizer), **run.measure(model, tokenizer, ("en_text",))}
    examples = (sl.exam_examples(tokenizer, run.english_exam("train"), "en", opts.max_len)
                + sl.exam_examples(tokenizer, data.en_mcq, "en", opts.max_len) + run.text(tokenizer, data.en_text))
    # Exam rows also carry the letter loss, so their answers weigh as much as a text's tokens do.
    letter_rows = sl.stage_loss(opts.layer_loss, 0.0, sl.letter_token_ids(tokenizer, chat=False), every_row=False)
    budget = run.steps()
    # A check at half the budget can stop MedGemma early; the 270M (~0.17) cannot reach the gate, so it checks once.
    chunk = max(1, budget // (opts.english_rounds or (1 if run.base["size"] == "270m" else 2)))
    # One training, extended round by round (resuming) until the gate passes or the budget is spent.
    # The last round's check is the "after" measurement's own English dev score, not a second scoring.
    phase, checks, accuracy, steps, after = None, [], before["en_accuracy"], 0, None
    while accuracy < opts.gate and steps < budget:
        steps = min(budget, steps + chunk)
        config = run.train_config(steps)
        phase = run.train_phase("train", model, sl.LORA_PATTERNS, letter_rows,
                                sl.mixed_batches(examples, None, config), config, opts.resume or steps > chunk)
        model.eval()
        if steps < budget:
            accuracy = sl.evaluate(model, tokenizer, run.dev("en"), sl.run_formulation(run.run_dir), "en",
                                   progress=False).accuracy
        else:
            after = run.measure(model, tokenizer)
            accuracy = after["en_accuracy"]
        checks.append({"steps": steps, "en_accuracy": accuracy})
        sl.log.info("s1.1: English dev accuracy %.3f after %d steps (gate %.2f)", accuracy, steps, opts.gate)
    after = after or run.measure(model, tokenizer)
    run.save(model, {"before": before, "after": after, "phases": [phase] if phase else [], "gate_checks": checks,
                     "gate_passed": accuracy >= opts.gate, "verdicts": run.verdicts(before, after)})


if __name__ == "__main__":
    sys.exit(main())
