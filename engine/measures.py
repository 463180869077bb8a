"""Per-text measurements on held-out text, so that a before → after change gets an interval over texts: the
next-token loss of each text, and English drift, the KL divergence of the model's next-token distribution
from its teacher's, per text. Both run in bounded batches: a few texts per forward and at most `rows`
positions' [rows x vocab] logits alive at a time.

Imports engine.adapters, engine.losses, engine.model, engine.tokenizer and engine.trainer.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from engine.adapters import teacher_mode
from engine.losses import causal_lm_loss
from engine.model import Gemma3, model_device
from engine.tokenizer import Tokenizer
from engine.trainer import collate, text_examples


def _batches(tokenizer: Tokenizer, texts: Sequence[str], max_len: int, batch_size: int, device: torch.device):
    examples = text_examples(tokenizer, texts, max_len)
    if len(examples) != len(texts):
        raise ValueError(f"{len(texts) - len(examples)} of {len(texts)} texts have no token to measure")
    for start in range(0, len(examples), batch_size):
        yield {k: v.to(device) for k, v in collate(examples[start:start + batch_size]).items()}


@torch.no_grad()
def text_losses(model: Gemma3, tokenizer: Tokenizer, texts: Sequence[str], max_len: int,
                batch_size: int = 4) -> list[float]:
    """Mean next-token cross-entropy per target token of each text, in input order."""
    out = []
    for batch in _batches(tokenizer, texts, max_len, batch_size, model_device(model)):
        ids, targets = batch["input_ids"], batch["target_mask"]
        hidden = model(ids, batch["attention_mask"], return_logits=False).hidden
        for i in range(len(ids)):
            loss, n = causal_lm_loss(model, hidden[i:i + 1], ids[i:i + 1], targets[i:i + 1])
            out.append(float(loss) / max(n, 1))
    return out


@torch.no_grad()
def losses_and_drift(model: Gemma3, tokenizer: Tokenizer, texts: Sequence[str], max_len: int,
                     batch_size: int = 4, rows: int = 64) -> tuple[list[float], list[float]]:
    """Per text: the model's mean next-token loss, and its mean drift KL(teacher || model) in nats per position.

    One pass serves both: the model's log-probabilities at each position give the loss (at target tokens) and,
    with the teacher's (the same modules with the additions off, engine.adapters.teacher_mode), the KL. The
    forward KL is the distillation direction: it grows when the model drops mass the teacher put somewhere.
    """
    losses, drifts = [], []
    was_training = model.training
    model.eval()
    for batch in _batches(tokenizer, texts, max_len, batch_size, model_device(model)):
        ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        student = model(ids, mask, return_logits=False).hidden
        with teacher_mode(model):
            teacher = model(ids, mask, return_logits=False).hidden
        for i in range(len(ids)):
            # Position t predicts token t + 1: the last real position predicts nothing and is left out.
            length = int(mask[i].sum())
            nll, kl = 0.0, 0.0
            for start in range(0, length - 1, rows):
                end = min(length - 1, start + rows)
                log_s = F.log_softmax(model.logits(student[i, start:end]).float(), -1)
                log_t = F.log_softmax(model.logits(teacher[i, start:end]).float(), -1)
                kl += float((log_t.exp() * (log_t - log_s)).sum())
                picked = log_s.gather(-1, ids[i, start + 1:end + 1, None]).squeeze(-1)
                nll -= float(picked[targets[i, start + 1:end + 1]].sum())
            losses.append(nll / max(int(targets[i, 1:length].sum()), 1))
            drifts.append(kl / max(length - 1, 1))
    model.train(was_training)
    return losses, drifts
