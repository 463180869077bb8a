"""s0 data: fetch and normalise the exam, English and Korean medical data and the pairs; report split overlap.

The 270m default reads the bundled sample data in data/; --size 4b/27b reads the hub (or --data DIR).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


@sl.stage_script("s0", __doc__)
def main(run: sl.StageRun) -> None:
    source, rows, left_out = sl.read_sources(run.opts)
    exam = rows["exam"]
    overlap = sl.split_overlap(exam)  # fewshot included: its questions are dev questions, so dev/fewshot is expected
    for pair_name, found in overlap.items():
        if found:
            sl.log.warning("question overlap %s: %d pairs, e.g. %s", pair_name, len(found), found[0])
    held = sl.held_out_sets(source, rows, run.opts.encoding)  # never trained on: losses, drift and chrF before → after
    (ko_train, ko_heldout), (en_train, en_heldout), (pairs, pairs_heldout) = held.values()
    files = {f"exam_{split}.jsonl": [sl.mcq_record(r) for r in questions] for split, questions in exam.items()}
    files.update({"en_mcq.jsonl": [sl.mcq_record(r) for r in rows["en_mcq"]],
                  "ko_text.jsonl": [{"text": t} for t in ko_train],
                  "ko_heldout.jsonl": [{"text": t} for t in ko_heldout],
                  "en_text.jsonl": [{"text": t} for t in en_train],
                  "en_heldout.jsonl": [{"text": t} for t in en_heldout],
                  "pairs.jsonl": [{"ko": p.src, "en": p.tgt} for p in pairs],
                  "pairs_heldout.jsonl": [{"ko": p.src, "en": p.tgt} for p in pairs_heldout],
                  "reasoning.jsonl": [sl.mcq_record(r) for r in rows["reasoning"]]})
    for name, records in files.items():
        sl.write_jsonl_atomic(records, run.out / name)
    korean = sl.korean_training_text(ko_train, pairs, rows["reasoning"], exam["train"])
    unseen = {split: sl.unseen_answers(exam[split], korean) for split in ("dev", "test")}
    run.save(None, {"source": source, "counts": {name: len(records) for name, records in files.items()},
                    "unseen_answers": unseen,
                    "left_out": left_out,
                    "overlap": {k: len(v) for k, v in overlap.items()}, "overlap_pairs": overlap,
                    "data": {name: sl.file_sha256(run.out / name) for name in files}})


if __name__ == "__main__":
    sys.exit(main())
