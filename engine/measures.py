"""Per-text measurements on held-out text, so that a before → after change gets an interval over texts: the
next-token loss of each text, and English drift, the KL divergence of the model's next-token distribution
from its teacher's, per text. Both run in bounded batches: a few texts per forward, every target of the batch in
one walk of the loss's head in vocabulary slices, and the drift's [positions x vocab] logits in bounded chunks of
positions from all the batch's texts. Reading the 262k-row head once per batch rather than once per text is what
keeps measurement affordable on a CPU.

Under torchrun each rank measures its share of the texts and the values are gathered in order.

Imports engine.adapters, engine.distributed, engine.fit, engine.losses, engine.model, engine.tokenizer and
engine.trainer.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from engine import distributed
from engine.adapters import is_teacher, teacher_mode
from engine.data import MCQ, Pair
from engine.evaluate import TRANSLATION_MARGIN, evaluate, translation_prompt
from engine.fit import rows_that_fit
from engine.generate import generate
from engine.losses import token_losses
from engine.model import Gemma3, model_device
from engine.stats import chrf, mean, sentence_chrf
from engine.tokenizer import Tokenizer
from engine.examples import collate, text_examples


def _batches(model: Gemma3, tokenizer: Tokenizer, texts: Sequence[str], max_len: int, batch_size: int):
    """Collated batches of the texts on the model's device, `batch_size` at once or what the memory plan fits."""
    examples = text_examples(tokenizer, texts, max_len)
    if len(examples) != len(texts):
        raise ValueError(f"{len(texts) - len(examples)} of {len(texts)} texts have no token to measure")
    device = model_device(model)
    batch_size = rows_that_fit(model, "measures", batch_size, max((len(e.ids) for e in examples), default=1))
    for start in range(0, len(examples), batch_size):
        yield {k: v.to(device) for k, v in collate(examples[start:start + batch_size]).items()}


def _per_text(values: torch.Tensor, rows: torch.Tensor, texts: int) -> list[float]:
    """Mean of the values belonging to each of `texts` rows (0.0 for a row with none), in row order."""
    sums = torch.zeros(texts, dtype=torch.float64, device=values.device).index_add_(0, rows, values.double())
    return (sums / torch.bincount(rows, minlength=texts).clamp(min=1)).tolist()


@torch.no_grad()
def text_losses(model: Gemma3, tokenizer: Tokenizer, texts: Sequence[str], max_len: int,
                batch_size: int = 16) -> list[float]:
    """Mean next-token cross-entropy per target token of each text, in input order."""
    return distributed.split_work(lambda part: _text_losses(model, tokenizer, part, max_len, batch_size), texts, model)


def _text_losses(model: Gemma3, tokenizer: Tokenizer, texts: Sequence[str], max_len: int, batch_size: int
                 ) -> list[float]:
    out = []
    for batch in _batches(model, tokenizer, texts, max_len, batch_size):
        ids, targets = batch["input_ids"], batch["target_mask"]
        hidden = model(ids, batch["attention_mask"], return_logits=False).hidden
        out += _per_text(*token_losses(model, hidden, ids, targets), len(ids))
    return out


def _spread(length: int, count: int) -> torch.Tensor:
    """Up to `count` positions evenly spread over 0..length-1 (all of them when there are fewer)."""
    if length <= count:
        return torch.arange(length)
    return torch.linspace(0, length - 1, count).round().long().unique()


BASE = "base"  # no adapter snapshot has this name: as a teacher it is the base with every addition off


@torch.no_grad()
def losses_and_drift(model: Gemma3, tokenizer: Tokenizer, texts: Sequence[str], max_len: int,
                     batch_size: int = 16, positions: int = 16, chunk: int = 128, teacher: str = "teacher"
                     ) -> tuple[list[float], list[float]]:
    """Per text: the model's mean next-token loss, and its mean drift KL(teacher || model) in nats per position.

    The loss walks the head in slices over every target (engine.losses.token_losses). The drift compares the
    model's next-token distribution with the teacher's (the same modules with the additions off,
    engine.adapters.teacher_mode) at up to `positions` positions spread evenly over each text, `chunk` positions
    of the batch's texts at a time: each position costs two full [vocab] head rows, which on a CPU would otherwise
    cost more than the forward passes. The forward KL is the distillation direction: it grows when the model drops
    mass the teacher put somewhere. A model that is its own teacher (no addition on) has no drift: every text's is
    0.0, and the teacher's pass and the drift's head rows are skipped. `teacher` names the frozen adapter snapshot
    the teacher keeps (BASE: none, so the drift is from the bare base).
    """
    pairs = distributed.split_work(lambda part: list(zip(*_losses_and_drift(model, tokenizer, part, max_len,
                                                                           batch_size, positions, chunk, teacher))),
                                   texts, model)
    return [loss for loss, _ in pairs], [drift for _, drift in pairs]


@torch.no_grad()
def _losses_and_drift(model: Gemma3, tokenizer: Tokenizer, texts: Sequence[str], max_len: int, batch_size: int,
                      positions: int, chunk: int, teacher: str) -> tuple[list[float], list[float]]:
    losses, drifts = [], []
    was_training = model.training
    model.eval()
    for batch in _batches(model, tokenizer, texts, max_len, batch_size):
        ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        student = model(ids, mask, return_logits=False).hidden
        losses += _per_text(*token_losses(model, student, ids, targets), len(ids))
        if is_teacher(model, teacher):
            drifts += [0.0] * len(ids)
            continue
        with teacher_mode(model, teacher):
            reference = model(ids, mask, return_logits=False).hidden
        # Position t predicts token t + 1: the last real position predicts nothing and is left out.
        picked = [_spread(int(mask[i].sum()) - 1, positions).to(ids.device) for i in range(len(ids))]
        rows = torch.cat([torch.full_like(p, i) for i, p in enumerate(picked)])
        s_rows = torch.cat([student[i, p] for i, p in enumerate(picked)])
        t_rows = torch.cat([reference[i, p] for i, p in enumerate(picked)])
        kl = []
        for first in range(0, len(rows), chunk):
            log_s = F.log_softmax(model.logits(s_rows[first:first + chunk]).float(), -1)
            log_t = F.log_softmax(model.logits(t_rows[first:first + chunk]).float(), -1)
            kl.append((log_t.exp() * (log_t - log_s)).sum(-1))
        drifts += _per_text(torch.cat(kl) if kl else student.new_zeros(0), rows, len(ids))
    model.train(was_training)
    return losses, drifts


@torch.no_grad()
def translation_scores(model: Gemma3, tokenizer: Tokenizer, pairs: Sequence[Pair], max_new_tokens: int | None = None
                       ) -> dict[str, Any]:
    """Greedy Korean → English translation of held-out pairs: corpus chrF and each pair's chrF. The budget is s1's:
    twice the longest source's tokens plus TRANSLATION_MARGIN, at most --translate-tokens when given."""
    model.eval()
    prompts = [translation_prompt(p.src, "en") for p in pairs]
    budget = max((2 * len(tokenizer.encode(p.src, bos=False)) + TRANSLATION_MARGIN for p in pairs), default=1)
    budget = min(budget, max_new_tokens or budget)
    outputs = [o.strip() for o in generate(model, tokenizer, prompts, budget, ["\n"], batch_size=32)]
    references = [p.tgt for p in pairs]
    return {"chrf": chrf(outputs, references), "chrf_pairs": _rounded(sentence_chrf(outputs, references)),
            "translations": outputs}


def measure_parts(model: Gemma3, tokenizer: Tokenizer, parts: Sequence[str], exams: dict[str, Sequence[MCQ]],
                  formulation: str, ko_texts: Sequence[str], en_texts: Sequence[str], max_len: int) -> dict[str, Any]:
    """What a stage measures, those of `parts`: "ko_exam"/"en_exam" (accuracy in `formulation`, each question right or
    wrong and its prediction), "ko_text" (held-out Korean loss), "en_text" (English loss and drift from the teacher)
    or "en_loss" (the loss without the drift's teacher pass). Means, and the per-item values behind them, so that a
    before → after change is tested on the same questions and texts."""
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {}
    for lang, rows in exams.items():
        report = evaluate(model, tokenizer, rows, formulation, lang, progress=False)
        out.update({f"{lang}_accuracy": report.accuracy, f"{lang}_correct": [e["correct"] for e in report.predictions],
                    f"{lang}_preds": [e["pred"] for e in report.predictions]})
    if "ko_text" in parts:
        ko_losses = text_losses(model, tokenizer, ko_texts, max_len)
        out.update(ko_loss=mean(ko_losses), ko_losses=_rounded(ko_losses))
    if "en_text" in parts:
        en_losses, drifts = losses_and_drift(model, tokenizer, en_texts, max_len)
        out.update(en_loss=mean(en_losses), en_losses=_rounded(en_losses), drift=mean(drifts), drifts=_rounded(drifts))
    elif "en_loss" in parts:
        en_losses = text_losses(model, tokenizer, en_texts, max_len)
        out.update(en_loss=mean(en_losses), en_losses=_rounded(en_losses))
    model.train(was_training)
    return out


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(v, 6) for v in values]
