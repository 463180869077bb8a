"""Generate-mode evaluation speed: `medko.py eval --mode generate` vs lm-evaluation-harness's own kormedmcqa task.

    python bench/generate.py                       # the 270M on CPU, the first 16 bundled test questions
    python bench/generate.py --limit 2 --max-new-tokens 8    # a smoke run of the whole path, in about a minute

Both sides answer the same questions, greedy, with up to --max-new-tokens new tokens (lm-eval's 1,024) and the
kormedmcqa stop strings, zero-shot, on the same HF-layout weights in float32.

medko: the command a user types, `python medko.py eval --model DIR --data D --split S --limit N --mode generate
  --extraction harness --batch-size B --out R.json`, in its own process; its time is the report's `seconds`
  (prompts, generation and extraction; loading left out). Finished rows leave the batch and waiting rows join.
harness: lm_eval.simple_evaluate with an HFLM (`hf`, transformers, float32, sdpa, --peer-batch-size, lm-eval's
  default 1) built before the clock starts, on a task file that `include`s the installed lm_eval's
  kormedmcqa/_template_yaml (prompt, stop strings, max_gen_toks, the ExtractChoiceFilter) and only points it at
  a local JSONL of the same questions in the hub's schema (question, A-E, answer 1-5). Its time is
  simple_evaluate's (task and dataset set-up, generation, filters, metrics).

Answers are compared per question: medko's harness extraction against the harness's filtered response (no letter
is "" on both). The last line is `ratio: X.XX`, the harness's seconds over medko's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, bench_model_dir, run_side

from engine.data import KORMEDMCQA_SUBSETS, LETTERS, MCQ, load_kormedmcqa
from engine.evaluate import GENERATE_TOKENS
import shared_logic as sl

TASK = "medko_bench_kormedmcqa"


def hub_row(row: MCQ) -> dict:
    """A row in the hub's KorMedMCQA schema, which the harness's prompt template reads."""
    return {"subject": row.subset, **row.meta, "question": row.question, **row.options,
            "answer": LETTERS.index(row.answer) + 1}


def write_task(rows: list[MCQ], fewshot: list[MCQ], directory: Path) -> Path:
    """A task file that includes the installed kormedmcqa template and reads these rows from local JSONL."""
    import lm_eval

    template = Path(lm_eval.__file__).parent / "tasks" / "kormedmcqa" / "_template_yaml"
    files = {}
    for split, part in (("test", rows), ("fewshot", fewshot)):
        files[split] = directory / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(hub_row(r), ensure_ascii=False) + "\n" for r in part))
    (directory / f"{TASK}.yaml").write_text(
        f"include: {template}\ntask: {TASK}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n" + "".join(f"    {s}: {f}\n" for s, f in files.items()))
    return template


def harness_side(args: argparse.Namespace) -> dict:
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # the task's data is local
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = HFLM(pretrained=args.model_dir, dtype="float32", device="cpu", batch_size=args.peer_batch_size,
                 attn_implementation="sdpa")
    manager = TaskManager(include_path=args.task_dir)
    start = time.perf_counter()
    results = simple_evaluate(model=model, tasks=[TASK], task_manager=manager, log_samples=True,
                              gen_kwargs={"max_gen_toks": args.max_new_tokens}, bootstrap_iters=0)
    seconds = time.perf_counter() - start
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return {"seconds": seconds, "answers": [s["filtered_resps"][0] for s in samples],
            "outputs": [s["resps"][0][0] for s in samples]}


def medko_side(args: argparse.Namespace, out: Path) -> dict:
    """The eval command as a user types it; its report holds the evaluation's seconds and every generation."""
    command = [sys.executable, str(ROOT / "medko.py"), "eval", "--model", args.model_dir, "--data", args.data,
               "--split", args.split, "--subsets", args.subsets, "--limit", str(args.limit), "--mode", "generate",
               "--extraction", "harness", "--batch-size", str(args.batch_size),
               "--max-new-tokens", str(args.max_new_tokens), "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    report = json.loads(out.read_text())
    return {"seconds": report["seconds"], "wall_s": wall, "ids": [p["id"] for p in report["predictions"]],
            "answers": [p["pred"] or "" for p in report["predictions"]],
            "outputs": [p["output"] for p in report["predictions"]], "gold": [p["gold"] for p in report["predictions"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="HF-layout checkpoint with tokenizer.json (default: the 270M)")
    p.add_argument("--data", default=str(sl.DATA_DIR / "kormedmcqa"),
                   help="KorMedMCQA directory ({subset}/{split}.jsonl)")
    p.add_argument("--split", default="test", choices=list(sl.KORMEDMCQA_SPLITS))
    p.add_argument("--subsets", default=",".join(KORMEDMCQA_SUBSETS))
    p.add_argument("--limit", type=int, default=16, help="the first N questions, as `medko.py eval --limit` takes them")
    p.add_argument("--max-new-tokens", type=int, default=GENERATE_TOKENS, help="both sides (lm-eval's 1024)")
    p.add_argument("--batch-size", type=int, default=16, help="medko's decoding batch")
    p.add_argument("--peer-batch-size", type=int, default=1, help="the harness's batch size (its default is 1)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads of each side (OMP_NUM_THREADS); 1 is steadier on a busy machine")
    p.add_argument("--side", choices=["harness"], help=argparse.SUPPRESS)
    p.add_argument("--task-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print(json.dumps(harness_side(args)))
        return
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # both sides' processes inherit it
    rows = list(load_kormedmcqa(args.subsets.split(","), args.split, args.data))[:args.limit]
    fewshot = list(load_kormedmcqa(args.subsets.split(","), "fewshot", args.data))
    with tempfile.TemporaryDirectory() as tmp:
        args.model_dir = bench_model_dir(args.model_dir, "270m", Path(tmp))
        template = write_task(rows, fewshot, Path(tmp))
        medko = medko_side(args, Path(tmp) / "report.json")
        harness = run_side(__file__, "harness", ["--model-dir", args.model_dir, "--task-dir", tmp,
                                                 "--peer-batch-size", str(args.peer_batch_size),
                                                 "--max-new-tokens", str(args.max_new_tokens)])
    n = len(rows)
    print(f"generate-mode KorMedMCQA, 270M-layout weights from {args.model_dir}, {n} questions ({args.split}, "
          f"first {args.limit} of {args.subsets}), greedy, up to {args.max_new_tokens} new tokens, zero-shot, "
          f"CPU float32, {args.threads} threads")
    print(f"harness task: {TASK}, including {template}")
    print(f"medko   {medko['seconds']:8.1f} s  ({n / medko['seconds']:.3f} questions/s; batch {args.batch_size}; "
          f"process wall {medko['wall_s']:.1f} s with loading)")
    print(f"harness {harness['seconds']:8.1f} s  ({n / harness['seconds']:.3f} questions/s; batch "
          f"{args.peer_batch_size})")
    same = [a == b for a, b in zip(medko["answers"], harness["answers"])]
    print(f"answer agreement: {sum(same)}/{n} ({100 * sum(same) / n:.0f}%); identical generations: "
          f"{sum(a == b for a, b in zip(medko['outputs'], harness['outputs']))}/{n}")
    for i in (i for i, s in enumerate(same) if not s):
        print(f"  {medko['ids'][i]}: medko {medko['answers'][i]!r} from {medko['outputs'][i][:80]!r}; "
              f"harness {harness['answers'][i]!r} from {harness['outputs'][i][:80]!r}")
    print("accuracy: " + ", ".join(f"{name} {sum(a == g for a, g in zip(side['answers'], medko['gold'])) / n:.3f}"
                                   for name, side in (("medko", medko), ("harness", harness))))
    print(f"ratio: {harness['seconds'] / medko['seconds']:.2f}")


if __name__ == "__main__":
    main()
