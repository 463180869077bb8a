"""Gemma's tokenizer (tokenizer.json through `tokenizers`) and its chat turn format.

Imports only engine.errors.
"""
from __future__ import annotations

import hashlib
from array import array
from pathlib import Path
from typing import Iterator, Sequence

from engine.errors import MedkoError


class Tokenizer:
    """Gemma's tokenizer from a tokenizer.json; BOS is added here, never by the post-processor."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise MedkoError(f"{path} is missing; a model directory needs tokenizer.json")
        self.tok = HFTokenizer.from_file(str(path))
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()  # names the tokenizer in run records
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.token_id("<bos>")
        self.eos_id = self.token_id("<eos>")
        self.pad_id = self.token_id("<pad>")
        self.end_of_turn_id = self.token_id("<end_of_turn>")
        self.korean_table = None  # which token ids hold Hangul, filled in by adapters.korean_token_table

    def token_id(self, token: str) -> int:
        idx = self.tok.token_to_id(token)
        if idx is None:
            raise MedkoError(f"the tokenizer has no {token!r} token; is this a Gemma 3 tokenizer.json?")
        return idx

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos else ids

    def encode_batch(self, texts: Sequence[str], bos: bool = True) -> list[list[int]]:
        return list(self.encode_each(texts, bos))

    def encode_compact(self, texts: Sequence[str], bos: bool = True) -> list[array]:
        """Each text's ids as an array of 32-bit ints: 4 bytes a token, where a list holds an 8-byte pointer and,
        for most ids, a 32-byte int object. What a scorer keeps of a whole split while it sorts it by length."""
        return [array("i", ids) for ids in self.encode_each(texts, bos)]

    def encode_each(self, texts: Sequence[str], bos: bool = True, chunk: int = 64) -> Iterator[list[int]]:
        """Each text's ids in order, encoded `chunk` texts at a time: tokenizers' Encoding objects (every token's
        string and offsets) cost ~100 bytes a token, so only one chunk of them is ever alive."""
        for start in range(0, len(texts), chunk):
            for e in self.tok.encode_batch(list(texts[start:start + chunk]), add_special_tokens=False):
                yield ([self.bos_id] if bos else []) + e.ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def tokens(self) -> list[str]:
        """Every token string by id."""
        vocab = self.tok.get_vocab(with_added_tokens=True)
        out = [""] * self.vocab_size
        for token, idx in vocab.items():
            out[idx] = token
        return out


def chat_prompt(text: str) -> str:
    """Gemma's turn format for one user message, ending where the model speaks."""
    return f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"
