"""Greedy batched generation with a KV cache.

Imports engine.model and engine.tokenizer.
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch

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


@torch.no_grad()
def generate_ids(model: Gemma3, rows: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: set[int],
                 pad_id: int, allowed_vocab: int, stop_check=None) -> list[list[int]]:
    """Greedy continuations of token rows decoded together with one KV cache.

    A row ends at a stop id (not included) or when stop_check(row_ids) says so.
    """
    device = model_device(model)
    ids, mask = left_pad(rows, pad_id, device)
    cache = KVCache(model.config, len(rows), ids.shape[1] + max_new_tokens, model_dtype(model), device)
    hidden = model(ids, mask, cache=cache, return_logits=False).hidden[:, -1:]
    out: list[list[int]] = [[] for _ in rows]
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        # Embedding rows past the tokenizer's vocabulary are padding and never generated.
        nxt = model.logits(hidden)[:, -1, :allowed_vocab].argmax(-1)
        for i in torch.nonzero(~done).flatten().tolist():
            token = nxt[i].item()
            if token in stop_ids:
                done[i] = True
                continue
            out[i].append(token)
            if stop_check is not None and stop_check(out[i]):
                done[i] = True
        if done.all():
            break
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        hidden = model(nxt[:, None], (~done)[:, None], cache=cache, return_logits=False).hidden
    return out


def generate(model: Gemma3, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
             stop: Sequence[str] = (), batch_size: int = 8, progress: bool = False) -> list[str]:
    """Greedy continuations of prompts, batched by length; each is cut before the first stop string."""
    from tqdm import tqdm

    encoded = tokenizer.encode_batch(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[str] = [""] * len(prompts)
    stop_ids = {tokenizer.eos_id, tokenizer.end_of_turn_id}

    def hit_stop(ids: list[int]) -> bool:
        text = tokenizer.decode(ids)
        return any(s in text for s in stop)

    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress, file=sys.stderr)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outs = generate_ids(model, [encoded[i] for i in chunk], max_new_tokens, stop_ids, tokenizer.pad_id,
                            tokenizer.vocab_size, hit_stop if stop else None)
        for i, ids in zip(chunk, outs):
            text = tokenizer.decode(ids)
            cuts = [text.find(s) for s in stop if s in text]
            results[i] = text[:min(cuts)] if cuts else text
        bar.update(len(chunk))
    bar.close()
    return results
