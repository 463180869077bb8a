"""LoRA training throughput and peak memory: medko vs transformers + peft, same weights, data and settings.

    python bench/train.py                               # the 270M on CPU, float32, batch 4 x seq 256
    python bench/train.py --shape 4b                    # 4B-shaped random bf16 weights on a GPU, bf16 autocast, MFU
    python bench/train.py --shape 27b --quantize 4bit   # 27B shape, NF4 base weights (needs bitsandbytes)

NOT YET RUN ON A GPU: the --device cuda, --shape 4b/27b and --quantize paths are written but have never run.

Both sides train one adapter (rank 16, alpha 32, dropout 0) on q,k,v,o,gate,up,down of every decoder layer,
with AdamW (lr 1e-4, constant, no weight decay, no gradient clipping), float32 on CPU and bf16 autocast on
CUDA. The data is the same tensor for both: each text of --texts as BOS + text + EOS, concatenated and cut
into rows of --seq tokens (no padding; the tail that fills no row is dropped); step i takes rows
i*batch .. i*batch+batch-1, cycling. The loss is the mean next-token cross-entropy over every token of a
row but the first. Each lora_A is re-drawn from a seed named by its layer and projection, so both sides
start from the same adapter and their losses should agree at every step, not only the first.

medko: load_model, add_lora, set_trainable, make_optimizer; a step is the trainer's own
  accumulate_gradients (model(...).hidden, causal_lm_loss chunked over the vocabulary), optimizer.step().
peer:  AutoModelForCausalLM.from_pretrained(dtype, attn_implementation="sdpa"), peft get_peft_model with
  LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[...]); a step is
  model(input_ids, attention_mask, labels, use_cache=False).loss.backward(), optimizer.step().

Throughput is tokens/s: batch x seq input tokens per optimizer step over the median step time, after
--warmup untimed steps (target tokens are batch x (seq - 1)). Peak memory is that of the training steps,
loading left out (CUDA allocator peak, or RSS high-water mark on CPU). Each side runs in its own process;
the last line is `ratio: X.XX`, medko tokens/s over the peer's.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch

from common import bench_model_dir, peak_memory_mb, print_table, reset_peak_memory, run_side, summary, timed

from engine.adapters import LORA_TARGETS, add_lora, quantize_base_4bit
from engine.checkpoints import load_model, read_config
from engine.data import load_texts
from engine.losses import causal_lm_loss
from engine.model import Gemma3
from engine.tokenizer import Tokenizer
from engine.trainer import TrainConfig, accumulate_gradients, make_optimizer, set_trainable
import shared_logic as sl

H100_BF16_DENSE_FLOPS = 989e12  # dense bf16 peak of an H100 SXM; MFU is relative to this
RANK, ALPHA, LR = 16, 32.0, 1e-4


def packed_rows(tokenizer: Tokenizer, texts: list[str], seq: int) -> torch.Tensor:
    """BOS + text + EOS of every text, concatenated and cut into [rows, seq]; the tail that fills no row is dropped."""
    stream = [t for ids in tokenizer.encode_batch(texts) for t in ids + [tokenizer.eos_id]]
    rows = len(stream) // seq
    if rows == 0:
        raise SystemExit(f"the texts hold {len(stream)} tokens, fewer than one row of --seq {seq}")
    return torch.tensor(stream[:rows * seq]).view(rows, seq)


def forward_params(model_dir: Path) -> int:
    """Parameters a forward pass multiplies with (the tied head counted once), from config.json alone."""
    with torch.device("meta"):
        return sum(p.numel() for p in Gemma3(read_config(model_dir)).parameters())


def same_adapter_init(model: torch.nn.Module) -> None:
    """Re-draws every lora_A from a seed named by its layer and projection, so both sides start identically.

    Both libraries draw A Kaiming-uniform, but from the global RNG in different orders; with equal A (and
    B at zero) the two runs should track each other step for step, not only at step 1.
    """
    found = 0
    for name, param in model.named_parameters():
        match = re.search(r"layers\.(\d+)\..*\.(\w+_proj)\.lora_A\.", name)
        if match:
            seed = int(match[1]) * len(LORA_TARGETS) + LORA_TARGETS.index(match[2])
            generator = torch.Generator().manual_seed(seed)
            bound = 1 / math.sqrt(param.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [rank, in]
            with torch.no_grad():
                param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=generator))
            found += 1
    if found == 0:
        raise SystemExit("found no lora_A parameter to initialise; did the adapter names change?")


def autocast(device: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def medko_trainer(args: argparse.Namespace, device: str, dtype: torch.dtype
                  ) -> tuple[torch.nn.Module, Callable[[torch.Tensor], float]]:
    model = load_model(Path(args.model_dir), device, dtype)
    if args.quantize:
        quantize_base_4bit(model)
    add_lora(model, "lora1", rank=RANK, alpha=ALPHA, dropout=0.0, targets=LORA_TARGETS)
    set_trainable(model, sl.LORA_PATTERNS)
    same_adapter_init(model)
    optimizer = make_optimizer(model, TrainConfig(lr=LR, weight_decay=0.0))
    model.train()
    context = autocast(device)

    def loss_fn(model: Gemma3, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict]:
        hidden = model(batch["input_ids"], batch["attention_mask"], return_logits=False).hidden
        loss, count = causal_lm_loss(model, hidden, batch["input_ids"], batch["target_mask"])
        return loss, count, {}

    def step(ids: torch.Tensor) -> float:
        target_mask = torch.ones_like(ids, dtype=torch.bool)
        target_mask[:, 0] = False  # medko marks targets on the token itself; a row's first token has no prediction
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(target_mask), "target_mask": target_mask}
        loss, targets, _ = accumulate_gradients(model, loss_fn, [batch], context)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss / targets

    return model, step


def peer_trainer(args: argparse.Namespace, device: str, dtype: torch.dtype
                 ) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if args.quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kwargs)
    if not args.quantize:
        model.to(device)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    same_adapter_init(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    context = autocast(device)

    def step(ids: torch.Tensor) -> torch.Tensor:
        with context:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def run(args: argparse.Namespace) -> dict:
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = torch.load(args.rows, weights_only=True)
    order = [[(i * args.batch + j) % len(rows) for j in range(args.batch)] for i in range(args.warmup + args.steps)]
    batches = iter([rows[idx].to(device) for idx in order])
    torch.manual_seed(0)
    model, step = (medko_trainer if args.side == "medko" else peer_trainer)(args, device, dtype)
    load_peak = peak_memory_mb(device)
    reset_peak_memory(device)
    losses = []
    times = timed(lambda: losses.append(step(next(batches))), args.steps, warmup=args.warmup)
    result = summary(times, args.batch * args.seq)
    result["peak_mb"] = peak_memory_mb(device)
    result["load_peak_mb"] = load_peak
    result["losses"] = [float(loss) for loss in losses]
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="270m", choices=["270m", "4b", "27b"],
                   help="270m: real weights (--model-dir); 4b, 27b: random bf16 weights of that shape on CUDA")
    p.add_argument("--model-dir", default=None, help="checkpoint directory with tokenizer.json (default: the 270M)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="4b and 27b always use cuda")
    p.add_argument("--batch", type=int, default=4, help="rows per optimizer step")
    p.add_argument("--seq", type=int, default=256, help="tokens per row")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--texts", default=str(sl.DATA_DIR / "ko_medical_text.jsonl"), help="JSONL with a text field")
    p.add_argument("--quantize", choices=["4bit"], help="NF4 base weights on CUDA (medko quantize_base_4bit, "
                   "peer BitsAndBytesConfig nf4); needs bitsandbytes")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads per side (default: torch's default here); 1 is steadier on a busy machine")
    p.add_argument("--side", choices=["medko", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args()
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
        texts = list(load_texts(args.texts))
        rows = packed_rows(tokenizer, texts, args.seq)
        torch.save(rows, Path(tmp) / "rows.pt")
        passed = ["--model-dir", args.model_dir, "--device", args.device, "--batch", str(args.batch),
                  "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
                  "--rows", str(Path(tmp) / "rows.pt"), "--threads", str(args.threads)]
        passed += ["--quantize", args.quantize] if args.quantize else []
        results = {side: run_side(__file__, side, passed) for side in ("medko", "peer")}
        params = forward_params(Path(args.model_dir))
    precision = "bf16 autocast" if args.device == "cuda" else f"float32, {args.threads} threads"
    print(f"LoRA training (r{RANK}, alpha {ALPHA:g}, q,k,v,o,gate,up,down), {args.shape}"
          f"{' NF4' if args.quantize else ''}, batch {args.batch} x seq {args.seq}, {args.device} {precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"data: {len(rows)} packed rows of {args.seq} tokens from {len(texts)} texts of {Path(args.texts).name}, "
          f"the same batches in the same order on both sides")
    if args.device == "cuda":
        print("NOTE: this GPU path has not been run before; check the numbers with care")
    if args.shape == "27b" and not args.quantize:
        print("note: 27b in bf16 holds about 55 GB of weights before activations; --quantize 4bit loads NF4 base "
              "weights (medko quantize_base_4bit, peer bitsandbytes nf4)")
    print_table(list(results.items()), "tokens")
    medko, peer = results["medko"], results["peer"]
    print(f"peak MiB after loading, before the timed work: medko {medko['load_peak_mb']:.0f}, "
          f"peer {peer['load_peak_mb']:.0f}")
    print(f"trainable parameters: medko {medko['trainable']:,}, peer {peer['trainable']:,}")
    first = (medko["losses"][0], peer["losses"][0])
    print(f"loss at step 1: medko {first[0]:.6f}, peer {first[1]:.6f} "
          f"(relative difference {abs(first[0] - first[1]) / abs(first[1]):.1e})")
    print(f"loss at step {len(medko['losses'])}: medko {medko['losses'][-1]:.6f}, peer {peer['losses'][-1]:.6f} "
          f"(relative difference {abs(medko['losses'][-1] - peer['losses'][-1]) / abs(peer['losses'][-1]):.1e})")
    if args.device == "cuda":
        for name, r in results.items():
            print(f"{name} MFU: {100 * 6 * params * r['per_s'] / H100_BF16_DENSE_FLOPS:.1f}% "
                  f"(6 x {params / 1e9:.2f}B forward parameters x tokens/s over 989 TFLOP/s)")
    print(f"ratio: {medko['per_s'] / peer['per_s']:.2f}")


if __name__ == "__main__":
    main()
