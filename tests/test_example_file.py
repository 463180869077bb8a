"""Tokenised examples on disk: the examples the in-memory build gave, with only their offsets resident."""
import logging
import tracemalloc

import pytest

from engine.examples import Example, ExampleFile, cut_middle_examples, lm_examples, text_examples
from engine.errors import MedkoError


def in_memory(tok, prompts, targets, max_len) -> list[Example]:
    """The examples as lm_examples built them in lists (before they went to disk)."""
    out = []
    for p, t in zip(prompts, targets):
        prompt, target = tok.encode(p), tok.encode(t, bos=False) + [tok.eos_id]
        ids, mask = (prompt + target)[:max_len], ([False] * len(prompt) + [True] * len(target))[:max_len]
        if any(mask):
            out.append(Example(ids, mask))
    return out


def test_examples_on_disk_equal_the_in_memory_ones(tiny_tokenizer, caplog):
    tok = tiny_tokenizer
    prompts = [f"Q{i}: {'why ' * (i % 7)}?" for i in range(150)] + ["a prompt far too long " * 8]
    targets = [" " + "고혈압 answer " * (i % 9) for i in range(150)] + [" lost"]
    with caplog.at_level(logging.INFO, logger="medko"):
        examples = lm_examples(tok, prompts, targets, max_len=48)
    assert isinstance(examples, ExampleFile)
    expected = in_memory(tok, prompts, targets, 48)
    truncated = sum(len(tok.encode(p)) + len(tok.encode(t, bos=False)) + 1 > 48 for p, t in zip(prompts, targets))
    assert f"truncated {truncated} of 151 examples to max_len 48 tokens; dropped 1 left with no target" in caplog.text
    assert len(examples) == len(expected) == 150 and list(examples) == expected
    assert examples[-1] == expected[-1] and examples[3:9] == expected[3:9]
    assert examples[0].ids.typecode == "i" and examples[0].target_mask.typecode == "b"

    texts = [f"text {i} " + "heart " * i for i in range(40)]
    plain = text_examples(tok, texts, max_len=48)
    both = examples + plain + examples[:2]
    assert len(both) == 192 and list(both) == expected + in_memory(tok, [""] * 40, texts, 48) + expected[:2]
    assert both[150] == plain[0] and both[-1] == expected[1]

    long = ["step " * 60, "short"]
    cut_examples, cut = cut_middle_examples(tok, ["Q?"] * 2, long, [" A"] * 2, max_len=40)
    assert cut == 1 and len(cut_examples[0].ids) == 40 and len(cut_examples[1].ids) < 40
    with pytest.raises(MedkoError, match="max_len 3"):
        lm_examples(tok, ["a long prompt"], ["x"], max_len=3)


@pytest.mark.parametrize("words", [2, 40])
def test_built_examples_keep_only_offsets_in_memory(tiny_tokenizer, words):
    # 20,000 texts of ~10 or ~200 tokens: in lists that was 5 bytes a token (1 and 20 MB) plus ~200 bytes an example;
    # on disk what stays is an offset per example, whatever the tokens.
    texts = [f"{i} " + "heart pumps " * words for i in range(20_000)]
    tracemalloc.start()
    try:
        examples = text_examples(tiny_tokenizer, texts, max_len=512)
        resident, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(examples) == 20_000 and len(examples[-1].ids) > words
    assert resident < 400_000 and peak < 1_500_000  # offsets (8 bytes an example) and one chunk of encodings
