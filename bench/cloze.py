"""Cloze scoring speed: medko's evaluator against lm-evaluation-harness's own loglikelihood scoring, on the 270M.

    python bench/cloze.py                                  # both languages, dev+test: 192 questions each
    python bench/cloze.py --lang en --split dev --limit 4  # a quick check that both sides agree

Both sides score the same bundled KorMedMCQA questions (data/kormedmcqa for Korean, data/kormedmcqa_en for
English, row-aligned; dev then test, the first --limit of each language) in OLMES's cloze formulation, on the real
Gemma 3 270M in float32 on the CPU, with the same number of torch threads.

medko: engine.evaluate.evaluate(model, tokenizer, rows, "cloze", lang, batch_size=--batch-size), which scores
  --batch-size // 2 questions per pass: one prefill of each prompt, its options continuing from the cached prefix.
peer: lm-eval's own pipeline, lm_eval.evaluator.evaluate with lm_eval.models.huggingface.HFLM (transformers,
  pretrained = the 270M's HF-layout directory, dtype float32, device cpu, batch_size --peer-batch-size requests,
  add_bos_token=True) over a `multiple_choice` task built from a config dict over a JSONL of the same questions:
  doc_to_text the cloze prompt (`Question: {q}\\nAnswer:`, Korean `질문: {q}\\n정답:`, a Jinja template), doc_to_choice
  the stripped option texts, doc_to_target the answer's index, target_delimiter " ", metric acc_norm. Its
  prediction for a question is lm-eval's acc_norm argmax, read from the logged samples: argmax of each choice's
  loglikelihood divided by len(choice).

Timed: each side's scoring of all its questions, after a warm-up on the first two questions. Excluded: loading
the model and tokenizer (both sides); for lm-eval also building the task and loading its dataset, and the bootstrap
stderr (bootstrap_iters=0). Included: prompt building, tokenization, the forwards and the metrics. Each side runs in
its own process. The last line is `ratio: X.XX`, lm-eval's seconds over medko's.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from common import run_side, timed

from engine.checkpoints import load_base, resolve_model_dir
from engine.cloze import CLOZE_CUE
from engine.data import KORMEDMCQA_SUBSETS, MCQ, load_kormedmcqa
from engine.evaluate import evaluate
import shared_logic as sl

SOURCES = {"ko": sl.DATA_DIR / "kormedmcqa", "en": sl.DATA_DIR / "kormedmcqa_en"}


def questions(lang: str, splits: list[str], limit: int | None) -> list[MCQ]:
    rows = [r for split in splits for r in load_kormedmcqa(KORMEDMCQA_SUBSETS, split, SOURCES[lang], lang)]
    return rows[:limit]


def medko_side(groups: dict[str, list[MCQ]], batch_size: int) -> tuple[dict, float]:
    start = time.perf_counter()
    model, tokenizer, _ = load_base("270m", None, "cpu", torch.float32)
    load_seconds = time.perf_counter() - start

    def score(rows: list[MCQ], lang: str) -> list[str]:
        report = evaluate(model, tokenizer, rows, "cloze", lang, batch_size=batch_size, progress=False)
        return [p["pred"] for p in report.predictions]

    return {lang: _time(lambda rows, lang=lang: score(rows, lang), rows) for lang, rows in groups.items()}, load_seconds


def lm_eval_task(lang: str, rows: list[MCQ], tmp: Path) -> dict:
    """A multiple_choice task over `rows` as a config dict, its dataset a JSONL that the `json` builder reads."""
    data = tmp / f"cloze_{lang}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"id": r.id, "question": r.question, "choices": [t.strip() for t in r.options.values()],
                                "label": list(r.options).index(r.answer)}, ensure_ascii=False) + "\n")
    head, cue = CLOZE_CUE[lang]
    return {"task": f"medko_cloze_{lang}_{len(rows)}", "output_type": "multiple_choice", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp / "datasets")},
            "test_split": "test", "doc_to_text": f"{head}{{{{question.strip()}}}}{cue}", "doc_to_choice": "choices",
            "doc_to_target": "label", "target_delimiter": " ", "num_fewshot": 0,
            "metric_list": [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def lm_eval_side(groups: dict[str, list[MCQ]], batch_size: int) -> tuple[dict, float]:
    import numpy as np
    from lm_eval.evaluator import evaluate as harness_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    start = time.perf_counter()
    lm = HFLM(pretrained=str(resolve_model_dir("270m", None)), dtype="float32", device="cpu", batch_size=batch_size,
              add_bos_token=True)
    load_seconds = time.perf_counter() - start
    if lm.tok_encode("Question:")[0] != lm.tokenizer.bos_token_id:
        raise SystemExit("lm-eval's HFLM does not start its encodings with BOS; the two sides would score differently")
    manager = TaskManager()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lang, rows in groups.items():
            task_dict = get_task_dict([lm_eval_task(lang, rows, Path(tmp))], manager)
            (name,) = task_dict

            def score(subset: list[MCQ]) -> list[str]:
                out = harness_evaluate(lm, task_dict, limit=len(subset), bootstrap_iters=0, log_samples=True,
                                       verbosity="WARNING")
                samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
                preds = []
                for sample, row in zip(samples, subset):
                    lls = np.array([ll for ll, _ in sample["filtered_resps"]])
                    lengths = np.array([float(len(c)) for c in sample["doc"]["choices"]])
                    preds.append(list(row.options)[int(np.argmax(lls / lengths))])
                    if sample["acc_norm"] != float(preds[-1] == row.answer):
                        raise SystemExit(f"{row.id}: lm-eval's own acc_norm disagrees with the prediction read from "
                                         f"its logged loglikelihoods; the samples are not in question order")
                return preds

            results[lang] = _time(score, rows)
    return results, load_seconds


def _time(score: Callable[[list[MCQ]], list[str]], rows: list[MCQ]) -> dict:
    """One warm-up on the first two questions, then one timed pass over all of them."""
    score(rows[:2])
    preds: list[list[str]] = []
    (seconds,) = timed(lambda: preds.append(score(rows)), repeats=1, warmup=0)
    return {"ids": [r.id for r in rows], "gold": [r.answer for r in rows], "preds": preds[0], "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lang", default="both", choices=["en", "ko", "both"])
    p.add_argument("--split", default="both", choices=["dev", "test", "both"])
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions of each language")
    p.add_argument("--batch-size", type=int, default=16,
                   help="medko's evaluation batch size (evaluate's default; cloze scores half as many questions)")
    p.add_argument("--peer-batch-size", type=int, default=16,
                   help="lm-eval HFLM's batch size, in loglikelihood requests (one per option)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch CPU threads for each side (default: torch's default here)")
    p.add_argument("--side", choices=["medko", "lm-eval"], help=argparse.SUPPRESS)
    args = p.parse_args()
    langs = ["en", "ko"] if args.lang == "both" else [args.lang]
    splits = ["dev", "test"] if args.split == "both" else [args.split]
    if args.side:
        torch.set_num_threads(args.threads)
        groups = {lang: questions(lang, splits, args.limit) for lang in langs}
        side = medko_side if args.side == "medko" else lm_eval_side
        results, load_seconds = side(groups, args.batch_size if args.side == "medko" else args.peer_batch_size)
        print(json.dumps({"groups": results, "load_s": load_seconds}))
        return
    resolve_model_dir("270m", None)  # converts the 270M once, before either side's clock could see it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the sides read local files only
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    passed = ["--lang", args.lang, "--split", args.split, "--batch-size", str(args.batch_size),
              "--peer-batch-size", str(args.peer_batch_size), "--threads", str(args.threads)]
    passed += ["--limit", str(args.limit)] if args.limit else []
    sides = {side: run_side(__file__, side, passed) for side in ("medko", "lm-eval")}
    medko, peer = sides["medko"]["groups"], sides["lm-eval"]["groups"]
    print(f"cloze scoring, Gemma 3 270M, float32 on cpu, {args.threads} threads each, KorMedMCQA "
          f"{'+'.join(splits)}{f' (first {args.limit} per language)' if args.limit else ''}")
    print(f"medko: evaluate(mode='cloze'), batch {args.batch_size} ({max(1, args.batch_size // 2)} questions a pass); "
          f"lm-eval {_version()}: HFLM batch {args.peer_batch_size} requests, multiple_choice task, acc_norm")
    print("seconds: the scoring only, after a warm-up on 2 questions; excluded are model loading on both sides "
          f"(medko {sides['medko']['load_s']:.1f} s, lm-eval {sides['lm-eval']['load_s']:.1f} s) and lm-eval's task "
          "building and dataset loading")
    totals = {"medko": 0.0, "lm-eval": 0.0}
    for lang in langs:
        m, h = medko[lang], peer[lang]
        n = len(m["ids"])
        same = sum(a == b for a, b in zip(m["preds"], h["preds"]))
        print(f"{lang}: n {n}; accuracy medko {_accuracy(m):.4f}, lm-eval {_accuracy(h):.4f}; "
              f"agreement {same}/{n} = {same / n:.4f}; seconds medko {m['seconds']:.2f}, lm-eval {h['seconds']:.2f}")
        for i in range(n):
            if m["preds"][i] != h["preds"][i]:
                print(f"  {m['ids'][i]}: medko {m['preds'][i]}, lm-eval {h['preds'][i]}, gold {m['gold'][i]}")
        totals["medko"] += m["seconds"]
        totals["lm-eval"] += h["seconds"]
    print(f"total seconds: medko {totals['medko']:.2f}, lm-eval {totals['lm-eval']:.2f}")
    print(f"ratio: {totals['lm-eval'] / totals['medko']:.2f}")


def _accuracy(group: dict) -> float:
    return sum(p == g for p, g in zip(group["preds"], group["gold"])) / len(group["gold"])


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


if __name__ == "__main__":
    main()
