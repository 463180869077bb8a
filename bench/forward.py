"""Forward throughput and peak memory: medko vs transformers' Gemma3ForCausalLM, same weights and inputs.

    python bench/forward.py                     # the 270M on CPU, float32
    python bench/forward.py --shape 4b          # 4B-shaped random bf16 weights on a GPU, seq 2048, MFU

Each side runs in its own process; the last line is `ratio: X.XX` (medko tokens/s over the peer's).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from common import bench_model_dir, peak_memory_mb, print_table, run_side, summary, timed

from engine.checkpoints import load_model

H100_BF16_DENSE_FLOPS = 989e12  # dense bf16 peak of an H100 SXM; MFU is relative to this


def run(args: argparse.Namespace) -> dict:
    device = "cuda" if args.shape != "270m" else args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    ids = torch.randint(10, 200_000, (args.batch, args.seq), device=device)
    if args.side == "medko":
        model = load_model(Path(args.model_dir), device, dtype)
        forward = lambda: model(ids).logits
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa")
        model = model.to(device).eval()
        forward = lambda: model(ids, use_cache=False).logits
    with torch.inference_mode():
        result = summary(timed(forward, args.repeats), ids.numel())
    result["peak_mb"] = peak_memory_mb(device)
    params = sum(p.numel() for p in model.parameters())
    result["mfu"] = 2 * params * result["per_s"] / H100_BF16_DENSE_FLOPS if device == "cuda" else None
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="270m", choices=["270m", "4b"], help="270m real weights, or 4b random bf16")
    p.add_argument("--model-dir", default=None, help="checkpoint directory (default: the embedded 270M)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--side", choices=["medko", "peer"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print(json.dumps(run(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is None:
            args.model_dir = bench_model_dir(None, args.shape, Path(tmp))
        if args.shape == "4b":
            args.seq, args.batch = max(args.seq, 2048), max(args.batch, 1)
        passed = ["--shape", args.shape, "--model-dir", args.model_dir, "--device", args.device,
                  "--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats)]
        rows = [(side, run_side(__file__, side, passed)) for side in ("medko", "peer")]
    print(f"forward, {args.shape}, batch {args.batch} x seq {args.seq}, {args.device if args.shape == '270m' else 'cuda'}")
    print_table(rows, "tokens")
    for name, r in rows:
        if r["mfu"] is not None:
            print(f"{name} MFU: {100 * r['mfu']:.1f}%")
    print(f"ratio: {rows[0][1]['per_s'] / rows[1][1]['per_s']:.2f}")


if __name__ == "__main__":
    main()
