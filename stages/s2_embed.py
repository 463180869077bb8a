"""s2 embed: fix the teacher (the model as it enters), add zero-initialised Korean and English language
embeddings and train only them on Korean medical text.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


@sl.stage_script("s2", __doc__)
def main(run: sl.StageRun) -> None:
    model, tokenizer = run.load_previous()
    if "lora1" in sl.adapter_specs(model):
        sl.snapshot_adapter(model, "lora1", "teacher")  # the teacher: lora1 as it enters, frozen
    sl.add_language_embeddings(model, tokenizer, korean_delta=run.opts.korean_delta)
    before = run.measure_entry(model, tokenizer)
    config = run.train_config()
    korean = run.text(tokenizer, run.data.ko_text)
    phase = run.train_phase("train", model, sl.LANGUAGE_PATTERNS, sl.stage_loss(run.opts.layer_loss, 0.0),
                            sl.mixed_batches(korean, None, config), config)
    after = run.measure(model, tokenizer)
    run.save(model, {"before": before, "after": after, "phases": [phase], "english_reference": before["en_accuracy"],
                     "verdicts": run.verdicts(before, after)})


if __name__ == "__main__":
    sys.exit(main())
