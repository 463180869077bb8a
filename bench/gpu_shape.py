"""medko's three GPU throughputs at a preset's shape, one random-weight model built in GPU memory (no checkpoint, so
the 27B's 54 GB need no disk): decoding (generate_ids, s1's and s5's rows), logits scoring (evaluate, the stages'
16 rows) and bf16 LoRA training (bench/train.py's medko side: packed rows of the bundled Korean text). medko only:
the peers' figures at 4B are bench/gpu_cost.sh's. The figures are what engine/costs.py's THROUGHPUTS hold.

    python bench/gpu_shape.py --shape 27b                      # on a GPU: about 2 minutes at 27B on an H200
    python bench/gpu_shape.py --shape 270m --device cpu --decode-rows 2 --new-tokens 4 --questions 4 --steps 1
                                                               # a CPU rehearsal of the script
Prints a table and, last, one JSON line of every figure. Needs the cached 270M tokenizer (bench/common.py).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_memory_mb, random_model, reset_peak_memory, summary, timed  # noqa: E402
from eval import exam  # noqa: E402
from gpu_generate import prompts  # noqa: E402
from train import chunks, packed_rows  # noqa: E402
from train_sides import medko_trainer  # noqa: E402

from engine.data import load_texts  # noqa: E402
from engine.embedded_270m import default_270m_dir, ensure_270m  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402
from engine.generate import generate_ids  # noqa: E402
from engine.model import PRESETS  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402
import shared_logic as sl  # noqa: E402


def decode(model, tokenizer: Tokenizer, rows: int, new_tokens: int) -> dict:
    """Seconds per new token a row gets (a decoding step, drafting on as the stages decode), after a warm-up run."""
    run = functools.partial(generate_ids, model, prompts(tokenizer, rows), new_tokens, set(), tokenizer.pad_id,
                            tokenizer.vocab_size, batch_size=rows)
    seconds = timed(run, 1)[0]
    return {"rows": rows, "new_tokens": new_tokens, "s": seconds, "s_per_step": seconds / new_tokens,
            "tokens_per_s": rows * new_tokens / seconds}


def score(model, tokenizer: Tokenizer, questions: int, batch: int) -> dict:
    rows = exam(str(sl.DATA_DIR / "kormedmcqa"), questions)
    run = functools.partial(evaluate, model, tokenizer, rows, mode="logits", lang="ko", batch_size=batch,
                            progress=False)
    seconds = timed(run, 1)[0]
    return {"questions": len(rows), "batch": batch, "s": seconds, "questions_per_s": len(rows) / seconds}


ROWS, SEQ = 4, 256  # a training step's packed rows and their tokens: bench/train.py's rows workload


def train(model, tokenizer: Tokenizer, args: argparse.Namespace) -> dict:
    """bench/train.py's rows workload on medko's side: ROWS rows of SEQ tokens a step, LoRA r16 on every
    projection."""
    texts = list(load_texts(sl.DATA_DIR / "ko_medical_text.jsonl"))
    steps = chunks({"main": packed_rows(tokenizer, texts, SEQ)}, ROWS, args.warmup + args.steps)
    options = SimpleNamespace(quantize=None, max_len=SEQ, layer_weight=10.0)
    dtype = next(model.parameters()).dtype
    model, step = medko_trainer(options, args.device, dtype, model=model)
    batches, losses = iter(steps), []
    reset_peak_memory(args.device)
    times = timed(lambda: losses.append(step(next(batches))["loss"]), args.steps, warmup=args.warmup)
    result = summary(times, ROWS * SEQ)
    return {"tokens_per_step": ROWS * SEQ, "median_s": result["median_s"], "min_s": result["min_s"],
            "max_s": result["max_s"], "tokens_per_s": result["per_s"], "peak_mb": peak_memory_mb(args.device),
            "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="27b", choices=["270m", "4b", "27b"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--decode-rows", default="16,64", help="rows decoding at once, each a run (s1 16, s5 64)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--questions", type=int, default=300, help="KorMedMCQA questions scored (bundled, repeated)")
    p.add_argument("--batch", type=int, default=16, help="rows a scoring forward (the stages' default)")
    p.add_argument("--steps", type=int, default=6, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps before them")
    args = p.parse_args()
    cached = default_270m_dir()
    tokenizer = Tokenizer((cached if (cached / "tokenizer.json").is_file() else ensure_270m()) / "tokenizer.json")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    start = time.perf_counter()
    model = random_model(args.shape, args.device, dtype)
    built_s = time.perf_counter() - start
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {"shape": args.shape, "device": device, "torch": torch.__version__, "built_s": built_s,
              "params": sum(t.numel() for t in model.parameters()), "model_mb": peak_memory_mb(args.device)}
    print(f"{args.shape} ({PRESETS[args.shape].num_layers} layers, {result['params'] / 1e9:.2f}B parameters) random "
          f"{str(dtype).removeprefix('torch.')} on {device}, built in {built_s:.1f} s", flush=True)
    with torch.no_grad():
        result["decode"] = [decode(model, tokenizer, int(r), args.new_tokens) for r in args.decode_rows.split(",")]
        for d in result["decode"]:
            print(f"decode {d['rows']} rows x {d['new_tokens']}: {d['s']:.2f} s, {d['s_per_step'] * 1000:.1f} ms a "
                  f"step, {d['tokens_per_s']:,.0f} new tokens/s", flush=True)
        result["score"] = score(model, tokenizer, args.questions, args.batch)
    s = result["score"]
    print(f"score {s['questions']} questions, batch {s['batch']}: {s['s']:.2f} s, {s['questions_per_s']:.1f} "
          "questions/s", flush=True)
    result["train"] = t = train(model, tokenizer, args)
    print(f"train {ROWS} x {SEQ} tokens a step, {args.steps} steps after {args.warmup}: median {t['median_s']:.3f} s "
          f"(min {t['min_s']:.3f}, max {t['max_s']:.3f}), {t['tokens_per_s']:,.0f} tokens/s, peak "
          f"{t['peak_mb']:,.0f} MiB; losses {', '.join(f'{x:.4f}' for x in t['losses'])}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
