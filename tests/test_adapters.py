"""Surgery, adapters, the teacher, losses and export on the tiny random Gemma 3."""
import copy
import importlib.util
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.adapters import LoRALinear, adapter_specs, add_language_embeddings, add_lora, additions_state_dict, apply_surgery, duplicate_edge_layers, korean_token_table, load_additions, merge_lora, quantize_base_4bit, snapshot_adapter, teacher_layer_map, teacher_mode
from engine.checkpoints import load_model, load_strict, read_checkpoint
from engine.errors import MedkoError
from engine.export import export_run
from engine.losses import ChunkedCrossEntropy, causal_lm_loss, layer_loss, letter_loss
from engine.model import FULL, Gemma3, SLIDING
from conftest import randomize, tiny_config

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def korean_ids(tokenizer) -> list[int]:
    return torch.nonzero(korean_token_table(tokenizer)).flatten().tolist()


def mixed_ids(tokenizer, batch: int = 2, length: int = 30, seed: int = 0) -> torch.Tensor:
    """Random ids with every third token Korean; longer than the tiny sliding window."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tokenizer.vocab_size, (batch, length), generator=gen)
    korean = torch.tensor(korean_ids(tokenizer))
    ids[:, ::3] = korean[torch.randint(len(korean), (batch, len(range(0, length, 3))), generator=gen)]
    return ids


def perturb(tensors, seed: int = 1, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=gen) * scale)


def surgered(model, tokenizer, delta: bool = True):
    add_lora(model, "lora1", rank=4, alpha=8)
    snapshot_adapter(model, "lora1", "teacher")
    add_language_embeddings(model, tokenizer, korean_delta=delta)
    duplicate_edge_layers(model)
    return model


# ───────────────────────────── LoRA ─────────────────────────────

def test_lora_keeps_base_keys_and_names_adapters(tiny_model):
    base_keys = set(tiny_model.state_dict())
    add_lora(tiny_model, "lora1", rank=4, alpha=8, targets=("q_proj", "down_proj"))
    keys = set(tiny_model.state_dict())
    assert base_keys <= keys
    assert "layers.0.self_attn.q_proj.lora_A.lora1" in keys and "layers.1.mlp.down_proj.lora_B.lora1" in keys
    assert not any("k_proj.lora" in k for k in keys)
    proj = tiny_model.layers[0].self_attn.q_proj
    assert isinstance(proj, LoRALinear) and proj.active == {"lora1"}
    a, b = proj.lora_A["lora1"], proj.lora_B["lora1"]
    assert a.shape == (4, 64) and b.shape == (64, 4) and not b.any()
    assert a.abs().max() <= 64 ** -0.5 and a.std() > 0  # Kaiming-uniform bound 1/sqrt(fan_in)
    assert adapter_specs(tiny_model)["lora1"].scaling == 2.0
    assert tiny_model.surgery == [{"op": "add_lora", "name": "lora1", "rank": 4, "alpha": 8.0, "dropout": 0.0,
                                   "targets": ["q_proj", "down_proj"]}]


def test_add_lora_refuses_bad_names_and_targets(tiny_model):
    add_lora(tiny_model, "lora1", rank=2)
    with pytest.raises(MedkoError, match="already has an adapter 'lora1'"):
        add_lora(tiny_model, "lora1")
    with pytest.raises(MedkoError, match="qproj"):
        add_lora(tiny_model, "lora2", targets=("qproj",))
    with pytest.raises(MedkoError, match="adapter name"):
        add_lora(tiny_model, "lora.2")


@pytest.mark.parametrize("additions", ["lora", "language", "language_delta", "edges", "all"])
def test_zero_initialised_additions_leave_logits_unchanged(tiny_model, tiny_tokenizer, additions):
    ids = mixed_ids(tiny_tokenizer)
    with torch.no_grad():
        want = tiny_model(ids).logits
    if additions in ("lora", "all"):
        add_lora(tiny_model, "lora1", rank=4, alpha=8)
    if additions in ("language", "language_delta", "all"):
        add_language_embeddings(tiny_model, tiny_tokenizer, korean_delta=additions != "language")
    if additions in ("edges", "all"):
        duplicate_edge_layers(tiny_model)
    with torch.no_grad():
        got = tiny_model(ids).logits
    assert rel_err(got, want) <= 1e-5


def unmerge_lora(state: dict, adapter: dict, name: str, scaling: float) -> dict:
    """The inverse of merge_lora, to check it: subtracts adapter `name` and puts its keys back (twice is a no-op)."""
    out = dict(state)
    suffix = f".lora_A.{name}"
    for a_key in [k for k in adapter if k.endswith(suffix)]:
        if a_key in out:
            continue
        prefix = a_key[:-len(suffix)]
        b_key, w_key = f"{prefix}.lora_B.{name}", f"{prefix}.weight"
        a, b, w = adapter[a_key], adapter[b_key], out[w_key]
        out[w_key] = (w.float() - scaling * (b.float() @ a.float())).to(w.dtype)
        out[a_key], out[b_key] = a, b
    return out


def test_merge_equals_unmerged_and_merging_twice_changes_nothing(tiny_model):
    add_lora(tiny_model, "lora1", rank=4, alpha=8)
    perturb(p for n, p in tiny_model.named_parameters() if ".lora_B." in n)
    ids = torch.randint(3, 500, (2, 20))
    with torch.no_grad():
        want = tiny_model(ids).logits
    state = tiny_model.state_dict()
    scaling = adapter_specs(tiny_model)["lora1"].scaling
    merged = merge_lora(state, "lora1", scaling)
    plain = Gemma3(tiny_model.config)
    load_strict(plain, merged, "merged weights")  # only base keys are left
    with torch.no_grad():
        assert rel_err(plain(ids).logits, want) <= 1e-5
    key = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[key], state[key])

    twice = merge_lora(merged, "lora1", scaling)
    assert twice.keys() == merged.keys() and all(torch.equal(twice[k], merged[k]) for k in merged)

    adapter = {k: v for k, v in state.items() if ".lora_" in k}
    unmerged = unmerge_lora(merged, adapter, "lora1", scaling)
    assert unmerged.keys() == state.keys()
    assert all(torch.allclose(unmerged[k], state[k], atol=1e-6) for k in state)
    again = unmerge_lora(unmerged, adapter, "lora1", scaling)
    assert all(torch.equal(again[k], unmerged[k]) for k in unmerged)


def test_only_chosen_parameters_train_and_frozen_ones_stay_bit_identical(tiny_model, tiny_tokenizer):
    model = tiny_model
    add_lora(model, "lora1", rank=4, alpha=8, dropout=0.1)
    snapshot_adapter(model, "lora1", "teacher")
    add_language_embeddings(model, tiny_tokenizer, korean_delta=True)

    def trainable(name: str) -> bool:
        return name.endswith((".lora_A.lora1", ".lora_B.lora1")) or name.startswith("language_embedding.")

    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = mixed_ids(tiny_tokenizer, length=24)
    mask = torch.ones_like(ids, dtype=torch.bool)
    model.train()
    for _ in range(3):
        loss, n = causal_lm_loss(model, model(ids, return_logits=False).hidden, ids, mask, vocab_slice=16)
        (loss / n).backward()
        opt.step()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == trainable(name), name
        opt.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != trainable(name), name


# ───────────────────────────── edge layers ─────────────────────────────

def test_duplicated_edges_copy_the_edge_layers_and_update_the_config(tiny_model):
    first, last = tiny_model.layers[0], tiny_model.layers[-1]
    duplicate_edge_layers(tiny_model)
    layers = tiny_model.layers
    assert [layer.added for layer in layers] == [True, False, False, True]
    assert layers[1] is first and layers[2] is last
    assert tiny_model.config.num_layers == 4
    assert tiny_model.config.layer_types == (SLIDING, SLIDING, FULL, FULL)
    for copy_, source in ((layers[0], first), (layers[3], last)):
        assert copy_.layer_type == source.layer_type
        assert torch.equal(copy_.self_attn.q_proj.weight, source.self_attn.q_proj.weight)  # copied, not zeroed
        assert copy_.self_attn.q_proj.weight.data_ptr() != source.self_attn.q_proj.weight.data_ptr()
        assert (copy_.post_attention_layernorm.weight == -1).all()
        assert (copy_.post_feedforward_layernorm.weight == -1).all()
        assert all(p.requires_grad for p in copy_.parameters())
    with pytest.raises(MedkoError, match="already has duplicated edge layers"):
        duplicate_edge_layers(tiny_model)


def projection_grads(model, steps: int = 3) -> list[dict[str, float]]:
    """Largest gradient of each added layer's projections and post norms per AdamW step on the added layers only."""
    for p in model.parameters():
        p.requires_grad_(False)
    added = [layer for layer in model.layers if layer.added]
    params = [p for layer in added for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(5))
    out = []
    for _ in range(steps):
        loss, n = causal_lm_loss(model, model(ids, return_logits=False).hidden, ids, torch.ones_like(ids))
        (loss / n).backward()
        out.append({f"{i}.{name.split('.')[-2]}": p.grad.abs().max().item()
                    for i, layer in enumerate(added) for name, p in layer.named_parameters()
                    if name.split(".")[-2] in PROJECTIONS + ("post_attention_layernorm", "post_feedforward_layernorm")})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def test_identity_edges_train_but_zeroed_projections_stall(tiny_model):
    zeroed = copy.deepcopy(tiny_model)
    duplicate_edge_layers(tiny_model)
    grads = projection_grads(tiny_model)
    # Step 1: 1 + w = 0 gates every projection, so only the post norms get gradient (as for any exact
    # identity start through a multiplicative gate); once they move, gradients reach every projection.
    assert all(v == 0 for k, v in grads[0].items() if k.split(".")[1] in PROJECTIONS)
    assert all(v > 0 for k, v in grads[0].items() if k.split(".")[1] not in PROJECTIONS)
    for step in grads[1:]:
        assert all(v > 0 for v in step.values()), step

    # The alternative identity start: post norms copied, projections zeroed. Every projection's input or
    # output side is then zero, so q/k/v/gate/up (and o/down and the norms) never get a gradient: a stall.
    originals = (zeroed.layers[0], zeroed.layers[-1])
    duplicate_edge_layers(zeroed)
    with torch.no_grad():
        for layer, source in zip((zeroed.layers[0], zeroed.layers[-1]), originals):
            layer.post_attention_layernorm.weight.copy_(source.post_attention_layernorm.weight)
            layer.post_feedforward_layernorm.weight.copy_(source.post_feedforward_layernorm.weight)
            for name, p in layer.named_parameters():
                if name.split(".")[-2] in PROJECTIONS:
                    p.zero_()
    for step in projection_grads(zeroed):
        assert all(v == 0 for v in step.values()), step


# ───────────────────────────── architecture record ─────────────────────────────

def test_surgery_record_and_additions_reload_to_identical_logits(tiny_dir, tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    model = surgered(load_model(tiny_dir), tiny_tokenizer)
    add_lora(model, "lora2", rank=2, alpha=2, dropout=0.1, targets=("q_proj", "v_proj"))
    perturb(additions_state_dict(model).values(), seed=7)
    save_file(additions_state_dict(model), str(tmp_path / "adapter.safetensors"))
    (tmp_path / "meta.json").write_text(json.dumps({"surgery": model.surgery}))

    fresh = load_model(tiny_dir)
    apply_surgery(fresh, json.loads((tmp_path / "meta.json").read_text())["surgery"], tiny_tokenizer)
    load_additions(fresh, load_file(str(tmp_path / "adapter.safetensors")))
    assert fresh.surgery == model.surgery
    assert fresh.config == model.config
    ids = mixed_ids(tiny_tokenizer)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_additions_are_exactly_the_non_base_parameters(tiny_dir, tiny_tokenizer):
    model = surgered(load_model(tiny_dir), tiny_tokenizer)
    keys = set(additions_state_dict(model))
    assert "language_embedding.korean" in keys and "language_embedding.korean_delta" in keys
    assert "layers.1.self_attn.q_proj.lora_A.teacher" in keys and "layers.0.mlp.up_proj.weight" in keys
    assert "layers.3.post_feedforward_layernorm.weight" in keys
    # After the first layer was duplicated, original layer i is layers.(i + 1).
    base = set()
    for key in read_checkpoint(tiny_dir):
        parts = key.split(".")
        if parts[0] == "layers":
            parts[1] = str(int(parts[1]) + 1)
        base.add(".".join(parts))
    assert set(model.state_dict()) - keys == base


def test_load_additions_and_replay_are_strict(tiny_dir, tiny_tokenizer):
    model = surgered(load_model(tiny_dir), tiny_tokenizer)
    state = additions_state_dict(model)
    missing = {k: v for k, v in state.items() if k != "language_embedding.english"}
    with pytest.raises(MedkoError, match="missing keys \\['language_embedding.english'\\]"):
        load_additions(model, missing)
    with pytest.raises(MedkoError, match="unexpected keys \\['extra.weight'\\]"):
        load_additions(model, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(MedkoError, match="language_embedding.korean has shape"):
        load_additions(model, {**state, "language_embedding.korean": torch.zeros(3)})
    with pytest.raises(MedkoError, match="unknown surgery op 'add_lorra'"):
        apply_surgery(load_model(tiny_dir), [{"op": "add_lorra", "name": "x"}])
    with pytest.raises(MedkoError, match="does not fit add_lora"):
        apply_surgery(load_model(tiny_dir), [{"op": "add_lora", "name": "x", "rnak": 4}])
    with pytest.raises(MedkoError, match="another tokenizer"):
        apply_surgery(load_model(tiny_dir), [{"op": "add_language_embeddings", "korean_delta": False,
                                                 "tokenizer_sha256": "0" * 64}], tiny_tokenizer)


# ───────────────────────────── language embeddings ─────────────────────────────

def test_korean_tokens_are_those_holding_hangul(tiny_tokenizer):
    table = korean_token_table(tiny_tokenizer)
    tid = tiny_tokenizer.token_id
    assert table[tid("정답")] and table[tid("다")]
    assert not table[tid("A")] and not table[tid("：")] and not table[tid("<0xEA>")] and not table[tid("<bos>")]
    assert korean_token_table(tiny_tokenizer) is table  # built once per tokenizer


def test_language_embeddings_add_by_language(tiny_model, tiny_tokenizer):
    add_language_embeddings(tiny_model, tiny_tokenizer, korean_delta=True)
    lang = tiny_model.language_embedding
    perturb([lang.korean, lang.english, lang.korean_delta])
    ko, en = tiny_tokenizer.token_id("정답"), tiny_tokenizer.token_id("A")
    assert lang.korean_delta.shape[0] == len(korean_ids(tiny_tokenizer))  # rows for Korean tokens only
    ids = torch.tensor([[ko, en]])
    lang.enabled = False
    plain = tiny_model.embed(ids)
    lang.enabled = True
    got = tiny_model.embed(ids) - plain
    row = korean_ids(tiny_tokenizer).index(ko)
    assert torch.allclose(got[0, 0], lang.korean + lang.korean_delta[row], atol=1e-6)
    assert torch.allclose(got[0, 1], lang.english, atol=1e-6)


# ───────────────────────────── teacher ─────────────────────────────

def test_teacher_is_the_model_as_it_entered_without_a_second_base_copy(tiny_model, tiny_tokenizer):
    model = tiny_model
    base = copy.deepcopy(model)
    add_lora(model, "lora1", rank=4, alpha=8)
    perturb((p for n, p in model.named_parameters() if ".lora_B." in n), seed=2)
    entered = copy.deepcopy(model)  # the model as it entered s2
    snapshot_adapter(model, "lora1", "teacher")
    add_language_embeddings(model, tiny_tokenizer, korean_delta=True)
    duplicate_edge_layers(model)
    perturb((v for k, v in additions_state_dict(model).items() if not k.endswith(".teacher")), seed=3)

    ids = mixed_ids(tiny_tokenizer)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :6] = False
    with torch.no_grad():
        want = entered(ids, mask, output_hidden_states=True)
        want_base = base(ids, mask, output_hidden_states=True)
        student = model(ids, mask, output_hidden_states=True)
    with teacher_mode(model) as teacher:
        got = teacher(ids, mask, output_hidden_states=True)
        inside = {p.data_ptr() for p in teacher.parameters()}
    with teacher_mode(model, adapter="no_such_snapshot"):
        got_base = model(ids, mask, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for mine, ref in zip(got.hidden_states + [got.logits], want.hidden_states + [want.logits]):
        assert rel_err(mine[mask], ref[mask]) <= 1e-5
    for mine, ref in zip(got_base.hidden_states, want_base.hidden_states):
        assert rel_err(mine[mask], ref[mask]) <= 1e-5
    with torch.no_grad():  # the student is back, additions and all
        assert torch.equal(model(ids, mask).logits, student.logits)
    assert rel_err(student.logits, want.logits) > 1e-3

    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(set(ptrs)) == len(ptrs) and inside <= set(ptrs)
    storage = sum(p.untyped_storage().nbytes() for p in model.parameters())
    base_bytes = sum(p.nbytes for p in base.parameters())
    assert storage == base_bytes + sum(v.nbytes for v in additions_state_dict(model).values())


def test_teacher_layer_map_and_zero_layer_loss_at_the_start(tiny_model, tiny_tokenizer):
    assert teacher_layer_map(tiny_model) == [0, 1, 2]
    add_lora(tiny_model, "lora1", rank=4)
    add_language_embeddings(tiny_model, tiny_tokenizer)
    duplicate_edge_layers(tiny_model)
    layer_map = teacher_layer_map(tiny_model)
    assert layer_map == [1, 2, 4]  # original layer i maps to layer i + 1; see teacher_layer_map for the edges
    ids = mixed_ids(tiny_tokenizer)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with teacher_mode(tiny_model):
        teacher = tiny_model(ids, output_hidden_states=True).hidden_states
    with torch.no_grad():
        student = tiny_model(ids, output_hidden_states=True).hidden_states
    assert len(student) == 5
    assert layer_loss(student, teacher, mask, layer_map).item() <= 1e-10


# ───────────────────────────── losses ─────────────────────────────

def lm_batch(tiny_model):
    ids = torch.randint(3, 500, (2, 20), generator=torch.Generator().manual_seed(3))
    attention = torch.ones_like(ids, dtype=torch.bool)
    attention[1, 15:] = False  # right padding
    targets = attention.clone()
    targets[:, :6] = False  # the prompt
    hidden = tiny_model(ids, attention, return_logits=False).hidden.detach().requires_grad_()
    return ids, targets, hidden


@pytest.mark.parametrize("row_chunk, vocab_slice", [(1, 7), (5, 1), (5, 100), (1024, 100), (1024, 100_000)])
def test_chunked_lm_loss_equals_full_logits_loss(tiny_model, row_chunk, vocab_slice):
    ids, targets, hidden = lm_batch(tiny_model)
    weight = tiny_model.embed_tokens.weight
    loss, n = causal_lm_loss(tiny_model, hidden, ids, targets, row_chunk=row_chunk, vocab_slice=vocab_slice)
    loss.backward()
    got = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad, weight.grad = None, None

    mask = targets[:, 1:]
    full = F.cross_entropy(tiny_model.logits(hidden)[:, :-1][mask].float(), ids[:, 1:][mask], reduction="sum")
    full.backward()
    assert n == int(mask.sum()) == 14 + 9
    assert rel_err(got[0], full.detach()) <= 1e-5
    assert rel_err(got[1], hidden.grad) <= 1e-5
    assert rel_err(got[2], weight.grad) <= 1e-5


def test_chunked_cross_entropy_in_bfloat16_agrees_to_bfloat16_rounding():
    """The GPU's dtype, run on CPU: bf16 slice matmuls, float32 running sums and gradient accumulator."""
    torch.manual_seed(0)
    hidden = torch.randn(50, 64, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(1000, 64) * 0.3).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 1000, (50,))
    loss = ChunkedCrossEntropy.apply(hidden, weight, targets, 16, 300)
    got = torch.autograd.grad(loss, (hidden, weight))
    full = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    want = torch.autograd.grad(full, (hidden, weight))
    assert rel_err(loss.detach(), full.detach()) <= 1e-5
    for mine, theirs in zip(got, want):
        assert mine.dtype == torch.bfloat16
        assert rel_err(mine.float(), theirs.float()) <= 1e-2


def test_chunked_lm_loss_keeps_no_logits_for_the_backward(tiny_model):
    ids, targets, hidden = lm_batch(tiny_model)
    vocab = tiny_model.config.vocab_size
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(tiny_model, hidden, ids, targets, vocab_slice=8)
    assert saved and not any(shape[-1] == vocab for shape in saved)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the plain loss does keep them
        F.cross_entropy(tiny_model.logits(hidden).flatten(0, 1), ids.flatten())
    assert any(shape[-1] == vocab for shape in saved)


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_layer_loss_zero_for_identical_positive_otherwise_and_ignores_padding(tiny_model, kind):
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :4] = False
    with torch.no_grad():
        states = tiny_model(ids, mask, output_hidden_states=True).hidden_states
    layer_map = teacher_layer_map(tiny_model)

    def loss(student):
        return layer_loss(student, states, mask, layer_map, kind=kind, model=tiny_model, sample_positions=9,
                          generator=torch.Generator().manual_seed(0)).item()

    gen = torch.Generator().manual_seed(1)
    noisy = [s + 0.5 * torch.randn(s.shape, generator=gen) * s.std() for s in states]
    pads_changed = [torch.where(mask[..., None], s, 3 * torch.randn(s.shape, generator=gen)) for s in noisy]
    assert loss(states) == 0
    assert loss(noisy) > 1e-4
    assert loss(pads_changed) == loss(noisy)


def test_layer_loss_mse_is_the_mean_over_layers_of_normalised_mse(tiny_model):
    gen = torch.Generator().manual_seed(2)
    student = [torch.randn(1, 3, 4, generator=gen) for _ in range(3)]
    teacher = [torch.randn(1, 3, 4, generator=gen) for _ in range(2)]
    mask = torch.tensor([[False, True, True]])

    def norm(x):
        return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()

    want = sum(((norm(student[s][0, 1:]) - norm(teacher[t][0, 1:])) ** 2).mean() for t, s in enumerate([0, 2])) / 2
    assert torch.allclose(layer_loss(student, teacher, mask, [0, 2]), want)
    with pytest.raises(MedkoError, match="'cosine'"):
        layer_loss(student, teacher, mask, [0, 2], kind="cosine")


def test_letter_loss_matches_a_hand_computation(tiny_model):
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(3, 6, 64, generator=gen)
    positions, gold, letters = torch.tensor([5, 2, 4]), torch.tensor([0, 3, 4]), [40, 41, 42, 43, 44]
    loss = letter_loss(tiny_model, hidden, positions, letters, gold)
    weight = tiny_model.embed_tokens.weight.detach()
    want = 0.0
    for b in range(3):
        logits = [hidden[b, positions[b]] @ weight[i] for i in letters]
        want += torch.logsumexp(torch.stack(logits), 0) - logits[gold[b]]
    assert torch.allclose(loss, want / 3)


# ───────────────────────────── export ─────────────────────────────

@pytest.mark.parametrize("case", ["all_h64", "all_h72", "lora_only"])
def test_export_loads_in_transformers_with_the_same_logits(tiny_dir, tiny_tokenizer, tmp_path, case):
    from safetensors.torch import load_file
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    # hidden 72: sqrt(72) is not exact, so the embedding fold must use Gemma's rounded scale
    model = randomize(Gemma3(tiny_config(hidden_size=72 if case == "all_h72" else 64))).eval()
    if case == "lora_only":
        add_lora(model, "lora1", rank=4, alpha=8)
    else:
        surgered(model, tiny_tokenizer)
    perturb(additions_state_dict(model).values(), seed=9)
    out = export_run(model, tmp_path / "export", tiny_dir / "tokenizer.json")

    hf = Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = mixed_ids(tiny_tokenizer)
    with torch.no_grad():
        assert rel_err(hf(ids).logits, model(ids).logits) <= 1e-5
    config = json.loads((out / "config.json").read_text())
    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k or "language" in k for k in weights)
    assert (out / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary directory left behind
    if case == "lora_only":
        assert config["tie_word_embeddings"] and "lm_head.weight" not in weights
    else:
        assert not config["tie_word_embeddings"] and config["num_hidden_layers"] == 4
        assert torch.equal(weights["lm_head.weight"], model.embed_tokens.weight)
    with pytest.raises(MedkoError, match="already exists"):
        export_run(model, out, tiny_dir / "tokenizer.json")


# ───────────────────────────── 4-bit base ─────────────────────────────

def test_quantize_needs_a_gpu_with_bitsandbytes(tiny_model):
    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("a GPU with bitsandbytes is here: the 4-bit test below runs instead")
    with pytest.raises(MedkoError, match="drop --quantize or run on a GPU"):
        quantize_base_4bit(tiny_model)


def test_4bit_weights_go_through_bitsandbytes(monkeypatch):
    calls = []

    def matmul_4bit(x, weight_t, quant_state):
        calls.append(quant_state)
        return x @ weight_t

    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(matmul_4bit=matmul_4bit))
    weight = nn.Parameter(torch.randn(6, 4), requires_grad=False)
    weight.quant_state = "nf4 state"  # what marks a bitsandbytes Params4bit
    proj = LoRALinear(weight)
    x = torch.randn(3, 4)
    assert torch.allclose(proj(x), x @ weight.T) and calls == ["nf4 state"]


@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")),
                    reason="needs a CUDA GPU with bitsandbytes")
def test_4bit_base_trains_lora_close_to_the_dense_model(tiny_model):
    model = tiny_model.to("cuda", torch.bfloat16)
    ids = torch.randint(3, 500, (2, 20), device="cuda")
    with torch.no_grad():
        dense = model(ids).logits.float()
    add_lora(model, "lora1", rank=4)
    quantize_base_4bit(model)
    loss, n = causal_lm_loss(model, model(ids, return_logits=False).hidden, ids, torch.ones_like(ids))
    (loss / n).backward()
    assert model.layers[0].self_attn.q_proj.lora_B["lora1"].grad.abs().max() > 0
    with torch.no_grad():
        assert rel_err(model(ids).logits.float(), dense) < 0.5  # NF4 error, far below a wiring mistake


@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")),
                    reason="needs a CUDA GPU with bitsandbytes")
def test_4bit_load_layer_by_layer_equals_quantizing_the_loaded_model(tiny_dir):
    streamed = load_model(tiny_dir, "cuda", quantize=True)  # read on the host, one layer at a time to the GPU
    whole = quantize_base_4bit(load_model(tiny_dir, "cuda"))
    assert all(p.device.type == "cuda" for p in streamed.parameters())
    ids = torch.randint(3, 500, (2, 20), device="cuda")
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, whole(ids).logits)
