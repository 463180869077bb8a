"""The hand-written Gemma 3 against transformers' Gemma3ForCausalLM on random tiny configs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataclasses import asdict
from engine.errors import MedkoError
from engine.linear import _ONEDNN_LINEAR, linear
from engine.model import FULL, Gemma3, KVCache, ModelConfig, PRESETS, SLIDING, compute_dtype
from conftest import hf_twin, randomize, tiny_config


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


CONFIGS = {
    "gqa_sliding_full": dict(),
    "six_layers_no_scaling": dict(num_layers=6, layer_types=(), global_rope_scaling=1.0, sliding_window=5),
    "mha_head_scalar": dict(num_kv_heads=4, query_pre_attn_scalar=24, local_rope_theta=500.0),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_hidden_states_match_transformers(name):
    torch.manual_seed(1)
    model = randomize(Gemma3(tiny_config(**CONFIGS[name])), seed=3).eval()
    assert {l.layer_type for l in model.layers} == {SLIDING, FULL}
    hf = hf_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 3 * model.config.sliding_window + 5))
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True)
        ref = hf(ids, output_hidden_states=True)
    assert rel_err(ours.logits, ref.logits) <= 1e-5
    assert len(ours.hidden_states) == len(ref.hidden_states) == model.config.num_layers + 1
    # transformers' last entry is after the final norm; ours is the raw layer output, with the normed one in .hidden
    for mine, theirs in zip(ours.hidden_states[:-1], ref.hidden_states[:-1]):
        assert rel_err(mine, theirs) <= 1e-5
    assert rel_err(ours.hidden, ref.hidden_states[-1]) <= 1e-5


def test_left_padded_batch_equals_rows_alone(tiny_model):
    torch.manual_seed(2)
    lengths = [21, 9, 14]
    rows = [torch.randint(3, 500, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, True
    with torch.no_grad():
        batched = tiny_model(ids, mask).logits
        for i, row in enumerate(rows):
            alone = tiny_model(row[None]).logits[0]
            assert rel_err(batched[i, width - len(row):], alone) <= 1e-5


def test_right_padded_batch_equals_rows_alone(tiny_model):
    torch.manual_seed(3)
    rows = [torch.randint(3, 500, (n,)) for n in (17, 6)]
    ids = torch.zeros(2, 17, dtype=torch.long)
    mask = torch.zeros(2, 17, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, True
    with torch.no_grad():
        batched = tiny_model(ids, mask).logits
        for i, row in enumerate(rows):
            assert rel_err(batched[i, :len(row)], tiny_model(row[None]).logits[0]) <= 1e-5
    assert torch.isfinite(batched).all()


def test_cached_decoding_equals_full_forward(tiny_model):
    torch.manual_seed(4)
    ids = torch.randint(3, 500, (2, 30))  # longer than the window of 8
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :5] = False  # left padding in row 1
    with torch.no_grad():
        full = tiny_model(ids, mask).logits
        cache = KVCache(tiny_model.config, 2, 40, torch.float32, torch.device("cpu"))
        steps = [tiny_model(ids[:, :12], mask[:, :12], cache=cache).logits]
        for t in range(12, 30):
            steps.append(tiny_model(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache).logits)
    stepped = torch.cat(steps, dim=1)
    assert rel_err(stepped[0], full[0]) <= 1e-5
    assert rel_err(stepped[1, 5:], full[1, 5:]) <= 1e-5


def test_float16_is_refused():
    with pytest.raises(MedkoError, match="float16"):
        compute_dtype("cpu", torch.float16)
    assert compute_dtype("cpu") == torch.float32
    assert compute_dtype("cuda") == torch.bfloat16


def test_unknown_config_key_is_an_error():
    with pytest.raises(MedkoError, match="hiden_size"):
        ModelConfig.from_dict({**asdict(PRESETS["tiny"]), "hiden_size": 3})


def test_cpu_linear_takes_onednn_and_matches_f_linear_with_gradients():
    """medko's float32 CPU matmul is oneDNN's, not F.linear's: same values and gradients to float32 rounding."""
    assert _ONEDNN_LINEAR, "this torch build lacks oneDNN's linear; medko would fall back to F.linear"
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, requires_grad=True)
    w = torch.randn(96, 64, requires_grad=True)
    out = linear(x, w)
    assert out.grad_fn is not None and "OneDNN" in type(out.grad_fn).__name__
    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    ref = torch.nn.functional.linear(x, w)
    rx, rw = torch.autograd.grad(ref, (x, w), grad)
    for mine, theirs in ((out, ref), (gx, rx), (gw, rw)):
        assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    frozen = linear(x, w.detach())  # a frozen weight: only the input's gradient, no saved input
    assert torch.autograd.grad(frozen.sum(), x)[0].shape == x.shape


def test_head_over_a_vocab_subset_equals_those_columns(tiny_model):
    hidden = torch.randn(4, tiny_model.config.hidden_size)
    vocab = torch.tensor([7, 3, 50])
    full = tiny_model.logits(hidden)
    assert torch.allclose(tiny_model.logits(hidden, vocab), full[:, vocab], rtol=1e-6, atol=1e-6)


def probe_output(code: str, env: dict[str, str]) -> str:
    """What `python -c code` prints, run fresh from the repository root: settings read at import time apply."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1], env=env).stdout.strip()


def test_medko_onednn_0_turns_onednn_off():
    probe = "import engine.linear; print(engine.linear._ONEDNN_LINEAR)"
    for value, expected in (("0", "False"), ("1", "True")):
        assert probe_output(probe, {**os.environ, "MEDKO_ONEDNN": value}) == expected


def test_onednn_caches_stay_small_over_many_input_shapes():
    """oneDNN keeps what it built for each input shape; medko caps its two caches (engine/linear.py), so that 400
    lengths cost what a few do. With oneDNN's default capacities (1,024 each) the same loop grows by ~230 MiB."""
    probe = ("import ctypes, torch, engine.linear as L\n"
             "def rss():\n"
             "    ctypes.CDLL('libc.so.6').malloc_trim(0)\n"  # freed memory back first: only what is held counts
             "    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
             "w = torch.randn(2048, 256)\n"
             "with torch.no_grad():\n"
             "    [L.linear(torch.randn(m, 256), w) for m in range(1, 9)]\n"
             "    start = rss()\n"
             "    [L.linear(torch.randn(m, 256), w) for m in range(9, 409)]\n"
             "print(rss() - start)")
    caches = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    env = {k: v for k, v in os.environ.items() if k not in caches}
    grown = {None: float(probe_output(probe, env)),
             "1024": float(probe_output(probe, {**env, **dict.fromkeys(caches, "1024")}))}
    assert grown[None] < 64 and grown["1024"] > 3 * grown[None] + 64, grown  # MiB
