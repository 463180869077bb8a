"""A candidate transfer objective, tried on dev only: train the model's Korean cloze answers toward its own English
answers to the same questions.

    python bench/answer_transfer.py                     # the 270M, the bundled train exam, 3 epochs
    python bench/answer_transfer.py --epochs 1 --limit 16

For each Korean train question the frozen base scores the English version of the question in cloze (per-character
log-probability of each option, acc_norm's score); LoRA lora1 (the curriculum's rank, alpha and targets) is trained
so that softmax(Korean scores / tau) matches softmax(English scores / tau) (KL, no gold answers). If the model can
carry what it knows in English over to Korean, Korean dev accuracy should rise, most of all on the questions whose
answer no Korean training text holds. Korean and English dev cloze are scored before and after, with McNemar on the
change; the test split is never read. JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shared_logic as sl  # noqa: E402
from engine.checkpoints import load_base  # noqa: E402
from engine.cloze import encode_question  # noqa: E402
from engine.data import KORMEDMCQA_SUBSETS, load_kormedmcqa, load_pairs, load_reasoning, load_texts  # noqa: E402
from engine.sources import LOCAL_FILES  # noqa: E402
from engine.stats import accuracy_summary, mcnemar  # noqa: E402
from engine.trainer import set_trainable  # noqa: E402

DATA = ROOT / "data"


def exam(split: str, lang: str) -> list:
    source = DATA / ("kormedmcqa" if lang == "ko" else "kormedmcqa_en")
    return list(load_kormedmcqa(KORMEDMCQA_SUBSETS, split, source, lang=lang))


def option_scores(model, tokenizer, row, lang: str) -> torch.Tensor:
    """Each option's summed log-probability per character (acc_norm's score), with gradients: the options as five
    whole rows (prompt + option), the head applied to the option positions only."""
    e = encode_question(tokenizer, row, lang)
    seqs = [e.context + o for o in e.options]
    ids = torch.full((len(seqs), max(map(len, seqs))), tokenizer.pad_id, dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, :len(s)] = torch.tensor(s)
    hidden = model(ids, ids != tokenizer.pad_id, return_logits=False).hidden
    n = len(e.context)
    scores = [F.log_softmax(model.logits(hidden[j, n - 1:n - 1 + len(o)]).float(), -1)
              .gather(1, torch.tensor(o)[:, None]).sum() / e.chars[j] for j, o in enumerate(e.options)]
    return torch.stack(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-4, help="peak rate, decayed linearly to 0")
    parser.add_argument("--tau", type=float, default=0.1, help="temperature on the per-character scores")
    parser.add_argument("--accum", type=int, default=4, help="questions per optimizer step")
    parser.add_argument("--limit", type=int, default=None, help="the first N train questions only")
    parser.add_argument("--out", type=Path, default=Path("answer_transfer.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    model, tokenizer, _ = load_base("270m")
    train = {lang: sl.limited(exam("train", lang), args.limit) for lang in ("ko", "en")}
    dev = {lang: exam("dev", lang) for lang in ("ko", "en")}
    korean = sl.korean_training_text(load_texts(DATA / LOCAL_FILES["ko_text"]),
                                     load_pairs(DATA / LOCAL_FILES["pairs"]),
                                     load_reasoning(DATA / LOCAL_FILES["reasoning"]), exam("train", "ko"))
    unseen = sl.unseen_answers(dev["ko"], korean)  # as s0 finds them

    def score(tag: str) -> dict:
        model.eval()
        correct = {lang: [p["correct"] for p in sl.evaluate(model, tokenizer, rows, "cloze", lang).predictions]
                   for lang, rows in dev.items()}
        correct["ko_unseen"] = [correct["ko"][i] for i in unseen]
        print(f"{tag}: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in correct.items()), flush=True)
        return correct

    before = score("before")
    model.eval()
    with torch.no_grad():
        english = [option_scores(model, tokenizer, row, "en") for row in tqdm(train["en"], desc="teacher (English)")]
    # The scores trained on are the evaluator's: the same per-character score of every option, to float32 rounding.
    reference = sl.evaluate(model, tokenizer, train["en"], "cloze", "en", progress=False).predictions
    worst = max(abs(a - b) for mine, ref in zip(english, reference)
                for a, b in zip(mine.tolist(), ref["scores"]["per_char"]))
    print(f"teacher: English train {sum(p['correct'] for p in reference)}/{len(reference)}; largest difference "
          f"from the evaluator's per-character scores {worst:.1e}", flush=True)
    if worst > 1e-3:
        sys.exit(f"option_scores differs from engine.cloze by {worst:.1e}; the bench would train on other scores")
    teacher = [F.softmax(e / args.tau, -1) for e in english]
    sl.add_lora(model, "lora1", rank=16, alpha=32.0)
    set_trainable(model, sl.LORA_PATTERNS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    total = args.epochs * len(train["ko"]) // args.accum
    model.train()
    step, losses = 0, []
    for epoch in range(args.epochs):
        order = list(range(len(train["ko"])))
        rng.shuffle(order)
        epoch_losses = []
        for k, i in enumerate(tqdm(order, desc=f"epoch {epoch + 1}")):
            log_q = F.log_softmax(option_scores(model, tokenizer, train["ko"][i], "ko") / args.tau, -1)
            p = teacher[i]
            loss = (p * (p.clamp_min(1e-12).log() - log_q)).sum()
            (loss / args.accum).backward()
            epoch_losses.append(loss.item())
            if (k + 1) % args.accum == 0:
                for group in optimizer.param_groups:
                    group["lr"] = args.lr * (1 - step / total)
                optimizer.step()
                optimizer.zero_grad()
                step += 1
        losses.append(sum(epoch_losses) / len(epoch_losses))
        print(f"epoch {epoch + 1}: mean KL {losses[-1]:.4f}", flush=True)
    after = score("after")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "epoch_kl": losses, "changes": {}}
    for key in before:
        s, m = accuracy_summary(after[key]), mcnemar(before[key], after[key])
        result["changes"][key] = {"before": sum(before[key]), "after": sum(after[key]), "n": len(before[key]),
                                  "after_interval": [s["low"], s["high"]], "gained": m["gained"],
                                  "lost": m["lost"], "p": m["p"]}
        print(f"{key}: {sum(before[key])} -> {sum(after[key])} of {len(before[key])} "
              f"(McNemar +{m['gained']}/-{m['lost']}, p {m['p']:.3g})")
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
