"""bf16 numerics on a GPU: medko's Gemma 3 and transformers' Gemma3ForCausalLM, each in bf16, against the same
weights in float32 (TF32 off), on the same tokens.

    python bench/bf16_parity.py                       # 4B width, 4 layers (one of them global), seq 1024
    python bench/bf16_parity.py --shape 27b --layers 6
    python bench/bf16_parity.py --quantize 4bit       # also NF4: medko's base against bitsandbytes' Linear4bit

Random weights (norms included, so a (1 + w) slip cannot hide), cast once to bf16 so that both precisions hold the
same values. For each side it prints the relative error of the last-position logits and of all logits,
‖bf16 − fp32‖ / ‖fp32‖, and the share of positions whose argmax agrees with the float32 reference; medko's float32
against transformers' float32 is printed too (float32 rounding only). The last line is `ratio:` medko's bf16 error
over transformers' bf16 error: about 1 means medko rounds no worse than the reference implementation.

--quantize 4bit then stores both bf16 models' q, k, v, o, gate, up and down projections in NF4 with double
quantization (medko: quantize_base_4bit; transformers: those nn.Linear replaced by bitsandbytes' Linear4bit, what
BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) loads), prints
their rows and medko NF4 against transformers NF4, and the ratio is then medko's NF4 error over transformers'.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import hf_twin, randomize  # noqa: E402
from engine.adapters import LORA_TARGETS, quantize_base_4bit  # noqa: E402
from engine.model import PRESETS, Gemma3  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bnb_nf4(hf: torch.nn.Module) -> None:
    """transformers' decoder projections as bitsandbytes Linear4bit (NF4, double quantization) of the same weights."""
    import bitsandbytes as bnb

    for layer in hf.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if name in LORA_TARGETS and isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
                    setattr(parent, name, q.to(child.weight.device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4b", choices=["270m", "4b", "27b"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768, help="embedding rows (the real 262k only costs memory)")
    p.add_argument("--device", default="cuda", help="cpu only to smoke-test the script")
    p.add_argument("--quantize", choices=["4bit"], help="also NF4 base projections on both sides (bitsandbytes)")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    base = PRESETS[args.shape]
    kinds = ["sliding_attention"] * (args.layers - 1) + ["full_attention"]
    config = replace(base, num_layers=args.layers, layer_types=tuple(kinds), vocab_size=args.vocab)
    torch.manual_seed(0)
    model = randomize(Gemma3(config)).eval()
    with torch.no_grad():  # bf16 values in both precisions
        for t in model.parameters():
            t.copy_(t.to(torch.bfloat16).float())
    hf = hf_twin(model)
    ids = torch.randint(3, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(1)).to(device)
    rows = []
    with torch.no_grad():
        ref = hf.to(device).float()(ids).logits.float()
        medko32 = model.to(device).float()(ids).logits.float()
        rows.append(("medko float32", rel(medko32[:, -1], ref[:, -1]), rel(medko32, ref),
                     float((medko32.argmax(-1) == ref.argmax(-1)).float().mean())))
        del medko32
        medko16 = model.to(torch.bfloat16)(ids).logits.float()
        hf16 = hf.to(torch.bfloat16)(ids).logits.float()
        sides = [("medko bf16", medko16), ("transformers bf16", hf16)]
        if args.quantize:
            quantize_base_4bit(model)
            bnb_nf4(hf)
            sides += [("medko nf4", model(ids).logits.float()), ("transformers nf4", hf(ids).logits.float())]
    for name, out in sides:
        rows.append((name, rel(out[:, -1], ref[:, -1]), rel(out, ref), float((out.argmax(-1) == ref.argmax(-1)).float().mean())))
    if args.quantize:  # medko's NF4 against bitsandbytes' own, rather than against float32
        medko4, hf4 = sides[2][1], sides[3][1]
        rows.append(("medko nf4 vs tf nf4", rel(medko4[:, -1], hf4[:, -1]), rel(medko4, hf4),
                     float((medko4.argmax(-1) == hf4.argmax(-1)).float().mean())))
    print(f"{args.shape} width, {args.layers} layers ({kinds.count('full_attention')} global), seq {args.seq}, "
          f"vocab {args.vocab}; reference: transformers float32 (eager attention), TF32 off, on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print(f"{'side':<20} {'rel err last':>13} {'rel err all':>12} {'argmax agree':>13}")
    for name, last, every, agree in rows:
        print(f"{name:<20} {last:>13.2e} {every:>12.2e} {agree:>13.4f}")
    first = 3 if args.quantize else 1  # the rows whose errors the ratio compares
    print(f"ratio: {rows[first][2] / rows[first + 1][2]:.2f}")


if __name__ == "__main__":
    main()
