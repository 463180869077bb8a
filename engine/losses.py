"""Training losses: chunked cross-entropy over the tied head, the per-layer hidden-state loss, the letter loss.

Imports engine.distributed, engine.errors, engine.linear and engine.model.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from engine.distributed import full_tensor, global_mean
from engine.errors import MedkoError
from engine.linear import linear
from engine.model import Gemma3


def _head_walk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_slice: int,
               need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log-sum-exp [rows, 1] and target logit [rows] of hidden @ weight^T, and hidden's cross-entropy gradient.

    One pass over the head in vocabulary slices: an online log-sum-exp (a running max and a rescaled sum, as
    flash attention keeps its softmax) and, alongside, sum_v softmax_v W_v accumulated with the same rescaling.
    """
    rows = hidden.shape[0]
    f32 = {"dtype": torch.float32, "device": hidden.device}
    peak = torch.full((rows, 1), float("-inf"), **f32)
    sums = torch.zeros(rows, 1, **f32)
    picked = torch.zeros(rows, **f32)
    acc = torch.zeros(hidden.shape, **f32) if need_grad else None
    for start in range(0, weight.shape[0], vocab_slice):
        w = weight[start:start + vocab_slice]
        logits = linear(hidden, w).float()
        inside = (targets >= start) & (targets < start + len(w))
        column = (targets - start).clamp(0, len(w) - 1)[:, None]
        picked += torch.where(inside, logits.gather(1, column).squeeze(1), 0.0)
        new_peak = torch.maximum(peak, logits.amax(-1, keepdim=True))
        rescale = (peak - new_peak).exp_()
        numerators = logits.sub_(new_peak).exp_()  # in place: no second slice-sized tensor
        sums = sums * rescale + numerators.sum(-1, keepdim=True)
        if need_grad:
            acc.mul_(rescale).add_(numerators.to(w.dtype) @ w)
        peak = new_peak
    grad = (acc / sums - weight[targets].float()).to(hidden.dtype) if need_grad else None
    return peak + sums.log(), picked, grad


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight^T against targets, in chunks of rows and slices of the vocabulary.

    Each chunk of `row_chunk` rows walks the head once (_head_walk) for its loss and hidden's gradient together,
    so no more than one [row_chunk x vocab_slice] block of logits ever exists (on CPU, no 1 GB buffer to fault
    in) and the head is read once where loss-then-backward reads it twice. The gradient is made here and handed
    out in the backward, so the head is never recomputed there. A trainable head (weight's gradient) takes a
    second pass per chunk, as each slice's softmax is known only once the walk has seen every slice.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_chunk: int,
                vocab_slice: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for first in range(0, hidden.shape[0], row_chunk):
            h, y = hidden[first:first + row_chunk], targets[first:first + row_chunk]
            lse, picked, grad = _head_walk(h, weight, y, vocab_slice, need_h)
            total += (lse.squeeze(1) - picked).sum()
            if need_h:
                grad_h[first:first + row_chunk] = grad
            if need_w:
                for start in range(0, weight.shape[0], vocab_slice):
                    probs = linear(h, weight[start:start + vocab_slice]).float().sub_(lse).exp_()
                    grad_w[start:start + vocab_slice] += probs.T @ h.float()
                grad_w.index_add_(0, y, -h.float())
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.need = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        grad_h = grad_w = None
        if ctx.need[0]:
            grad_h = next(saved)
            grad_h = (grad_h * grad_out).to(grad_h.dtype)
        if ctx.need[1]:
            grad_w = (next(saved) * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


HEAD_ROWS = 8192  # target rows per ChunkedCrossEntropy chunk


def head_slice(rows: int, vocab: int, device: torch.device) -> int:
    """Vocabulary rows per ChunkedCrossEntropy slice: [rows x slice] float32 logits of at most 16 MB on CPU
    (below glibc's mmap threshold, so the memory is reused rather than faulted in anew each slice) or 256 MB
    on a GPU (fewer, larger kernels); never fewer than 256 rows, so each matmul stays a real one."""
    budget = (1 << 22) if device.type == "cpu" else (1 << 26)
    return max(256, min(vocab, budget // max(rows, 1)))


def causal_lm_loss(model: Gemma3, hidden: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor,
                   row_chunk: int = HEAD_ROWS, vocab_slice: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count.

    target_mask marks tokens to predict (aligned with input_ids; prompt tokens are not targets). Only target
    positions go through the head, `row_chunk` rows by `vocab_slice` vocabulary rows at a time
    (ChunkedCrossEntropy; head_slice picks the slice), so full [targets x vocab] logits are never held.
    """
    mask = target_mask[:, 1:].bool()
    h, y = hidden[:, :-1][mask], input_ids[:, 1:][mask]
    weight = model.embed_tokens.weight
    vocab_slice = vocab_slice or head_slice(min(len(y), row_chunk), weight.shape[0], weight.device)
    return ChunkedCrossEntropy.apply(h, weight, y, row_chunk, vocab_slice), int(mask.sum())


@torch.no_grad()
def token_losses(model: Gemma3, hidden: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor,
                 row_chunk: int = HEAD_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target token's cross-entropy [n] and the batch row it belongs to [n], without gradients.

    All rows' targets share one head walk, so measuring a batch of texts reads the 262k-row head once rather than
    once per text: on a CPU that memory traffic, not the arithmetic, is what per-text measurement costs.
    """
    mask = target_mask[:, 1:].bool()
    h, y = hidden[:, :-1][mask], input_ids[:, 1:][mask]
    weight = model.embed_tokens.weight
    vocab_slice = head_slice(min(len(y), row_chunk), weight.shape[0], weight.device)
    walks = [_head_walk(h[i:i + row_chunk], weight, y[i:i + row_chunk], vocab_slice, False)
             for i in range(0, len(y), row_chunk)]
    losses = torch.cat([lse.squeeze(1) - picked for lse, picked, _ in walks]) if walks else h.new_zeros(0)
    return losses, mask.nonzero()[:, 0]


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / rms(x) in float32, without a weight: the per-layer loss compares directions and relative sizes."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _lens_kl(model: Gemma3, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the logit-lens distributions (final norm, tied head), averaged over positions."""
    log_p = F.log_softmax(model.logits(model.norm(student)).float(), -1)
    log_q = F.log_softmax(model.logits(model.norm(teacher)).float(), -1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def layer_loss(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor], mask: torch.Tensor,
               layer_map: Sequence[int], kind: str = "mse", model: Gemma3 | None = None, sample_positions: int = 64,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean over layers of the distance between student and teacher hidden states on non-padding tokens.

    `mse`: MSE of the states as the tied head reads them (RMS-normalised, then scaled by the final norm's gains
    1 + w; gains 1 without `model`), relative to the teacher's mean square. RMS normalisation alone is dominated by
    Gemma's few massive-activation dimensions (one of the 270M's last-layer dimensions holds ~86% of its mean
    square), which the final norm scales down to ~0.2 while it scales others up to ~300: an MSE there held those
    few dimensions and let English drift 0.25 nats/token at a layer loss below the entering model's.
    `kl`: KL between logit-lens distributions at up to `sample_positions` non-padding positions, the same
    positions for every layer.
    """
    if len(layer_map) != len(teacher_states):
        raise MedkoError(f"layer_map has {len(layer_map)} entries for {len(teacher_states)} teacher states; "
                         f"build it with teacher_layer_map(model)")
    mask = mask.bool()
    if kind == "mse":
        # The frozen gains, whole: under FSDP2 the norm's weight is a shard outside its module's forward.
        gain = 1.0 + full_tensor(model.norm.weight).detach().float() if model is not None else 1.0
        errors, scales = [], []
        for t, s in enumerate(layer_map):
            student, teacher = rms_normalize(student_states[s][mask]) * gain, rms_normalize(teacher_states[t][mask]) * gain
            errors.append((student - teacher).pow(2).mean())
            scales.append(teacher.pow(2).mean().detach())
        # The teacher's mean square over every process's tokens, so N processes compute one process's loss.
        scales = global_mean(torch.stack(scales), int(mask.sum()))
        losses = [error / scale.clamp_min(1e-12) for error, scale in zip(errors, scales)]
    elif kind == "kl":
        if model is None:
            raise MedkoError("the kl layer loss needs the model for its logit lens; pass model=")
        rows, cols = mask.nonzero(as_tuple=True)
        if len(rows) > sample_positions:
            pick = torch.randperm(len(rows), generator=generator)[:sample_positions].to(rows.device)
            rows, cols = rows[pick], cols[pick]
        # Checkpointed so that only one layer's [positions x vocab] logits are alive in the backward.
        losses = [torch.utils.checkpoint.checkpoint(_lens_kl, model, student_states[s][rows, cols], teacher_states[t][rows, cols],
                             use_reentrant=False) for t, s in enumerate(layer_map)]
    else:
        raise MedkoError(f"unknown layer loss {kind!r}; use 'mse' or 'kl'")
    return torch.stack(losses).mean()


def letter_loss(model: Gemma3, hidden: torch.Tensor, positions: torch.Tensor, letter_ids: Sequence[int],
                gold: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the five answer-letter logits at each row's answer position.

    positions[b] is the position whose next-token logits give row b's answer letter; gold[b] is 0-4 (A-E).
    """
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    logits = model.logits(hidden[rows, positions], torch.tensor(list(letter_ids), device=hidden.device)).float()
    return F.cross_entropy(logits, gold)
