"""Checks the memory plan (engine/plan.py) against measured peak RSS on this CPU, or peak CUDA memory on a GPU.

For the real 270M and for 4B- and 27B-width random models at reduced depth, each case in a fresh process:
(a) one s3 training step (lora1 + language vectors trained, Korean CE and the English per-layer MSE against the
teacher, AdamW, whose states exist before it as they do from the second step on), and (b) one logits-mode
evaluation batch. Every row is full: max_len random tokens, as the plan assumes. Measured is the high-water mark
of the resident set over the step (reset through /proc/self/clear_refs once the model is built, so loading's
transients are left out) minus the resident set after the imports and the tokenizer; it holds the weights, glibc's
retained heap and oneDNN's buffers as well as the tensors the plan counts.

    python bench/plan_check.py                          # every case, one at a time (about 12 GB at the 27B width)
    python bench/plan_check.py --case 270m:18:s3:2:512   # size:layers:work:rows:tokens[:embedding rows]
    python bench/plan_check.py --device cuda [--quantize]  # on a GPU: bf16 under autocast (NF4 base), full depth

On CUDA the model is built in bf16 on the GPU with random weights at the preset's full depth and vocabulary, and
measured is torch.cuda.max_memory_allocated over the step (weights, additions and optimizer states included, as in
the plan's estimate; the CUDA context is outside PyTorch's allocator and outside both numbers).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20
sys.path.insert(0, str(ROOT))

# size:layers:work:rows:tokens. The 270M runs at its defaults (2 x 512 tokens per micro-batch, 16 prompts of 512
# per evaluation batch); the wider models at fewer rows and tokens, since two cores take minutes per step there.
# The 27B width runs one layer over a 32k-row embedding: its 262k rows alone are 5.6 GB of float32, and two layers
# with them were killed for memory on the shared 23 GB machine (the embedding is base weights, counted exactly).
CASES = ["270m:18:s3:2:512", "270m:18:eval:16:512", "4b:2:s3:1:512", "4b:2:eval:8:512", "27b:1:s3:1:256:32768",
         "27b:1:eval:4:256:32768"]
# On a GPU every preset runs whole: the 4B at the plan's fit for an 80 GB card, the 27B at one row.
CUDA_CASES = ["4b:34:s3:4:512", "4b:34:eval:16:512", "27b:62:s3:1:512", "27b:62:eval:8:512"]


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def trim() -> None:
    """Frees Python's garbage and hands glibc's free heap memory back, so the resident set holds live memory."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def case_config(size: str, layers: int, vocab: str | None = None):
    """The real 270M's config at its own depth, else the preset's width at `layers` layers (and `vocab` rows)."""
    from engine.checkpoints import read_config, resolve_model_dir
    from engine.model import PRESETS

    if size == "270m" and layers == PRESETS["270m"].num_layers:
        return read_config(resolve_model_dir("270m"))
    if layers == PRESETS[size].num_layers and not vocab:
        return PRESETS[size]  # whole: its own pattern of sliding and global layers
    rows = int(vocab) if vocab else PRESETS[size].vocab_size
    return replace(PRESETS[size], num_layers=layers, layer_types=(), vocab_size=rows)


def estimated(case: str, device: str = "cpu", quantize: bool = False) -> tuple[int, dict[str, int]]:
    """The plan's estimate for a case, and its parts: an s3 step's training peak, or an evaluation batch's logits
    scoring above the base (s1 holds no additions)."""
    from engine.plan import WORK, Setup, estimate, logits_scoring_bytes

    size, layers, work, rows, tokens, *vocab = case.split(":")
    config = case_config(size, int(layers), *vocab)
    setup = Setup(device=device, batch=int(rows), max_len=int(tokens), quantize=quantize)
    if work == "s3":
        found = estimate(config, WORK["s3"], setup)
        return found.training, {"base": found.base, "train+opt": found.trainable, "act": found.activations,
                                "transient": found.transient, "teacher": found.teacher, "cpu allocator": found.allocator}
    base, logits = estimate(config, WORK["s1"], setup).base, logits_scoring_bytes(config, setup, int(rows))
    return base + logits, {"base": base, "eval": logits}


def measure(case: str, device: str = "cpu", quantize: bool = False) -> float:
    """One case in this process: the peak resident set of the step above the baseline, in bytes; on CUDA the peak
    of PyTorch's allocated memory over the step."""
    import contextlib

    import torch

    import shared_logic as sl
    from engine.adapters import (
        LanguageEmbedding,
        add_language_embeddings,
        add_lora,
        korean_token_table,
        quantize_base_4bit,
        snapshot_adapter,
    )
    from engine.embedded_270m import default_270m_dir
    from engine.checkpoints import load_model, resolve_model_dir
    from engine.model import PRESETS, Gemma3
    from engine.tokenizer import Tokenizer
    from engine.trainer import (
        TrainConfig,
        accumulate_gradients,
        make_optimizer,
        set_trainable,
    )

    size, layers, work, rows, tokens, *vocab = case.split(":")
    rows, tokens = int(rows), int(tokens)
    torch.manual_seed(0)
    # The tokenizer (about 100 MiB resident for Gemma's 262k-token vocabulary) is not the model's memory: it is
    # loaded before the baseline.
    cuda = device == "cuda"
    tokenizer = Tokenizer((default_270m_dir() if cuda else resolve_model_dir("270m")) / "tokenizer.json")
    korean_token_table(tokenizer)
    trim()  # what loading the tokenizer freed leaves the resident set before the baseline, not during the step
    baseline = rss_kib("VmRSS")
    if cuda:  # random bf16 weights made on the GPU: the 27B in float32 on the host would be 108 GB
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = Gemma3(case_config(size, int(layers), *vocab)).requires_grad_(False)
        torch.set_default_dtype(torch.float32)
        if quantize:
            quantize_base_4bit(model)
        torch.cuda.empty_cache()  # quantizing's dense copies are gone: the caching allocator holds no free blocks
    elif size == "270m" and int(layers) == PRESETS["270m"].num_layers:
        model = load_model(resolve_model_dir("270m"), "cpu")
    else:
        model = Gemma3(case_config(size, int(layers), *vocab)).requires_grad_(False)
    generator = torch.Generator().manual_seed(0)

    def batch(prefix: str = "") -> dict[str, torch.Tensor]:
        ids = torch.randint(3, min(tokenizer.vocab_size, model.config.vocab_size), (rows, tokens), generator=generator)
        targets = torch.ones(rows, tokens, dtype=torch.bool)
        targets[:, 0] = False
        return {f"{prefix}input_ids": ids.to(device), f"{prefix}target_mask": targets.to(device),
                f"{prefix}attention_mask": torch.ones(rows, tokens, dtype=torch.long, device=device)}

    if work == "s3":
        add_lora(model, "lora1", rank=16)
        snapshot_adapter(model, "lora1", "teacher")
        if vocab:  # fewer rows than the tokenizer has tokens: the same two vectors, every row English
            model.language_embedding = LanguageEmbedding(torch.zeros(int(vocab[0]), dtype=torch.bool),
                                                         model.config.hidden_size, False, torch.float32, device)
        else:
            add_language_embeddings(model, tokenizer)
        set_trainable(model, sl.LANGUAGE_PATTERNS + sl.LORA_PATTERNS)
        optimizer = make_optimizer(model, TrainConfig(batch_size=rows, max_len=tokens, device=device))
        trained = [p for p in model.parameters() if p.requires_grad]
        for p in trained:  # a step on zero gradients makes AdamW's states and changes nothing, as after step 1
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step = {**batch(), **batch("en_")}
        model.train()
    else:
        model.eval()
        step = batch()
        letters = torch.arange(3, 8, device=device)  # any five ids: only their five logits are made
    trim()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts at the current resident set
    if work == "s3":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        accumulate_gradients(model, sl.stage_loss("mse", 1.0), [step], autocast)
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            hidden = model(step["input_ids"], step["attention_mask"].bool(), return_logits=False).hidden[:, -1]
            model.logits(hidden, letters)
    if cuda:
        torch.cuda.synchronize()
        print(f"{case}: the caching allocator's reserved peak {torch.cuda.max_memory_reserved() / MIB:.0f} MiB",
              file=sys.stderr)
        return torch.cuda.max_memory_allocated()
    return (rss_kib("VmHWM") - baseline) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default=None, help="size:layers:work:rows:tokens (work s3 or eval); every case by "
                                                      "default")
    parser.add_argument("--save", default=None, help="also write the measurements to this JSON file")
    parser.add_argument("--load", default=None, help="print the table for measurements saved by --save")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: bf16 on one GPU")
    parser.add_argument("--quantize", action="store_true", help="NF4 base projections (CUDA with bitsandbytes)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quantize and args.device != "cuda":
        parser.error("--quantize needs --device cuda")
    if args.inside:
        print(json.dumps({"case": args.case, "measured": measure(args.case, args.device, args.quantize)}))
        return
    if args.load:
        measured = json.loads(Path(args.load).read_text())
    else:
        measured = {}
        flags = ["--device", args.device] + (["--quantize"] if args.quantize else [])
        for case in [args.case] if args.case else CUDA_CASES if args.device == "cuda" else CASES:
            out = subprocess.run([sys.executable, __file__, "--case", case, "--inside", *flags], capture_output=True,
                                 text=True, check=False)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"{case} failed")
            sys.stderr.write("".join(line + "\n" for line in out.stderr.splitlines() if "reserved peak" in line))
            measured[case] = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
            print(f"{case}: measured {measured[case] / MIB:.0f} MiB", file=sys.stderr)
            if args.save:
                Path(args.save).write_text(json.dumps(measured, indent=1))
    print(f"{'model':<7}{'work':<6}{'width x depth':>14}{'rows x tokens':>15}{'estimated MiB':>15}{'measured MiB':>14}"
          f"{'error':>8}  estimated parts (MiB)")
    for case, value in measured.items():
        size, layers, work, rows, tokens, *vocab = case.split(":")
        total, parts = estimated(case, args.device, args.quantize)
        width = case_config(size, int(layers), *vocab).hidden_size
        print(f"{size:<7}{work:<6}{width:>8} x {layers:<3}{rows:>9} x {tokens:<4}{total / MIB:>14.0f}"
              f"{value / MIB:>14.0f}{(total - value) / value:>8.1%}  "
              + ", ".join(f"{k} {v / MIB:.0f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
