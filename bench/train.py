"""LoRA training throughput and peak memory: medko vs transformers + peft, same weights, examples and settings.

    python bench/train.py                               # packed rows: the 270M on CPU, float32, batch 4 x seq 256
    python bench/train.py --workload exam               # KorMedMCQA-shaped SFT: prompt masked, the answer learned
    python bench/train.py --workload s3                 # one s3 step: Korean CE + English per-layer loss vs teacher
    python bench/train.py --shape 4b                    # 4B-shaped random bf16 weights on a GPU, bf16 autocast, MFU
    python bench/train.py --shape 27b --quantize 4bit   # 27B shape, NF4 base weights (needs bitsandbytes)

On a GPU only --shape 4b has run (one H200, torch 2.11, transformers 5.17, peft 0.21, 2026-11-30: rows 1.14,
exam 1.22, s3 1.10; with --quantize 4bit and bitsandbytes 0.50.2, rows 1.19 over 6 steps, 0.92 over 3; rows 0.81
over 6 steps and 1.17 over 20 on 2026-12-04, where --profile showed the GPU busy 14-19% of a step: the host sets
the pace, so these ratios move with it); --shape 27b has never run (bench/gpu_shape.py times medko alone there).

Both sides train one adapter (rank 16, alpha 32, dropout 0) on q,k,v,o,gate,up,down of every decoder layer, with
AdamW (lr 1e-4, constant, no weight decay, no gradient clipping), float32 on CPU and bf16 autocast on CUDA (see
bench/train_sides.py). Each lora_A is re-drawn from a seed named by its layer and projection, so both sides start
from the same adapter and their losses should agree at every step, not only the first. Both get the same examples
in the same order: step i takes examples i*batch .. i*batch+batch-1 of the workload's list, cycling.

Workloads (--workload):
  rows  each text of --texts as BOS + text + EOS, concatenated and cut into rows of --seq tokens (the tail that
        fills no row is dropped), every token but a row's first a target: no padding anywhere, the peer's best case.
  exam  medko's own exam_examples (s1.1's exam rows: the harness prompt masked, " X" and EOS learned) of the bundled
        Korean and English train exams, shuffled with seed 0; --batch examples a step, at most --max-len tokens.
  s3    s3's step: Korean medical texts (every token a target) for the cross-entropy, and as many English medical
        texts whose hidden states the per-layer loss (mse, weight --layer-weight) holds to the frozen teacher;
        medko's stage_loss with teacher_mode, the peer's teacher pass under peft's disable_adapter(). Both train the
        LoRA only (a real s3 also trains the zero-initialised language embeddings, an addition to the input).

medko: load_model, add_lora, set_trainable, make_optimizer; a step packs the examples into rows of --max-len
  (trainer.pack: attention kept inside each example) and runs the trainer's accumulate_gradients with the stages'
  loss (shared_logic.stage_loss), then optimizer.step().
peer:  AutoModelForCausalLM.from_pretrained(dtype, attn_implementation="sdpa"), peft get_peft_model with
  LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[...]); a step right-pads the examples to the
  longest (labels -100 on prompt and padding, as transformers' collators do) and runs
  model(input_ids, attention_mask, labels, use_cache=False).loss.backward(), optimizer.step().

Throughput is tokens/s (the examples' real tokens, padding left out, per optimizer step over the median step time)
and examples/s, after --warmup untimed steps. Peak memory is that of the training steps, loading left out (CUDA
allocator peak, or RSS high-water mark on CPU). Each side runs in its own process; the last line is `ratio: X.XX`,
medko tokens/s over the peer's.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch

from common import bench_model_dir, peak_memory_mb, print_table, reset_peak_memory, run_side, summary, timed
from train_sides import ALPHA, RANK, Chunk, medko_trainer, peer_trainer

from engine.data import KORMEDMCQA_SUBSETS, load_kormedmcqa, load_texts
from engine.checkpoints import read_config
from engine.model import Gemma3
from engine.tokenizer import Tokenizer
from engine.examples import Example, text_examples
import shared_logic as sl

H100_BF16_DENSE_FLOPS = 989e12  # dense bf16 peak of an H100 SXM; MFU is relative to this


def packed_rows(tokenizer: Tokenizer, texts: list[str], seq: int) -> list[Example]:
    """BOS + text + EOS of every text, concatenated and cut into rows of seq tokens (the tail that fills no row is
    dropped), each an example whose every token but the first is a target."""
    stream = [t for ids in tokenizer.encode_batch(texts) for t in ids + [tokenizer.eos_id]]
    rows = len(stream) // seq
    if rows == 0:
        raise SystemExit(f"the texts hold {len(stream)} tokens, fewer than one row of --seq {seq}")
    return [Example(stream[r * seq:(r + 1) * seq], [False] + [True] * (seq - 1)) for r in range(rows)]


def shuffled(examples: list[Example]) -> list[Example]:
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    return [examples[i] for i in order]


def workload(args: argparse.Namespace, tokenizer: Tokenizer) -> tuple[dict[str, list[Example]], str]:
    """The workload's example lists ("main", and "english" for s3) and a line saying what they are."""
    if args.workload == "rows":
        texts = list(load_texts(args.texts))
        rows = packed_rows(tokenizer, texts, args.seq)
        described = f"{len(rows)} packed rows of {args.seq} tokens from {len(texts)} texts of {Path(args.texts).name}"
        return {"main": rows}, described
    if args.workload == "exam":
        sources = (("kormedmcqa", "ko"), ("kormedmcqa_en", "en"))
        exams = [sl.exam_examples(tokenizer, load_kormedmcqa(KORMEDMCQA_SUBSETS, "train", sl.DATA_DIR / source, lang),
                                  lang, args.max_len) for source, lang in sources]
        return {"main": shuffled(exams[0] + exams[1])}, \
            f"exam_examples of the bundled train exams, {len(exams[0])} Korean and {len(exams[1])} English"
    korean = text_examples(tokenizer, list(load_texts(sl.DATA_DIR / "ko_medical_text.jsonl")), args.max_len)
    english = text_examples(tokenizer, list(load_texts(sl.DATA_DIR / "en_medical_text.jsonl")), args.max_len)
    return {"main": shuffled(korean), "english": shuffled(english)}, \
        f"{len(korean)} Korean and {len(english)} English medical texts (text_examples, as s3 builds them)"


def chunks(examples: dict[str, list[Example]], batch: int, steps: int) -> list[Chunk]:
    """Step i's examples: i*batch .. i*batch+batch-1 of each list, cycling."""
    return [{name: [part[(i * batch + j) % len(part)] for j in range(batch)] for name, part in examples.items()}
            for i in range(steps)]


def length_line(name: str, part: list[Example]) -> str:
    sizes = sorted(len(e.ids) for e in part)
    return (f"{name}: {len(part)} examples, tokens min {sizes[0]}, median {sizes[len(sizes) // 2]}, max {sizes[-1]}; "
            f"targets per example {sum(sum(e.target_mask) for e in part) / len(part):.1f}")


def forward_params(model_dir: Path) -> int:
    """Parameters a forward pass multiplies with (the tied head counted once), from config.json alone."""
    with torch.device("meta"):
        return sum(p.numel() for p in Gemma3(read_config(model_dir)).parameters())


def run(args: argparse.Namespace) -> dict:
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    saved = json.loads(Path(args.examples).read_text())
    steps = [{name: [Example(ids, mask) for ids, mask in part] for name, part in chunk.items()} for chunk in saved]
    batches = iter(steps)
    torch.manual_seed(0)
    model, step = (medko_trainer if args.side == "medko" else peer_trainer)(args, device, dtype)
    load_peak = peak_memory_mb(device)
    reset_peak_memory(device)
    metrics = []
    times = timed(lambda: metrics.append(step(next(batches))), args.steps, warmup=args.warmup)
    timed_steps = steps[args.warmup:]
    tokens = sum(len(e.ids) for chunk in timed_steps for part in chunk.values() for e in part) / len(timed_steps)
    result = summary(times, tokens)
    result["examples_per_s"] = args.batch / result["median_s"]
    result["peak_mb"] = peak_memory_mb(device)
    result["load_peak_mb"] = load_peak
    result["metrics"] = metrics
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.profile:
        result["profile"] = profiled(step, timed_steps[:3], device, args.profile)
    return result


def profiled(step, chunks: list, device: str, rows: int) -> dict:
    """The busiest kernels of a few more steps under torch.profiler, and how much of the steps' wall time the
    device was busy (a low share: the host, launching kernels one by one, sets the pace)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for chunk in chunks:
            step(chunk)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    busy = sum(getattr(e, key, 0) for e in averages if e.device_type.name == ("CUDA" if device == "cuda" else "CPU"))
    table = averages.table(sort_by=key, row_limit=rows, max_name_column_width=60)
    return {"steps": len(chunks), "wall_s": wall, "device_busy_s": busy / 1e6, "table": table}


def compare(results: dict[str, dict], key: str, step: int) -> str:
    medko, peer = (results[side]["metrics"][step][key] for side in ("medko", "peer"))
    difference = abs(medko - peer) / max(abs(peer), 1e-12)
    return f"{key} medko {medko:.6f}, peer {peer:.6f} (relative difference {difference:.1e})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="rows", choices=["rows", "exam", "s3"], help="see above")
    p.add_argument("--shape", default="270m", choices=["270m", "4b", "27b"],
                   help="270m: real weights (--model-dir); 4b, 27b: random bf16 weights of that shape on CUDA")
    p.add_argument("--model-dir", default=None, help="checkpoint directory with tokenizer.json (default: the 270M)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="4b and 27b always use cuda")
    p.add_argument("--batch", type=int, default=None, help="rows (rows) or examples (exam, s3: of each language) "
                   "per optimizer step; default 4 for rows, 8 otherwise")
    p.add_argument("--seq", type=int, default=256, help="tokens per row (rows)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per example and per packed row (exam, s3), "
                   "the stages' default")
    p.add_argument("--layer-weight", type=float, default=10.0, help="weight of the per-layer loss (s3's default)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--texts", default=str(sl.DATA_DIR / "ko_medical_text.jsonl"), help="JSONL with a text field (rows)")
    p.add_argument("--quantize", choices=["4bit"], help="NF4 base weights on CUDA (medko quantize_base_4bit, "
                   "peer BitsAndBytesConfig nf4); needs bitsandbytes")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads per side (default: torch's default here); 1 is steadier on a busy machine")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="after the timed steps, 3 more under "
                   "torch.profiler: each side's N busiest kernels and the device's busy share of the wall time")
    p.add_argument("--side", choices=["medko", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--examples", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batch = args.batch or (4 if args.workload == "rows" else 8)
    if args.workload == "rows":
        args.max_len = args.seq  # each row is one example of exactly seq tokens
    if args.side:
        torch.set_num_threads(args.threads)
        print(json.dumps(run(args)))
        return
    if args.shape != "270m":
        args.device = "cuda"
    if args.quantize and args.device != "cuda":
        p.error("--quantize 4bit needs --device cuda (or --shape 4b/27b)")
    if args.quantize and importlib.util.find_spec("bitsandbytes") is None:
        print("bitsandbytes is not installed, so --quantize 4bit cannot run; skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.model_dir = bench_model_dir(args.model_dir, args.shape, Path(tmp))
        tokenizer = Tokenizer(Path(args.model_dir) / "tokenizer.json")
        examples, described = workload(args, tokenizer)
        steps = chunks(examples, args.batch, args.warmup + args.steps)
        saved = [{name: [[list(e.ids), list(e.target_mask)] for e in part] for name, part in chunk.items()}
                 for chunk in steps]  # examples hold arrays, which json does not write
        (Path(tmp) / "examples.json").write_text(json.dumps(saved))
        passed = ["--workload", args.workload, "--model-dir", args.model_dir, "--device", args.device,
                  "--batch", str(args.batch), "--seq", str(args.seq), "--max-len", str(args.max_len),
                  "--layer-weight", str(args.layer_weight), "--steps", str(args.steps), "--warmup", str(args.warmup),
                  "--examples", str(Path(tmp) / "examples.json"), "--threads", str(args.threads)]
        passed += ["--quantize", args.quantize] if args.quantize else []
        passed += ["--profile", str(args.profile)] if args.profile else []
        results = {side: run_side(__file__, side, passed) for side in ("medko", "peer")}
        params = forward_params(Path(args.model_dir))
    precision = "bf16 autocast" if args.device == "cuda" else f"float32, {args.threads} threads"
    print(f"LoRA training (r{RANK}, alpha {ALPHA:g}, q,k,v,o,gate,up,down), workload {args.workload}, {args.shape}"
          f"{' NF4' if args.quantize else ''}, batch {args.batch}, {args.device} {precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"data: {described}; the same examples in the same order on both sides")
    for name, part in examples.items():
        print(length_line(name, part))
    timed_steps = steps[args.warmup:]
    parts = [part for chunk in timed_steps for part in chunk.values()]
    print(f"tokens per step: {sum(len(e.ids) for part in parts for e in part) / len(timed_steps):.0f} real, "
          f"{sum(len(part) * max(len(e.ids) for e in part) for part in parts) / len(timed_steps):.0f} "
          f"in the peer's padded batches")
    if args.device == "cuda":
        print("NOTE: this GPU path has run once, at --shape 4b on one H200; check the numbers with care")
    if args.shape == "27b" and not args.quantize:
        print("note: 27b in bf16 holds about 55 GB of weights before activations; --quantize 4bit loads NF4 base "
              "weights (medko quantize_base_4bit, peer bitsandbytes nf4)")
    print_table(list(results.items()), "tokens")
    medko, peer = results["medko"], results["peer"]
    print(f"examples/s: medko {medko['examples_per_s']:.2f}, peer {peer['examples_per_s']:.2f}")
    print(f"peak MiB after loading, before the timed work: medko {medko['load_peak_mb']:.0f}, "
          f"peer {peer['load_peak_mb']:.0f}")
    print(f"trainable parameters: medko {medko['trainable']:,}, peer {peer['trainable']:,}")
    for step in (0, len(medko["metrics"]) - 1):
        print(f"step {step + 1}: " + "; ".join(compare(results, key, step) for key in medko["metrics"][step]))
    if args.device == "cuda":
        for name, r in results.items():
            print(f"{name} MFU: {100 * 6 * params * r['per_s'] / H100_BF16_DENSE_FLOPS:.1f}% "
                  f"(6 x {params / 1e9:.2f}B forward parameters x tokens/s over 989 TFLOP/s)")
    for name, r in results.items():
        if "profile" in r:
            prof = r["profile"]
            print(f"{name} profile: {prof['steps']} steps in {prof['wall_s']:.3f} s wall, device busy "
                  f"{prof['device_busy_s']:.3f} s ({100 * prof['device_busy_s'] / prof['wall_s']:.0f}%)")
            print(prof["table"])
    print(f"ratio: {medko['per_s'] / peer['per_s']:.2f}")


if __name__ == "__main__":
    main()
