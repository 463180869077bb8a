"""The cloze formulation (OLMES's CF) of a multiple-choice question: each option's text scored as a continuation of
the question, with lm-evaluation-harness's loglikelihood and acc_norm conventions.

Small models answer the letter formulation (MCF) at chance and the cloze one far above it, so the curriculum scores
both and decides on the one in which the base's English is higher (OLMES's rule).

- Prompt `Question: {q}\\nAnswer:` (Korean `질문: {q}\\n정답:`), each option the continuation ` {option}`.
- Tokens as lm-eval's loglikelihood encodes them for Gemma (BOS added): the context is the prompt's own tokens; an
  option's tokens are those of prompt + continuation, encoded whole, past the prompt's length.
- Prediction: the highest summed log-probability divided by the option text's length in characters without the
  leading space (lm-eval's acc_norm divides by len(choice)); the sum and the per-token mean are kept too.
- One prefill per question: the prompt goes through the model once into a KV cache, and its options continue from
  copies of that cache, all of a batch's options in one pass. Log-probabilities come from engine.losses'
  vocabulary-sliced head walk, so no [tokens x vocab] logits are ever built.

Imports engine.data, engine.distributed, engine.errors, engine.generate, engine.losses, engine.model and
engine.tokenizer.
"""
from __future__ import annotations

import copy
import sys
from array import array
from dataclasses import dataclass
from typing import Sequence

import torch

from engine import distributed
from engine.data import MCQ
from engine.errors import MedkoError
from engine.generate import keep_rows, left_pad
from engine.losses import token_losses
from engine.model import Gemma3, KVCache, model_device, model_dtype
from engine.tokenizer import Tokenizer

OPTION_ROWS = 16  # option rows per continuation pass
CLOZE_CUE = {"en": ("Question: ", "\nAnswer:"), "ko": ("질문: ", "\n정답:")}


def cloze_prompt(row: MCQ, lang: str) -> str:
    if lang not in CLOZE_CUE:
        raise MedkoError(f"unknown language {lang!r}; use 'ko' or 'en'")
    head, cue = CLOZE_CUE[lang]
    return f"{head}{row.question.strip()}{cue}"


@dataclass
class Encoded:
    """One question as the cloze scorer feeds it: the context tokens and each option's continuation tokens."""

    context: Sequence[int]  # a list, or a 32-bit array once compact() has made it one
    options: list[Sequence[int]]
    chars: list[int]  # each option text's length in characters (acc_norm's divisor)


def encode_question(tokenizer: Tokenizer, row: MCQ, lang: str) -> Encoded:
    """lm-eval's _encode_pair: the whole (prompt + continuation) is encoded, and its tokens past the prompt's own
    token count are the continuation's, whatever the tokenizer merged at the boundary."""
    prompt = cloze_prompt(row, lang)
    texts = [option.strip() for option in row.options.values()]
    context = tokenizer.encode(prompt)
    wholes = tokenizer.encode_batch([f"{prompt} {text}" for text in texts])
    options = [whole[len(context):] for whole in wholes]
    for letter, tokens in zip(row.options, options):
        if not tokens:
            raise MedkoError(f"option {letter} of question {row.id} is empty after tokenization; cloze scoring needs "
                             f"option text")
    return Encoded(context, options, [len(text) for text in texts])


def compact(e: Encoded) -> Encoded:
    """The same tokens as 32-bit arrays (Tokenizer.encode_compact), which a whole split's questions are held in."""
    return Encoded(array("i", e.context), [array("i", o) for o in e.options], e.chars)


@torch.no_grad()
def cloze_logprobs(model: Gemma3, tokenizer: Tokenizer, rows: Sequence[MCQ], lang: str, batch_size: int = 8,
                   progress: bool = False) -> list[list[tuple[float, int]]]:
    """For each question, each option's (summed log-probability, token count), in option order. Under torchrun each
    rank scores its share of the questions and the rows are gathered in order."""
    encoded = [compact(encode_question(tokenizer, r, lang)) for r in rows]
    return distributed.split_work(lambda part: _logprobs(model, tokenizer, part, batch_size, progress), encoded, model)


def _logprobs(model: Gemma3, tokenizer: Tokenizer, encoded: list[Encoded], batch_size: int, progress: bool
              ) -> list[list[tuple[float, int]]]:
    from tqdm import tqdm

    device = model_device(model)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].context))
    out: list[list[tuple[float, int]]] = [[] for _ in encoded]
    for start in tqdm(range(0, len(order), batch_size), desc="cloze", unit="batch", disable=not progress,
                      file=sys.stderr):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        ids, mask = left_pad([e.context for e in chunk], tokenizer.pad_id, device)
        owner = [q for q, e in enumerate(chunk) for _ in e.options]  # the question each option row continues
        conts = [tokens for e in chunk for tokens in e.options]
        width = max(len(c) for c in conts)
        cache = KVCache(model.config, len(chunk), ids.shape[1] + width, model_dtype(model), device)
        last = model(ids, mask, cache=cache, return_logits=False).hidden[:, -1]  # left padding: last slot is real
        # Option rows run in groups of like length, longest first, each padded only to its own longest: padded to
        # the batch's longest, the bundled exam's continuation passes were half padding.
        sums = torch.zeros(len(conts), dtype=torch.float64)
        by_length = sorted(range(len(conts)), key=lambda r: -len(conts[r]))
        for g in range(0, len(by_length), OPTION_ROWS):
            group = by_length[g:g + OPTION_ROWS]
            sums[group] = _continuation_sums(model, tokenizer, cache, last, ids, [owner[r] for r in group],
                                             [conts[r] for r in group])
        r = 0
        for q, e in zip(order[start:start + batch_size], chunk):
            out[q] = [(sums[r + j].item(), len(e.options[j])) for j in range(len(e.options))]
            r += len(e.options)
    return out


def _continuation_sums(model: Gemma3, tokenizer: Tokenizer, prefilled: KVCache, last: torch.Tensor,
                       ids: torch.Tensor, owner: list[int], conts: list[list[int]]) -> torch.Tensor:
    """Each continuation's summed log-probability (float64), row r continuing question owner[r] from a copy of
    that question's prefilled cache rows (the prefilled cache itself stays as it is)."""
    device = last.device
    rows = torch.tensor(owner, device=device)
    cache = copy.copy(prefilled)
    keep_rows(cache, rows)  # new tensors: each option row starts from its question's prefilled rows
    width = max(len(c) for c in conts)
    cont_ids = torch.full((len(conts), width), tokenizer.pad_id, dtype=torch.long, device=device)
    cont_mask = torch.zeros(len(conts), width, dtype=torch.bool, device=device)
    for i, tokens in enumerate(conts):
        cont_ids[i, :len(tokens)] = torch.tensor(tokens, device=device)
        cont_mask[i, :len(tokens)] = True
    hidden = model(cont_ids, cont_mask, cache=cache, return_logits=False).hidden
    # Row r predicts its continuation from the prompt's last state, then from each continuation state but its last.
    hidden = torch.cat([last[rows][:, None], hidden], 1)
    targets = torch.cat([ids[rows, -1:], cont_ids], 1)
    target_mask = torch.cat([torch.zeros_like(cont_mask[:, :1]), cont_mask], 1)
    losses, row_of = token_losses(model, hidden, targets, target_mask)
    return torch.zeros(len(conts), dtype=torch.float64, device=losses.device).index_add_(
        0, row_of, -losses.double()).cpu()


def cloze_predictions(rows: Sequence[MCQ], logprobs: Sequence[Sequence[tuple[float, int]]]) -> list[dict]:
    """Each question's acc_norm prediction (first of equal scores, as numpy's argmax), with its three scores per
    option: summed log-probability, per character of the option text, per token."""
    out = []
    for row, scores in zip(rows, logprobs):
        chars = [len(text.strip()) for text in row.options.values()]
        per_char = [s / c for (s, _), c in zip(scores, chars)]
        best = max(range(len(per_char)), key=lambda j: (per_char[j], -j))
        letters = list(row.options)
        out.append({"pred": letters[best], "sum": [round(s, 6) for s, _ in scores],
                    "per_char": [round(v, 6) for v in per_char],
                    "per_token": [round(s / n, 6) for s, n in scores]})
    return out

