"""Batched greedy generation with the KV cache against a full-forward loop."""
import torch

from engine.checkpoints import load_model
from engine.generate import generate, generate_ids
from engine.tokenizer import chat_prompt


def naive_greedy(model, ids: list[int], n: int, stop_ids: set[int], vocab: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(torch.tensor([ids + out])).logits[0, -1, :vocab].argmax().item()
            if nxt in stop_ids:
                break
            out.append(nxt)
    return out


def test_cached_batched_generation_equals_full_forward_loop(tiny_dir, tiny_tokenizer):
    model = load_model(tiny_dir)
    prompts = ["정답: A B", "Hello there, this prompt is longer than the sliding window", "x"]
    rows = tiny_tokenizer.encode_batch(prompts)
    stop = {tiny_tokenizer.eos_id}
    got = generate_ids(model, rows, 20, stop, tiny_tokenizer.pad_id, tiny_tokenizer.vocab_size)
    for row, ids in zip(rows, got):
        assert ids == naive_greedy(model, row, 20, stop, tiny_tokenizer.vocab_size)
    assert max(len(g) for g in got) > 0


def test_generate_batched_equals_unbatched_and_cuts_at_stop(tiny_dir, tiny_tokenizer):
    model = load_model(tiny_dir)
    prompts = ["abc", "정답은 B입니다", "Q: what? A:", "zz top"]
    together = generate(model, tiny_tokenizer, prompts, max_new_tokens=12, batch_size=4)
    alone = [generate(model, tiny_tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert together == alone
    first = together[0]
    assert len(first) >= 2
    cut = generate(model, tiny_tokenizer, [prompts[0]], max_new_tokens=12, stop=[first[1]])[0]
    assert cut == first[:first.index(first[1])]


def test_chat_prompt_uses_gemma_turns(tiny_tokenizer):
    text = chat_prompt("hi")
    assert text == "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    ids = tiny_tokenizer.encode(text)
    assert ids[0] == tiny_tokenizer.bos_id and tiny_tokenizer.token_id("<start_of_turn>") in ids
