"""The multiple-choice evaluator (lm-evaluation-harness kormedmcqa prompt and extraction) and translation.

Imports engine.distributed, engine.errors, engine.files, engine.fit, engine.model, engine.tokenizer, engine.data,
engine.generate and engine.translation_cache.
"""
from __future__ import annotations

import hashlib
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch

from engine import distributed
from engine.cloze import cloze_logprobs, cloze_predictions
from engine.data import LETTERS, MCQ
from engine.errors import MedkoError
from engine.files import write_json_atomic
from engine.fit import rows_that_fit
from engine.generate import generate, left_pad
from engine.model import Gemma3, model_device
from engine.tokenizer import Tokenizer, chat_prompt
from engine.translation_cache import TranslationCache

ANSWER_CUE = {"ko": "정답：", "en": "Answer:"}  # lm-eval's Korean cue ends in a full-width colon, U+FF1A
# lm-eval kormedmcqa generation_kwargs.until; Gemma's <eos> and <end_of_turn> also end generation.
STOP_STRINGS = ("Q:", "</s>", "<|im_end|>", ".", "\n\n")
# The KorMedMCQA paper's extraction cascade: first pattern that matches, last match wins. Two choices
# of ours: the first class also takes the full-width colon of our prompt (so "정답：C, A는..." gives C),
# and no IGNORECASE (lm-eval's copy has it), so the article "a" is never read as an answer.
# Python's \b is Unicode-aware: Hangul is a word character, so "C입니다" and "정답은C" give no match.
ANSWER_PATTERNS = [re.compile(p) for p in (r"정답[:：\s]*([ABCDE])", r"정답은\s*([ABCDE])\s*입니다",
                                           r"\b([ABCDE])\.", r"\b([ABCDE])\b")]
# lm-eval kormedmcqa v3.0's copy of the cascade, exactly: ASCII colon only, IGNORECASE, the match upper-cased.
HARNESS_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (r"정답[:\s]*([ABCDE])", r"정답은\s*([ABCDE])\s*입니다",
                                                           r"\b([ABCDE])\.", r"\b([ABCDE])\b")]
EXTRACTIONS = {"medko": ANSWER_PATTERNS, "harness": HARNESS_PATTERNS}
MODES = ("logits", "generate", "cloze")  # MCF's next letter, greedy generation, OLMES's cloze (engine.cloze)
# Questions scored at once: a split's prompts, token arrays and outputs are held a window at a time, so memory
# stays flat however large the split (each window is still length-sorted into batches).
WINDOW = 1024
T = TypeVar("T")
GENERATE_TOKENS = 1024  # lm-eval kormedmcqa's max_gen_toks: a shorter cap cuts long answers before their letter


def _check_lang(lang: str) -> None:
    if lang not in ANSWER_CUE:
        raise MedkoError(f"unknown language {lang!r}; use 'ko' or 'en'")


def question_block(row: MCQ, lang: str) -> str:
    """lm-eval's kormedmcqa doc_to_text: question, one line per option, then the answer cue."""
    lines = [row.question.strip()] + [f"{letter}. {text}" for letter, text in row.options.items()]
    return "\n".join(lines) + "\n" + ANSWER_CUE[lang]


def mcq_prompt(row: MCQ, lang: str = "ko", chat: bool = False, fewshot: Sequence[MCQ] = ()) -> str:
    """The harness prompt; few-shot examples come first as complete blocks "...정답： C\\n\\n"."""
    _check_lang(lang)
    # lm-eval's kormedmcqa fewshot_config puts the answer and "\n\n" into doc_to_text with an empty
    # doc_to_target, so its sampler adds neither target_delimiter nor fewshot_delimiter.
    shots = "".join(f"{question_block(ex, lang)} {ex.answer}\n\n" for ex in fewshot)
    text = shots + question_block(row, lang)
    return chat_prompt(text) if chat else text


def letter_token_ids(tokenizer: Tokenizer, chat: bool) -> list[int]:
    """The token of each answer letter as the model would write it next.

    After a raw prompt the answer follows a space ("정답： C", as in the few-shot blocks and lm-eval's
    target_delimiter " "), so "▁C"; at the start of a chat model turn there is no space, so "C".
    """
    ids = []
    for letter in LETTERS:
        pieces = tokenizer.encode(letter if chat else f" {letter}", bos=False)
        if len(pieces) != 1:
            raise MedkoError(f"answer letter {letter!r} is {len(pieces)} tokens in this tokenizer, not one; "
                             f"use --mode generate")
        ids.append(pieces[0])
    return ids


def extract_answer(text: str, extraction: str = "medko") -> str | None:
    """The answer letter in a generation, or None (counted wrong, never guessed); extraction "harness" is lm-eval
    kormedmcqa v3.0's."""
    if extraction not in EXTRACTIONS:
        raise MedkoError(f"unknown extraction {extraction!r}; use {' or '.join(EXTRACTIONS)}")
    for pattern in EXTRACTIONS[extraction]:
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return None


# The answer line s5 trains: the cue, one space, one letter, alone on the generation's last line.
ANSWER_LINE = re.compile(r"(?:^|\n)정답： ?([ABCDE])\s*$")
CUE_NAMED = re.compile(r"정답\s*[:：]")  # the cue itself: "정답" inside a word ("비정답", "정답률") is not it


def strict_answer(text: str) -> str | None:
    """The letter when the generation ends in the trained answer line and names the cue exactly once, else None.

    Stricter than extract_answer: a stray standalone letter ("비타민 A", "E. coli") or an echoed option list
    ("A. ...") is not an answer line, so it does not count as following the format.
    """
    found = ANSWER_LINE.search(text.rstrip())
    return found.group(1) if found and len(CUE_NAMED.findall(text)) == 1 else None


@torch.no_grad()
def letter_scores(model: Gemma3, tokenizer: Tokenizer, prompts: Sequence[str], chat: bool = False,
                  batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Next-token logits of A..E after each prompt [N, 5]: one forward per prompt, in length-sorted batches.

    Only the last position's five letter logits are computed, so no [T x vocab] or [N x vocab] logits are built.
    Under torchrun each rank scores its share of the prompts and the rows are gathered in order.
    """
    letters = torch.tensor(letter_token_ids(tokenizer, chat), device=model_device(model))
    rows = distributed.split_work(lambda part: list(_letter_scores(model, tokenizer, part, letters, batch_size,
                                                                   progress)), tokenizer.encode_compact(prompts), model)
    return torch.stack(rows)


def _letter_scores(model: Gemma3, tokenizer: Tokenizer, encoded: Sequence[Sequence[int]], letters: torch.Tensor,
                   batch_size: int, progress: bool) -> torch.Tensor:
    from tqdm import tqdm

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    scores = torch.empty(len(encoded), len(LETTERS))
    batch_size = rows_that_fit(model, "logits", batch_size, max((len(e) for e in encoded), default=1))
    for start in tqdm(range(0, len(order), batch_size), desc="score", unit="batch", disable=not progress,
                      file=sys.stderr):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad([encoded[i] for i in chunk], tokenizer.pad_id, model_device(model))
        hidden = model(ids, mask, return_logits=False).hidden[:, -1]  # left padding: last slot is real
        scores[chunk] = model.logits(hidden, letters).float().cpu()
    return scores


@dataclass
class Report:
    model: str  # name or path of the model scored
    mode: str  # logits, generate or cloze
    lang: str  # prompt language
    chat: bool  # prompts wrapped in Gemma's chat turns
    fewshot: list[str]  # ids of the few-shot examples available (each question uses its subset's)
    n: int
    accuracy: float  # micro-average over all questions
    subsets: dict[str, dict[str, float]]  # subset -> {"n", "accuracy"}
    macro_f1: float  # mean F1 over the letters that occur as gold or prediction
    format_compliance: float | None  # generate: fraction with an extracted letter; None in logits mode
    seconds: float
    questions_per_second: float
    predictions: list[dict[str, Any]]  # input order: id, subset, gold, pred (letter or None), correct[, output]
    # [, scores: cloze's per option "sum" log-probability, "per_char" (the prediction's) and "per_token"]
    extraction: str | None = None  # generate: "medko" (ours) or "harness" (lm-eval v3.0's); None in logits mode


def macro_f1(gold: Sequence[str], pred: Sequence[str | None]) -> float:
    labels = sorted(set(gold) | {p for p in pred if p})
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def check_cloze_prompt(mode: str, chat: bool, fewshot: Sequence[MCQ]) -> None:
    """Refuses cloze scoring ("cloze", or "all" which includes it) with chat turns or few-shot examples."""
    if mode in ("cloze", "all") and (chat or fewshot):
        raise MedkoError("cloze scoring uses the raw prompt `Question: ...\\nAnswer:` with no chat turns and no "
                         "few-shot examples; drop --chat and --fewshot, or use --mode logits, generate or both")


def evaluate(model: Gemma3, tokenizer: Tokenizer, rows: Sequence[MCQ], mode: str = "logits", lang: str = "ko",
             chat: bool = False, fewshot: Sequence[MCQ] = (), batch_size: int = 16,
             max_new_tokens: int = GENERATE_TOKENS, progress: bool = True, model_name: str = "",
             extraction: str = "medko", sink: Callable[[dict[str, Any]], None] | None = None) -> Report:
    """Scores multiple-choice rows with the harness prompt, WINDOW rows at a time.

    logits: the highest next-token logit among the row's letters. generate: greedy decoding cut at
    lm-eval's stop strings, then the extraction cascade. A question gets the few-shot examples of its own
    subset when there are any, else all of them. sink, when given, takes each prediction entry as it is made
    and the report's predictions stay empty: a split's outcomes then never sit in memory whole.
    """
    _check_lang(lang)
    if mode not in MODES:
        raise MedkoError(f"unknown evaluation mode {mode!r}; use {', '.join(MODES)}")
    check_cloze_prompt(mode, chat, fewshot)
    if not rows:
        raise MedkoError("no questions to evaluate; check the data source and split")
    start = time.perf_counter()
    golds: list[str] = []
    preds: list[str | None] = []
    predictions: list[dict[str, Any]] = []
    subsets: dict[str, dict[str, float]] = {}
    for part, inner in windows(rows, f"{mode} {lang}", progress):
        for entry in _score(model, tokenizer, part, mode, lang, chat, fewshot, batch_size, max_new_tokens, inner,
                            extraction):
            golds.append(entry["gold"])
            preds.append(entry["pred"])
            stats = subsets.setdefault(entry["subset"], {"n": 0, "correct": 0})
            stats["n"] += 1
            stats["correct"] += entry["correct"]
            (sink or predictions.append)(entry)
    seconds = time.perf_counter() - start
    subsets = {name: {"n": s["n"], "accuracy": s["correct"] / s["n"]} for name, s in sorted(subsets.items())}
    n = len(golds)
    return Report(
        model=model_name, mode=mode, lang=lang, chat=chat, fewshot=[f.id for f in fewshot], n=n,
        accuracy=sum(g == p for g, p in zip(golds, preds)) / n, subsets=subsets, macro_f1=macro_f1(golds, preds),
        format_compliance=sum(p is not None for p in preds) / n if mode == "generate" else None,
        seconds=seconds, questions_per_second=n / seconds if seconds > 0 else float("inf"), predictions=predictions,
        extraction=extraction if mode == "generate" else None)


def windows(rows: Sequence[T], desc: str, progress: bool) -> Iterator[tuple[list[T], bool]]:
    """The rows WINDOW at a time, each with whether its scorer shows a progress bar of its own: with one window it
    does (by batch, as before), with more one bar here counts the questions a window at a time."""
    from tqdm import tqdm

    several = len(rows) > WINDOW
    with tqdm(total=len(rows), desc=desc, unit="question", disable=not (progress and several),
              file=sys.stderr) as bar:
        for at in range(0, len(rows), WINDOW):
            part = list(rows[at:at + WINDOW])
            yield part, progress and not several
            bar.update(len(part))


def _score(model: Gemma3, tokenizer: Tokenizer, rows: list[MCQ], mode: str, lang: str, chat: bool,
           fewshot: Sequence[MCQ], batch_size: int, max_new_tokens: int, progress: bool, extraction: str
           ) -> list[dict[str, Any]]:
    """One window's prediction entries, in row order."""
    prompts = [mcq_prompt(r, lang, chat, [f for f in fewshot if f.subset == r.subset] or fewshot) for r in rows]
    outputs: list[str] | None = None
    details: list[dict[str, Any]] | None = None
    if mode == "cloze":
        details = cloze_predictions(rows, cloze_logprobs(model, tokenizer, rows, lang, max(1, batch_size // 2),
                                                         progress))
        preds = [d.pop("pred") for d in details]
    elif mode == "logits":
        scores = letter_scores(model, tokenizer, prompts, chat, batch_size, progress)
        present = torch.tensor([[letter in r.options for letter in LETTERS] for r in rows])
        best = scores.masked_fill(~present, float("-inf")).argmax(-1).tolist()
        preds: list[str | None] = [LETTERS[i] for i in best]
    else:
        outputs = generate(model, tokenizer, prompts, max_new_tokens, STOP_STRINGS, batch_size, progress)
        preds = [extract_answer(o, extraction) for o in outputs]
    predictions = [{"id": r.id, "subset": r.subset, "gold": r.answer, "pred": p, "correct": p == r.answer}
                   for r, p in zip(rows, preds)]
    if outputs is not None:
        for entry, output in zip(predictions, outputs):
            entry["output"] = output
    for entry, scores in zip(predictions, details or ()):
        entry["scores"] = scores
    return predictions


def agreement(a: Report | Mapping[str, Any], b: Report | Mapping[str, Any]) -> float:
    """Fraction of the shared ids whose predictions are equal (logits vs generate, Korean vs English)."""
    preds_a, preds_b = ({e["id"]: e["pred"] for e in (r.predictions if isinstance(r, Report) else r["predictions"])}
                        for r in (a, b))
    shared = preds_a.keys() & preds_b.keys()
    if not shared:
        raise MedkoError("the two reports share no question ids; compare reports of the same (parallel) rows")
    return sum(preds_a[i] == preds_b[i] for i in shared) / len(shared)


def choose_formulation(model: Gemma3, tokenizer: Tokenizer, rows: Sequence[MCQ]) -> dict[str, Any]:
    """OLMES's rule: the English dev exam scored in both formulations, the letter (MCF) and the cloze (CF) one; the
    higher decides for the gate, s1.1's stop and the English guard (a tie keeps the harness's letters)."""
    reports = {mode: evaluate(model, tokenizer, rows, mode, "en", progress=True) for mode in ("logits", "cloze")}
    chosen = "cloze" if reports["cloze"].accuracy > reports["logits"].accuracy else "logits"
    other = "logits" if chosen == "cloze" else "cloze"
    why = (f"English dev {reports[chosen].accuracy:.3f} in {chosen} against {reports[other].accuracy:.3f} in {other} "
           f"(n {reports[chosen].n}; OLMES: the formulation in which the base scores higher)")
    return {"formulation": chosen, "why": why, "reports": reports}


def write_report(report: Report, path: str | Path) -> None:
    write_json_atomic(asdict(report), path)


def format_table(report: Report) -> str:
    """Subset, n and accuracy, one line each, then the micro-average."""
    lines = [f"{'subset':<12}{'n':>6}{'accuracy':>10}"]
    lines += [f"{name:<12}{s['n']:>6}{s['accuracy']:>10.4f}" for name, s in report.subsets.items()]
    lines.append(f"{'all':<12}{report.n:>6}{report.accuracy:>10.4f}")
    return "\n".join(lines)


LANG_NAMES = {"ko": "Korean", "en": "English"}
# Two fixed examples show a base model the format; generation stops at the end of the line.
TRANSLATION_EXAMPLES = [
    {"ko": "만성 신장병 환자에서는 칼륨 섭취를 제한해야 한다.",
     "en": "Patients with chronic kidney disease should limit their potassium intake."},
    {"ko": "다음 중 가장 적절한 초기 치료는?", "en": "Which of the following is the most appropriate initial treatment?"},
]


def translation_prompt(text: str, to: str, chat: bool = False) -> str:
    if to not in LANG_NAMES:
        raise MedkoError(f"unknown target language {to!r}; use 'en' or 'ko'")
    src = "ko" if to == "en" else "en"
    if chat:
        return chat_prompt(f"Translate this {LANG_NAMES[src]} medical text into {LANG_NAMES[to]}. "
                           f"Reply with the translation only.\n\n{text}")
    shots = "".join(f"{LANG_NAMES[src]}: {ex[src]}\n{LANG_NAMES[to]}: {ex[to]}\n\n" for ex in TRANSLATION_EXAMPLES)
    return f"{shots}{LANG_NAMES[src]}: {text}\n{LANG_NAMES[to]}:"


TRANSLATION_MARGIN = 16  # new tokens a translated line may take beyond twice its source's


def failed_translation(text: str) -> str | None:
    """Why a translated line is unusable ("empty", "degenerate": one character repeated), or None."""
    if not text.strip():
        return "empty"
    squeezed = "".join(text.split())
    return "degenerate" if len(squeezed) > 3 and len(set(squeezed)) == 1 else None


def distinct_lines(texts: Sequence[str]) -> list[str]:
    """The non-empty lines of the texts, stripped, each once in first-seen order: what translate() translates."""
    return list(dict.fromkeys(line.strip() for text in texts for line in text.split("\n") if line.strip()))


def translate(model: Gemma3, tokenizer: Tokenizer, texts: Sequence[str], to: str = "en",
              cache_path: str | Path | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
              progress: bool = False, *, model_id: str, chat: bool = False,
              stats: dict[str, int] | None = None, cache: TranslationCache | None = None, bar: Any = None) -> list[str]:
    """Greedy translations, line by line (so a line break stops a base model without losing text).

    Each line may take twice its source's tokens plus a margin (at most max_new_tokens when given); `stats`, when
    given, receives the lines, those that used their whole budget (likely cut) and those that came back empty or
    degenerate, which keep their source text. Each line is cached under sha256(prompt + model_id) in a JSONL file
    appended after every batch, so an interrupted run resumes where it stopped. model_id must change whenever the
    weights do. `cache`: the file already indexed, and `bar`: a progress bar over every call's lines
    (translate_mcqs indexes the file once and shows one bar for all its chunks).
    """
    from tqdm import tqdm

    if cache is None:
        cache = TranslationCache(cache_path)
    split = [text.split("\n") for text in texts]
    prompts = {line: translation_prompt(line, to, chat) for line in distinct_lines(texts)}
    keys = {line: hashlib.sha256(f"{p}\0{model_id}".encode()).hexdigest() for line, p in prompts.items()}
    budget = {line: 2 * len(tokenizer.encode(line, bos=False)) + TRANSLATION_MARGIN for line in prompts}
    if max_new_tokens is not None:
        budget = {line: min(b, max_new_tokens) for line, b in budget.items()}
    done = dict(zip(prompts, cache.lookup([keys[line] for line in prompts])))  # None: not translated yet
    # Longest first, so each batch holds lines of similar length (and budget).
    todo = sorted((line for line, out in done.items() if out is None), key=lambda s: -len(s))
    shared = bar is not None
    if shared:
        bar.update(len(prompts) - len(todo))  # the cached lines
    else:
        bar = tqdm(total=len(todo), desc="translate", unit="line", disable=not progress, file=sys.stderr)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        outs = generate(model, tokenizer, [prompts[line] for line in chunk], max(budget[line] for line in chunk),
                        ["\n"], batch_size)
        entries = [{"key": keys[line], "src": line, "out": out.strip()} for line, out in zip(chunk, outs)]
        cache.add(entries)
        done.update((e["src"], e["out"]) for e in entries)
        bar.update(len(chunk))
    if not shared:
        bar.close()
    failed = {line: failed_translation(out) for line, out in done.items()}
    if stats is not None:
        stats["lines"] = stats.get("lines", 0) + len(done)
        stats["hit_budget"] = stats.get("hit_budget", 0) + sum(
            len(tokenizer.encode(out, bos=False)) >= budget[line] for line, out in done.items())
        for why in ("empty", "degenerate"):
            stats[why] = stats.get(why, 0) + sum(f == why for f in failed.values())
    return ["\n".join((line.strip() if failed[line.strip()] else done[line.strip()]) if line.strip() else line
                      for line in lines) for lines in split]


TRANSLATION_CHUNK = 256  # questions translated per call: memory holds one chunk's prompts, whatever the exam's size


def translate_mcqs(rows: Sequence[MCQ], model: Gemma3, tokenizer: Tokenizer, to: str = "en",
                   chunk: int = TRANSLATION_CHUNK, **kwargs: Any) -> Iterator[MCQ]:
    """The rows with question and options translated, yielded in order, `chunk` rows at a time (longest lines
    first within a chunk); ids, answers and meta unchanged. The cache file is indexed once for all chunks."""
    from tqdm import tqdm

    def texts(part: Sequence[MCQ]) -> list[str]:
        return [t for r in part for t in (r.question, *r.options.values())]

    chunks = [range(start, min(start + chunk, len(rows))) for start in range(0, len(rows), chunk)]
    lines = sum(len(distinct_lines(texts([rows[i] for i in c]))) for c in chunks)  # as translate() counts them
    path = kwargs.get("cache_path")
    cache = TranslationCache(path)
    with tqdm(total=lines, desc="translate", unit="line", disable=not kwargs.pop("progress", False),
              file=sys.stderr) as bar:
        for c in chunks:
            part = [rows[i] for i in c]
            done = iter(translate(model, tokenizer, texts(part), to, cache=cache, bar=bar, **kwargs))
            for row in part:
                question = next(done)
                options = {letter: next(done) for letter in row.options}
                yield replace(row, question=question, options=options, lang=to)
