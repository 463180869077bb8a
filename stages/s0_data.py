"""s0 data: fetch and normalise the exam, English and Korean medical data and the pairs; report split overlap.

The 270m default reads the bundled sample data in data/; --size 4b/27b reads the hub (or --data DIR). Each source
is read once into a spool beside the files and checked there, so memory stays flat however large the data.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import shared_logic as sl  # noqa: E402


@sl.stage_script("s0", __doc__)
def main(run: sl.StageRun) -> None:
    with sl.spooling(run.out) as spools:
        source, rows, left_out = sl.read_sources(run.opts, spools)
        exam = rows["exam"]
        overlap = sl.split_overlap({s: spool.rows for s, spool in exam.items()})  # dev/fewshot expected: fewshot is dev
        for pair_name, found in overlap.items():
            if found:
                sl.log.warning("question overlap %s: %d pairs, e.g. %s", pair_name, len(found), found[0])
        # never trained on: losses, drift and chrF before → after
        held = sl.held_out_sets(source, rows, spools, run.opts.encoding)
        (ko_train, ko_heldout), (en_train, en_heldout), (pairs, pairs_heldout) = held.values()
        files = {f"exam_{split}.jsonl": (spool, range(len(spool))) for split, spool in exam.items()}
        files.update({"en_mcq.jsonl": (rows["en_mcq"], range(len(rows["en_mcq"]))),
                      "ko_text.jsonl": ko_train, "ko_heldout.jsonl": ko_heldout,
                      "en_text.jsonl": en_train, "en_heldout.jsonl": en_heldout,
                      "pairs.jsonl": pairs, "pairs_heldout.jsonl": pairs_heldout,
                      "reasoning.jsonl": (rows["reasoning"], range(len(rows["reasoning"])))})
        counts = {name: sl.write_rows(spool, part, run.out / name) for name, (spool, part) in files.items()}
    written = {name: sl.lazy_rows(run.out / f"{name}.jsonl", kind) for name, kind in (
        ("ko_text", "text"), ("pairs", "pair"), ("reasoning", "reasoning"), ("exam_train", "mcq"),
        ("exam_dev", "mcq"), ("exam_test", "mcq"))}
    dev = written["exam_dev"]  # one scan for dev and test: whether an answer occurs does not depend on its split
    both = sl.unseen_answers(dev + written["exam_test"], sl.korean_training_text(
        written["ko_text"], written["pairs"], written["reasoning"], written["exam_train"]))
    unseen = {"dev": [i for i in both if i < len(dev)], "test": [i - len(dev) for i in both if i >= len(dev)]}
    run.save(None, {"source": source, "counts": counts,
                    "unseen_answers": unseen,
                    "left_out": left_out,
                    "overlap": {k: len(v) for k, v in overlap.items()}, "overlap_pairs": overlap,
                    "data": {name: sl.file_sha256(run.out / name) for name in files}})


if __name__ == "__main__":
    sys.exit(main())
