"""The loss functions of the curriculum's training phases: cross-entropy on targets, with the per-layer English
loss against the teacher, s1.1's and s5's letter loss and s5's answer-line loss; and guard recovery's English-only
loss.

Imports engine.adapters, engine.distributed, engine.errors, engine.losses and engine.model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import distributed
from engine.adapters import teacher_layer_map, teacher_states
from engine.errors import MedkoError
from engine.losses import causal_lm_loss, layer_loss, letter_loss
from engine.model import Gemma3


def stage_loss(kind: str, weight: float, letters: list[int] | None = None, every_row: bool = True, ending: int = 0):
    """Loss function of a training phase: CE on targets, the per-layer English loss, the letter loss and, with
    `ending` (and letters), the answer-line loss: the mean cross-entropy of each row's last `ending` tokens (its
    answer line and EOS), so that the format a reasoning example ends in weighs as much as its reasoning.

    The per-layer, letter and answer-line terms are means; each is scaled by the micro-batch's target count so
    that the trainer's division by the accumulated target tokens leaves it at its weight per update, however many
    text tokens share the batch (an exam row's letter would otherwise be one token among hundreds). With every_row
    False, only rows that end in an answer letter (exam rows among texts) get the letter loss.
    """
    def loss_fn(model: Gemma3, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict[str, float]]:
        ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        count = int(targets.sum())
        metrics: dict[str, float] = {}
        hidden = model(ids, mask, return_logits=False).hidden
        loss, n = causal_lm_loss(model, hidden, ids, targets)
        metrics["ce"] = float(loss.detach()) / max(n, 1)
        if letters is not None:
            # Each example ends in EOS (its last token: the next slot is another example or padding); the answer
            # letter stands just before it and is predicted one position earlier.
            segments = mask.long()
            following = torch.cat([segments[:, 1:], torch.zeros_like(segments[:, :1])], 1)
            rows, eos = (targets & (following != segments)).nonzero(as_tuple=True)
            answer = ids[rows, eos - 1]
            choices = torch.tensor(letters, device=ids.device)
            has = (answer[:, None] == choices).any(-1)
            if every_row and not has.all():
                raise MedkoError("a reasoning example does not end in one answer-letter token; check its answer")
            share = distributed.global_weight(count, int(has.sum()))  # = count in one process
            if has.any():
                gold = (answer[has, None] == choices).float().argmax(-1)
                letter = letter_loss(model, hidden[rows[has]], (eos - 2)[has], letters, gold)
                loss = loss + letter * share
                metrics["letter"] = float(letter.detach())
                if ending:
                    # position p predicts token p + 1: the ending's tokens eos-ending+1 .. eos, from eos-ending .. eos-1
                    at = (eos[has, None] - torch.arange(ending, 0, -1, device=ids.device)).flatten()
                    r = rows[has].repeat_interleave(ending)
                    answer_line = F.cross_entropy(model.logits(hidden[r, at]).float(), ids[r, at + 1])
                    loss = loss + answer_line * share
                    metrics["answer_line"] = float(answer_line.detach())
        if "en_input_ids" in batch and weight:
            en_ids, en_mask = batch["en_input_ids"], batch["en_attention_mask"]
            student = model(en_ids, en_mask, output_hidden_states=True, return_logits=False).hidden_states
            layer = layer_loss(student, teacher_states(model, en_ids, en_mask), en_mask, teacher_layer_map(model),
                               kind=kind, model=model)
            loss = loss + weight * layer * distributed.global_weight(count, int(en_mask.bool().sum()))
            metrics["layer"] = float(layer.detach())
        return loss, count, metrics
    return loss_fn


def english_only_loss(kind: str):
    """Guard recovery: only the per-layer English loss, weighted per English token."""
    def loss_fn(model: Gemma3, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, dict[str, float]]:
        ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        student = model(ids, mask, output_hidden_states=True, return_logits=False).hidden_states
        layer = layer_loss(student, teacher_states(model, ids, mask), mask, teacher_layer_map(model), kind=kind,
                           model=model)
        count = int(targets.sum())
        return layer * distributed.global_weight(count, int(mask.bool().sum())), count, {"layer": float(layer.detach())}
    return loss_fn
