"""CUDA generation throughput: medko's batched greedy decoding with its KV cache against transformers' generate,
the same random bf16 weights of a real shape, the same left-padded prompts and batch, greedy, no stop token.

    python bench/gpu_generate.py --shape 4b --rows 16 --new-tokens 128

Prints each side's seconds and new tokens/s, seconds per decoding step, and how many rows' outputs are identical
(random weights give near-ties that bf16 may break either way, so a few rows can differ; the README's evaluation
check saw 290/300). Needs a GPU, transformers and the cached 270M tokenizer (bench/common.py).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_model_dir  # noqa: E402

from engine.checkpoints import load_base  # noqa: E402
from engine.data import load_mcq_file  # noqa: E402
from engine.evaluate import translation_prompt  # noqa: E402
from engine.generate import generate_ids, left_pad  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def prompts(tokenizer, rows: int) -> list[list[int]]:
    """s1's translation prompts of the bundled dev questions, as s1 builds them, cycled to `rows`."""
    questions = list(load_mcq_file(ROOT / "data" / "kormedmcqa" / "doctor" / "dev.jsonl", lang="ko"))
    texts = [translation_prompt(q.question, "en") for q in questions]
    return [tokenizer.encode(texts[i % len(texts)]) for i in range(rows)]


def timed(fn):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4b", choices=["270m", "4b", "27b"],
                   help="270m: the real one, for a CPU rehearsal of the script (--device cpu)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=16, help="prompts, all decoding at once (s1 uses 16)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--model-dir", default=None, help="a checkpoint instead of random weights of --shape")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench_model_dir(args.model_dir, args.shape, Path(tmp), args.device)
        model, tokenizer, _ = load_base("270m", model_dir, args.device)
        rows = prompts(tokenizer, args.rows)
        run = functools.partial(generate_ids, model, rows, args.new_tokens, set(), tokenizer.pad_id,
                                tokenizer.vocab_size, batch_size=args.rows)
        timed(run)  # warm-up: kernels chosen, caches allocated
        medko, medko_s = timed(run)
        del run, model  # the GPU's memory goes to the peer
        torch.cuda.empty_cache()
        from transformers import Gemma3ForCausalLM

        peer = Gemma3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(args.device).eval()
        ids, mask = left_pad(rows, tokenizer.pad_id, args.device)
        gen = lambda: peer.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False,  # noqa: E731
                                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    eos_token_id=None, pad_token_id=tokenizer.pad_id)
        with torch.no_grad():
            timed(gen)
            out, peer_s = timed(gen)
    theirs = [row[ids.shape[1]:].tolist() for row in out]
    same = sum(a == b for a, b in zip(medko, theirs))
    tokens = args.rows * args.new_tokens
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {"shape": args.shape, "rows": args.rows, "new_tokens": args.new_tokens, "device": device,
              "medko_s": medko_s, "medko_tokens_per_s": tokens / medko_s, "medko_s_per_step": medko_s / args.new_tokens,
              "peer_s": peer_s, "peer_tokens_per_s": tokens / peer_s, "identical_rows": same,
              "ratio": peer_s / medko_s}
    print(f"medko {tokens / medko_s:,.0f} new tokens/s ({medko_s / args.new_tokens * 1000:.1f} ms a step), "
          f"transformers {tokens / peer_s:,.0f}; identical outputs {same}/{args.rows}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
