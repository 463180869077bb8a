"""Batched greedy generation with the KV cache against a full-forward loop."""
import pytest
import torch

from engine.checkpoints import load_model
from engine.generate import generate, generate_ids, left_pad, lookup_draft
from engine.model import KVCache
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


def test_lookup_draft_copies_what_followed_the_latest_earlier_ngram():
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 4) == [7, 8, 1, 2]  # the latest match, longest n
    assert lookup_draft([5, 2, 3, 6, 4, 2, 3], 2) == [6, 4]  # only the last two tokens recur
    assert lookup_draft([1, 2, 3, 4], 3) == []  # nothing recurs
    assert lookup_draft([7, 7, 7], 5) == [7]  # a loop predicts itself, up to the context's end
    assert lookup_draft([1, 2, 1, 2], 0) == []


def forward_calls(model) -> list[int]:
    """Counts the model's forward passes (a list, so a test reads it after the calls)."""
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_drafted_decoding_equals_one_token_at_a_time_in_fewer_passes(tiny_dir, tiny_tokenizer):
    """Prompt-lookup drafts on a model that loops (as greedy decoding of this random model does) and on prompts
    that repeat: the same tokens as lookahead=0, for several batch sizes, in fewer forward passes."""
    model = load_model(tiny_dir)
    texts = ["abc abc abc abc abc", "정답은 B입니다 정답은 B입니다 and a longer tail past the window", "x",
             "Q: what? A: what? A:", "a much longer prompt that runs well beyond the tiny sliding window of eight"]
    rows = tiny_tokenizer.encode_batch(texts)
    args = ({tiny_tokenizer.eos_id}, tiny_tokenizer.pad_id, tiny_tokenizer.vocab_size)
    calls = forward_calls(model)
    for batch_size in (1, 2, None):
        calls[0] = 0
        plain = generate_ids(model, rows, 40, *args, batch_size=batch_size, lookahead=0)
        plain_calls, calls[0] = calls[0], 0
        assert generate_ids(model, rows, 40, *args, batch_size=batch_size) == plain
        assert calls[0] < 0.75 * plain_calls, (batch_size, calls[0], plain_calls)


@torch.no_grad()
def lockstep_greedy(model, rows, max_new_tokens, stop_ids, pad_id, vocab, stop_check=None) -> list[list[int]]:
    """The decoding medko had before rows could leave the batch: every row steps until all are done."""
    ids, mask = left_pad(rows, pad_id)
    cache = KVCache(model.config, len(rows), ids.shape[1] + max_new_tokens, torch.float32, torch.device("cpu"))
    hidden = model(ids, mask, cache=cache, return_logits=False).hidden[:, -1:]
    out = [[] for _ in rows]
    done = torch.zeros(len(rows), dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = model.logits(hidden)[:, -1, :vocab].argmax(-1)
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


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, None])
@pytest.mark.parametrize("prefill_rows", [3, 16])
def test_rows_leave_and_join_the_batch_without_changing_any_output(tiny_dir, tiny_tokenizer, batch_size,
                                                                   prefill_rows, monkeypatch):
    import engine.generate

    monkeypatch.setattr(engine.generate, "PREFILL_ROWS", prefill_rows)  # 3: joining rows prefill in parts
    model = load_model(tiny_dir)
    texts = ["abc", "정답은 B입니다 and a longer tail past the window", "x", "Q: what? A:", "zz top",
             "a much longer prompt that runs well beyond the tiny sliding window of eight", "B.", "hello"]
    rows = tiny_tokenizer.encode_batch(texts)
    finished = []
    # Rows end at different steps: by a stop token, by stop_check, or at the budget.
    # (This random model repeats a token for a while, then switches: the check ends a row at its first switch.)
    stop_ids = {tiny_tokenizer.eos_id, 98, 9}
    check = lambda ids: ids[-1] != ids[0]  # noqa: E731
    got = generate_ids(model, rows, 16, stop_ids, tiny_tokenizer.pad_id, tiny_tokenizer.vocab_size, check,
                       batch_size, on_done=finished.append)
    assert got == lockstep_greedy(model, rows, 16, stop_ids, tiny_tokenizer.pad_id, tiny_tokenizer.vocab_size, check)
    assert sorted(finished) == list(range(len(rows)))
    assert len({len(g) for g in got}) >= 5  # the rows really did finish at different steps


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
