"""Multiple-choice evaluation speed: medko's batched logits evaluator vs an lm-evaluation-harness-style loop.

    python bench/eval.py                   # the 270M on CPU, the bundled KorMedMCQA dev+test (all subsets)
    python bench/eval.py --peer-batched    # also time the one-forward-per-question peer
    python bench/eval.py --shape 4b        # 4B-shaped random bf16 weights on a GPU, 3,009 questions

On a GPU --shape 4b has run once (one H200, torch 2.11, transformers 5.17, 2026-11-30, --questions 300: 160.6 against
4.5 questions/s, ratio 35.7, 290/300 answers agreeing, the rest near-ties of random weights).

All sides read the same questions and build the same prompt, mcq_prompt(row, "ko"): lm-eval's kormedmcqa
doc_to_text, ending in the cue "정답：", no few-shot examples.

medko: evaluate(model, tokenizer, rows, mode="logits", lang="ko", batch_size=--batch-size). It encodes the
  prompts, sorts them by length, runs one forward per left-padded batch with only the last position through
  the head, and takes the argmax of the option letters' next-token logits.
peer (the default comparison): transformers AutoModelForCausalLM (sdpa, eval, no_grad) and AutoTokenizer,
  scoring as lm-eval's HFLM loglikelihood does for multiple choice, one request at a time (batch size 1):
  for each question and each option letter L the request is (context = the prompt, continuation = " L"),
  encoded as lm-eval's _encode_pair does (whole = encode(context + " L") with BOS, context_enc =
  encode(context), continuation_enc = whole[len(context_enc):]); the input is
  (context_enc + continuation_enc)[:-1]; one forward; log_softmax over the full [T, vocab] logits; the
  loglikelihood is the sum of the continuation tokens' log-probabilities; the prediction is the argmax over
  the options. That is 5 forwards per question. It is lm-eval with logits_cache=False, or an older release:
  lm-eval's default (logits_cache=True) groups one-token continuations that share a context and runs one
  forward per question, which --peer-batched is closer to.
peer-batched (--peer-batched): the same model and tokenizer, one forward of encode(prompt) per question at
  batch size 1 with logits_to_keep=1, and the argmax of the option letters' logits.

Throughput is questions/s over the whole pass (prompt building and tokenization included), after a warm-up
pass over the first two questions; peak memory is that of the pass, loading left out. Each side runs in its
own process; the last line is `ratio: X.XX`, medko questions/s over the default peer's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from common import bench_model_dir, peak_memory_mb, print_table, reset_peak_memory, run_side, summary, timed

from engine.checkpoints import load_model
from engine.data import KORMEDMCQA_SUBSETS, MCQ, load_kormedmcqa
from engine.evaluate import evaluate, mcq_prompt
from engine.tokenizer import Tokenizer
import shared_logic as sl

GPU_QUESTIONS = 3009  # the size of the full KorMedMCQA test split, for the --shape 4b timing


def exam(source: str, questions: int | None) -> list[MCQ]:
    """Dev then test of every subset; repeated (ids suffixed #k) up to `questions` when that is given."""
    rows = [r for split in ("dev", "test") for r in load_kormedmcqa(KORMEDMCQA_SUBSETS, split, source)]
    if questions is None:
        return rows
    return [dataclasses.replace(rows[i % len(rows)], id=f"{rows[i % len(rows)].id}#{i // len(rows)}")
            for i in range(questions)]


def medko_scorer(args: argparse.Namespace, device: str, dtype: torch.dtype
                 ) -> Callable[[list[MCQ]], list[dict]]:
    model = load_model(Path(args.model_dir), device, dtype)
    tokenizer = Tokenizer(Path(args.model_dir) / "tokenizer.json")

    def score(rows: list[MCQ]) -> list[dict]:
        report = evaluate(model, tokenizer, rows, mode="logits", lang="ko", batch_size=args.batch_size,
                             progress=False)
        return [{"pred": p["pred"]} for p in report.predictions]

    return score


def peer_scorer(args: argparse.Namespace, device: str, dtype: torch.dtype
                ) -> Callable[[list[MCQ]], list[dict]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=True).input_ids  # lm-eval adds BOS for Gemma

    @torch.no_grad()
    def loglikelihood(context: str, continuation: str) -> float:
        context_enc = encode(context)
        continuation_enc = encode(context + continuation)[len(context_enc):]
        inp = torch.tensor([(context_enc + continuation_enc)[:-1]], device=device)
        logprobs = F.log_softmax(model(inp, use_cache=False).logits, dim=-1)[0]
        cont = torch.tensor(continuation_enc, device=device)
        return float(logprobs[-len(cont):].gather(-1, cont[:, None]).sum())

    @torch.no_grad()
    def letter_logits(context: str, letters: list[str]) -> list[float]:
        ids = encode(context)
        letter_ids = [encode(context + f" {letter}")[len(ids):] for letter in letters]
        if any(len(t) != 1 for t in letter_ids):
            raise SystemExit("an option letter is not one token after the prompt; --peer-batched cannot score it")
        logits = model(torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1).logits[0, -1]
        return [float(logits[t[0]]) for t in letter_ids]

    def score(rows: list[MCQ]) -> list[dict]:
        out = []
        for row in rows:
            context, letters = mcq_prompt(row, "ko"), list(row.options)
            if args.side == "peer":
                scores = [loglikelihood(context, f" {letter}") for letter in letters]
            else:
                scores = letter_logits(context, letters)
            ranked = sorted(range(len(letters)), key=lambda i: -scores[i])
            out.append({"pred": letters[ranked[0]], "margin": scores[ranked[0]] - scores[ranked[1]]})
        return out

    return score


def run(args: argparse.Namespace) -> dict:
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = exam(args.source, args.questions)
    start = time.perf_counter()
    score = (medko_scorer if args.side == "medko" else peer_scorer)(args, device, dtype)
    load_seconds = time.perf_counter() - start
    load_peak = peak_memory_mb(device)
    score(rows[:2])  # warm-up
    reset_peak_memory(device)
    outputs = []
    times = timed(lambda: outputs.append(score(rows)), args.repeats, warmup=0)
    result = summary(times, len(rows))
    result.update(peak_mb=peak_memory_mb(device), load_peak_mb=load_peak, load_s=load_seconds,
                  ids=[r.id for r in rows], gold=[r.answer for r in rows], outputs=outputs[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="270m", choices=["270m", "4b"],
                   help="270m: real weights (--model-dir); 4b: random bf16 weights of that shape on CUDA")
    p.add_argument("--model-dir", default=None, help="checkpoint directory with tokenizer.json (default: the 270M)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="4b always uses cuda")
    p.add_argument("--source", default=str(sl.DATA_DIR / "kormedmcqa"),
                   help="KorMedMCQA directory laid out {subset}/{split}.jsonl (default: the bundled sample)")
    p.add_argument("--questions", type=int, default=None,
                   help=f"repeat the dev+test questions up to this many (default: each once; {GPU_QUESTIONS} for 4b)")
    p.add_argument("--batch-size", type=int, default=16, help="medko's evaluation batch size")
    p.add_argument("--repeats", type=int, default=1, help="timed passes over all questions per side")
    p.add_argument("--peer-batched", action="store_true",
                   help="also time the peer with one forward per question (batch size 1, logits_to_keep=1)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads per side (default: torch's default here); 1 is steadier on a busy machine")
    p.add_argument("--side", choices=["medko", "peer", "peer-batched"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        torch.set_num_threads(args.threads)
        print(json.dumps(run(args)))
        return
    if args.shape == "4b":
        args.device = "cuda"
        args.questions = args.questions or GPU_QUESTIONS
    sides = ["medko", "peer"] + (["peer-batched"] if args.peer_batched else [])
    with tempfile.TemporaryDirectory() as tmp:
        args.model_dir = bench_model_dir(args.model_dir, args.shape, Path(tmp))
        passed = ["--model-dir", args.model_dir, "--device", args.device, "--source", args.source,
                  "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        passed += ["--questions", str(args.questions)] if args.questions else []
        results = {side: run_side(__file__, side, passed) for side in sides}
    medko = results["medko"]
    n = len(medko["ids"])
    precision = "bf16" if args.device == "cuda" else f"float32, {args.threads} threads"
    print(f"multiple-choice evaluation, {args.shape}, {n} KorMedMCQA questions (dev+test, all subsets"
          f"{', repeated' if args.questions else ''}), {args.device} {precision}, {args.repeats} timed pass(es)")
    print(f"medko: evaluate(mode='logits'), batch {args.batch_size}, length-sorted, "
          f"{-(-n // args.batch_size)} batched forwards; "
          f"peer: lm-eval-style loglikelihood, batch 1, 5 forwards per question"
          + ("; peer-batched: 1 forward per question, batch 1" if args.peer_batched else ""))
    if args.device == "cuda":
        print("NOTE: this GPU path has run once, at --shape 4b on one H200; check the numbers with care")
    print_table(list(results.items()), "questions")
    print("peak MiB after loading, before the timed work: "
          + ", ".join(f"{side} {r['load_peak_mb']:.0f}" for side, r in results.items()))
    print("accuracy: " + ", ".join(
        f"{side} {sum(o['pred'] == g for o, g in zip(r['outputs'], r['gold'])) / n:.4f}" for side, r in results.items()))
    for side in sides[1:]:
        other = results[side]["outputs"]
        differ = [i for i in range(n) if medko["outputs"][i]["pred"] != other[i]["pred"]]
        print(f"agreement medko vs {side}: {n - len(differ)}/{n}")
        for i in differ:
            print(f"  {medko['ids'][i]}: medko {medko['outputs'][i]['pred']}, {side} {other[i]['pred']} "
                  f"({side}'s margin between its top two: {other[i]['margin']:.2e})")
    if args.shape == "4b":
        print(f"medko total: {medko['median_s']:.1f} s for {n} questions (goal: under 60 s), "
              f"plus {medko['load_s']:.1f} s loading")
    if args.peer_batched:
        print(f"ratio vs peer-batched: {medko['per_s'] / results['peer-batched']['per_s']:.2f}")
    print(f"ratio: {medko['per_s'] / results['peer']['per_s']:.2f}")


if __name__ == "__main__":
    main()
