"""Greedy batched generation with a KV cache.

Imports engine.distributed, engine.fit, engine.model and engine.tokenizer.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

import torch

from engine import distributed
from engine.fit import rows_that_fit
from engine.model import Gemma3, KVCache, model_device, model_dtype
from engine.tokenizer import Tokenizer


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded into (ids, mask), so every row's last token is at the same slot."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = True
    return ids.to(device), mask.to(device)


def keep_rows(cache: KVCache, rows: torch.Tensor) -> None:
    """Keeps only `rows` of the cache, in that order, as new tensors: the rows still decoding, or (cloze) each option
    row's copy of its question's prefilled rows."""
    cache.keys = [k[rows] for k in cache.keys]
    cache.values = [v[rows] for v in cache.values]
    cache.key_mask, cache.next_position = cache.key_mask[rows], cache.next_position[rows]


def _join(model: Gemma3, cache: KVCache | None, new: KVCache, capacity: int) -> KVCache:
    """One cache holding the rows of `cache` then those of `new`, each row's tokens right-aligned at the same
    last slot (so a row's tokens stay contiguous, as the sliding-window mask assumes), with room for `capacity`."""
    parts = [c for c in (cache, new) if c is not None]
    length = max(c.length for c in parts)
    rows = sum(len(c.next_position) for c in parts)
    joined = KVCache(model.config, rows, length + capacity, new.keys[0].dtype, new.keys[0].device)
    first = 0
    for c in parts:
        n, start = len(c.next_position), length - c.length
        for layer in range(len(joined.keys)):
            joined.keys[layer][first:first + n, :, start:length] = c.keys[layer][:, :, :c.length]
            joined.values[layer][first:first + n, :, start:length] = c.values[layer][:, :, :c.length]
        joined.key_mask[first:first + n, start:length] = c.key_mask[:, :c.length]
        joined.next_position[first:first + n] = c.next_position
        first += n
    joined.length = length
    return joined


# Drafts are fed while a pass holds at most this many tokens: up to there a decoding pass costs about what a
# one-token pass does (reading the weights dominates), so a wrong draft costs little; a full batch gets none.
PASS_TOKENS = 16
# Prompts joining the batch are prefilled this many at a time, so a short prompt is not padded to a long one's length
# (64 reasoning prompts of 64 to 162 tokens padded as one are 58% padding).
PREFILL_ROWS = 16


def lookup_draft(context: Sequence[int], limit: int, ngrams: Sequence[int] = (3, 2)) -> list[int]:
    """Prompt-lookup drafting: the up to `limit` tokens that followed the latest earlier occurrence of the
    context's last n tokens (n tried longest first), or [] when none occurred. Greedy decoding that loops or
    copies from its prompt is predicted exactly; a wrong draft only costs the wider forward pass."""
    for n in ngrams:
        if limit <= 0 or len(context) <= n:
            continue
        tail = list(context[-n:])
        for start in range(len(context) - n - 1, -1, -1):
            if context[start] == tail[0] and list(context[start:start + n]) == tail:
                return list(context[start + n:start + n + limit])
    return []


@torch.no_grad()
def generate_ids(model: Gemma3, rows: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: set[int],
                 pad_id: int, allowed_vocab: int, stop_check: Callable[[list[int]], bool] | None = None,
                 batch_size: int | None = None, on_done: Callable[[int], None] | None = None,
                 lookahead: int = 8) -> list[list[int]]:
    """Greedy continuations of token rows, decoded `batch_size` rows at a time with one KV cache.

    A row ends at a stop id (not included), when stop_check(row_ids) says so, or at max_new_tokens; it then
    leaves the batch (its cache rows are dropped, and the head and layers run only for rows still decoding),
    and waiting rows join in its place. Rows start longest first, so a joining prompt fits the cache's length.
    on_done(i) is called as row i finishes.

    Each step feeds every row its next token and, when every row has one, up to `lookahead` drafted tokens
    (lookup_draft over its prompt and output) while the pass stays within PASS_TOKENS tokens. The step keeps
    each row's argmax up to the first drafted token that differs from it, the same for all rows (the fewest any
    row kept), and rolls the cache back past the rest: the greedy tokens, several per forward pass while drafts
    hold. lookahead=0 decodes one token at a time.
    """
    device = model_device(model)
    batch_size = batch_size or len(rows)
    waiting = sorted(range(len(rows)), key=lambda i: -len(rows[i]))[::-1]  # popped from the end: longest first
    out: list[list[int]] = [[] for _ in rows]
    active: list[int] = []
    pending: list[list[int]] = []  # per active row, the greedy tokens chosen but not yet appended
    cache = None

    def argmax(hidden: torch.Tensor) -> torch.Tensor:
        # Embedding rows past the tokenizer's vocabulary are padding and never generated.
        return model.logits(hidden)[..., :allowed_vocab].argmax(-1)

    while waiting or active:
        if waiting and len(active) < batch_size:
            joining = [waiting.pop() for _ in range(min(batch_size - len(active), len(waiting)))]
            # Prefilled PREFILL_ROWS at a time: rows of like length (they come longest first) pad little.
            for start in range(0, len(joining), PREFILL_ROWS):
                part = joining[start:start + PREFILL_ROWS]
                ids, mask = left_pad([rows[i] for i in part], pad_id, device)
                prefill = KVCache(model.config, len(part), ids.shape[1], model_dtype(model), device)
                first = model(ids, mask, cache=prefill, return_logits=False).hidden[:, -1]
                cache = _join(model, cache, prefill, max_new_tokens)
                pending += [[t] for t in argmax(first).tolist()]
                active += part
        going = []
        for slot, i in enumerate(active):
            for token in pending[slot]:
                if token in stop_ids:
                    break
                out[i].append(token)
                if len(out[i]) >= max_new_tokens or (stop_check is not None and stop_check(out[i])):
                    break
            else:
                going.append(slot)
                continue
            if on_done is not None:
                on_done(i)
        if len(going) < len(active):
            keep_rows(cache, torch.tensor(going, dtype=torch.long, device=device))
            active = [active[s] for s in going]
        if not active:
            cache, pending = None, []
            continue
        # The cache holds each row's prompt and all but its last output token; a row may take max_new_tokens.
        room = min([lookahead, PASS_TOKENS // len(active) - 1] + [max_new_tokens - len(out[i]) for i in active])
        drafts = [lookup_draft(rows[i] + out[i], room) for i in active]
        width = min(len(d) for d in drafts)
        step = torch.tensor([[out[i][-1]] + d[:width] for i, d in zip(active, drafts)], device=device)
        length, position = cache.length, cache.next_position.clone()
        chosen = argmax(model(step, torch.ones_like(step, dtype=torch.bool), cache=cache,
                              return_logits=False).hidden)
        # kept: drafted tokens equal to the argmax before them, counted up to the first that is not
        kept = int((step[:, 1:] == chosen[:, :-1]).long().cumprod(-1).sum(-1).min()) if width else 0
        cache.length, cache.next_position = length + 1 + kept, position + 1 + kept
        pending = chosen[:, :kept + 1].tolist()
    return out


def generate(model: Gemma3, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
             stop: Sequence[str] = (), batch_size: int = 8, progress: bool = False) -> list[str]:
    """Greedy continuations of prompts, `batch_size` decoding at once (fewer where the memory plan says this GPU
    holds fewer caches); each is cut before the first stop string. Under torchrun each rank decodes its share of
    the prompts and the outputs are gathered in order."""
    from tqdm import tqdm

    encoded = tokenizer.encode_batch(prompts)
    batch_size = rows_that_fit(model, "generate", batch_size, max((len(e) for e in encoded), default=1), max_new_tokens)
    stop_ids = {tokenizer.eos_id, tokenizer.end_of_turn_id}
    # A stop string completed by the newest token lies in the last few tokens (each token is at least one
    # character, or a quarter of one as a UTF-8 byte), so only that tail is decoded each step.
    tail = 4 * max((len(s) for s in stop), default=0) + 4

    def hit_stop(ids: list[int]) -> bool:
        text = tokenizer.decode(ids[-tail:])
        return any(s in text for s in stop)

    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress, file=sys.stderr)
    outs = distributed.split_work(lambda part: generate_ids(
        model, part, max_new_tokens, stop_ids, tokenizer.pad_id, tokenizer.vocab_size, hit_stop if stop else None,
        batch_size, on_done=lambda i: bar.update(1)), encoded, model)
    bar.close()
    results = []
    for ids in outs:
        text = tokenizer.decode(ids)
        cuts = [text.find(s) for s in stop if s in text]
        results.append(text[:min(cuts)] if cuts else text)
    return results
