"""s3 korean: Korean medical text on language embeddings + lora1, while a per-layer loss holds English
hidden states to the teacher's; then the English guard.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


@sl.stage_script("s3", __doc__)
def main(run: sl.StageRun) -> None:
    opts = run.opts
    model, tokenizer = run.load_previous()
    if "lora1" not in sl.adapter_specs(model):
        sl.add_lora(model, "lora1", rank=opts.lora_rank, alpha=opts.lora_alpha)
    patterns = sl.LANGUAGE_PATTERNS + sl.LORA_PATTERNS
    before = run.measure_entry(model, tokenizer)
    config = run.train_config()
    korean, english = run.text(tokenizer, run.data.ko_text), run.text(tokenizer, run.data.en_text)
    phase = run.train_phase("train", model, patterns, sl.stage_loss(opts.layer_loss, run.layer_weight()),
                            sl.mixed_batches(korean, english, config), config)
    after, guard = run.english_guard(model, tokenizer, patterns, run.measure(model, tokenizer))
    run.save(model, {"before": before, "after": after, "phases": [phase], "guard": guard,
                     "verdicts": run.verdicts(before, after)})


if __name__ == "__main__":
    sys.exit(main())
