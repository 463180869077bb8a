"""The exam as training rows: the answer letter as the only target (s1.1), and worked reasoning ending in the answer
line (s5 and the lora-sft baseline), with greedy reasoning scored for strict answer-line compliance.

Imports engine.data, engine.errors, engine.evaluate, engine.examples, engine.generate, engine.model, engine.rows,
engine.stats and engine.tokenizer.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from engine.data import LETTERS, MCQ
from engine.errors import MedkoError
from engine.evaluate import ANSWER_CUE, extract_answer, mcq_prompt, question_block, strict_answer, windows
from engine.examples import ExampleFile, cut_middle_examples, lm_examples
from engine.generate import generate
from engine.model import Gemma3
from engine.rows import Mapped
from engine.stats import mean
from engine.tokenizer import Tokenizer


def exam_examples(tokenizer: Tokenizer, rows: Sequence[MCQ], lang: str, max_len: int) -> ExampleFile:
    """Exam questions with the answer letter as the only target, as the evaluator scores it."""
    return lm_examples(tokenizer, Mapped(rows, lambda r: mcq_prompt(r, lang)), Mapped(rows, lambda r: f" {r.answer}"),
                       max_len)


def reasoning_prompt(row: MCQ) -> str:
    """The harness question block with a worked-reasoning cue in place of the answer cue."""
    return question_block(row, "ko")[:-len(ANSWER_CUE["ko"])] + "풀이："


def reasoning_examples(tokenizer: Tokenizer, rows: Sequence[MCQ], max_len: int) -> tuple[ExampleFile, int]:
    """Worked reasoning ending in the answer line, the prompt masked; reasoning too long for max_len loses its
    middle, never the prompt or the answer line. Returns the examples and how many were cut."""
    return cut_middle_examples(tokenizer, Mapped(rows, reasoning_prompt),
                               Mapped(rows, lambda r: f" {r.reasoning.strip()}"),
                               Mapped(rows, lambda r: f"\n{ANSWER_CUE['ko']} {r.answer}"), max_len)


def answer_line_tokens(tokenizer: Tokenizer) -> int:
    """Tokens of the answer line reasoning examples end in, with their EOS: what s5's answer-line loss covers."""
    counts = {len(tokenizer.encode(f"\n{ANSWER_CUE['ko']} {letter}", bos=False)) + 1 for letter in LETTERS}
    if len(counts) != 1:
        raise MedkoError(f"the answer line is {sorted(counts)} tokens long depending on its letter; this tokenizer "
                         f"needs one length")
    return counts.pop()


@torch.no_grad()
def reasoning_eval(model: Gemma3, tokenizer: Tokenizer, rows: Sequence[MCQ], max_new_tokens: int) -> dict[str, Any]:
    """Greedy reasoning on the dev exam: strict format compliance (the generation ends in the trained answer line,
    which it names once), the extraction cascade's looser compliance, and accuracy, with the per-question values."""
    model.eval()
    strict: list[bool] = []
    preds: list[str | None] = []
    for part, progress in windows(rows, "reasoning", True):  # a window's prompts and outputs at a time
        # One batch: decoding is step-bound on a CPU, so 24 rows cost about what 8 do.
        outputs = generate(model, tokenizer, [reasoning_prompt(r) for r in part], max_new_tokens, batch_size=64,
                           progress=progress)
        preds += [extract_answer(o) for o in outputs]
        strict += [strict_answer(o) is not None for o in outputs]
    correct = [p == r.answer for p, r in zip(preds, rows)]
    return {"compliance": mean(strict), "loose_compliance": sum(p is not None for p in preds) / len(rows),
            "accuracy": mean(correct), "strict": strict, "correct": correct}
