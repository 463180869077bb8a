"""The training loop on the tiny model: exact resume, Ctrl-C, token-weighted accumulation, checkpoints."""
import errno
import json
import logging
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import engine.train_checkpoints
from engine.errors import MedkoError
import engine.files
import engine.trainer
from engine.adapters import duplicate_edge_layers
from engine.model import Gemma3
from engine.train_checkpoints import (CHECKPOINTS, KEEP, OPTIMIZER, STATE, WEIGHTS, checkpoints, latest_checkpoint,
                                      trainable_state)
from engine.examples import Example, collate, lm_examples, text_examples
from engine.trainer import METRICS, TrainConfig, batch_at, lr_at, set_trainable, train
from conftest import randomize, tiny_config

# A decayed matrix, a whole MLP and an undecayed norm, so both optimizer groups are exercised.
PATTERNS = ["layers.0.self_attn.q_proj.weight", "layers.1.mlp.*", "layers.*.input_layernorm.weight"]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are microseconds long; a second thread only adds contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh_model(patterns=PATTERNS) -> Gemma3:
    torch.manual_seed(0)
    model = randomize(Gemma3(tiny_config()))
    set_trainable(model, patterns)
    return model


def ce_loss(model, batch, dropout: float = 0.0):
    """Masked next-token cross-entropy; the dropout makes resume depend on the restored RNG state."""
    logits = F.dropout(model(batch["input_ids"], batch["attention_mask"]).logits, dropout, model.training)
    mask = batch["target_mask"][:, 1:]
    loss_sum = F.cross_entropy(logits[:, :-1][mask].float(), batch["input_ids"][:, 1:][mask], reduction="sum")
    return loss_sum, int(mask.sum()), {"targets_per_row": mask.sum(1).float().mean()}


def noisy_loss(model, batch):
    return ce_loss(model, batch, dropout=0.2)


@pytest.fixture
def examples(tiny_tokenizer):
    prompts = [f"Question {i}: what is {'x' * (i % 4)}?\nAnswer:" for i in range(10)]
    targets = [" " + "medical text " * (1 + i % 3) for i in range(10)]
    return lm_examples(tiny_tokenizer, prompts, targets, max_len=64)


def config(**overrides) -> TrainConfig:
    values = dict(max_steps=6, batch_size=2, grad_accum=2, lr=1e-2, weight_decay=0.1, warmup_steps=3,
                  min_lr_ratio=0.1, clip_norm=1.0, max_len=64, seed=5, log_every=1, save_every=2, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def only_checkpoint(out_dir: Path) -> Path:
    """The newest checkpoint; beside it at most the previous one is kept (KEEP)."""
    found = checkpoints(out_dir)
    assert 1 <= len(found) <= KEEP, found
    return found[0]


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / METRICS).read_text().splitlines()]


def assert_same_run(model_a, dir_a: Path, model_b, dir_b: Path) -> None:
    """Bit-identical trainable weights, optimizer state and per-step training metrics."""
    a, b = trainable_state(model_a), trainable_state(model_b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    opt_a = torch.load(only_checkpoint(dir_a) / OPTIMIZER, weights_only=True)
    opt_b = torch.load(only_checkpoint(dir_b) / OPTIMIZER, weights_only=True)
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, tensors in opt_a["state"].items():
        assert tensors.keys() == opt_b["state"][index].keys()
        for key, tensor in tensors.items():
            assert torch.equal(tensor, opt_b["state"][index][key]), (index, key)
    fields = ("step", "loss", "lr", "grad_norm", "tokens", "targets_per_row")
    strip = [[{k: m.get(k) for k in fields} for m in metrics(d)] for d in (dir_a, dir_b)]
    assert strip[0] == strip[1]


def test_resume_is_bit_identical(tmp_path, examples):
    # The cosine spans max_steps, so a shorter first run would see another schedule; a constant lr after
    # warm-up lets the first run stop by max_steps while its warm-up still runs.
    cfg = config(min_lr_ratio=1.0)
    straight = fresh_model()
    train(straight, noisy_loss, examples, cfg, tmp_path / "straight")

    train(fresh_model(), noisy_loss, examples, replace(cfg, max_steps=2), tmp_path / "resumed")
    assert only_checkpoint(tmp_path / "resumed").name == "step-00000002"
    resumed = fresh_model()
    summary = train(resumed, noisy_loss, examples, cfg, tmp_path / "resumed", resume=True)
    assert summary["steps"] == 6
    assert_same_run(straight, tmp_path / "straight", resumed, tmp_path / "resumed")


def test_interrupt_saves_last_step_and_resumes_identically(tmp_path, examples):
    cfg = config(save_every=2)
    straight = fresh_model()
    train(straight, noisy_loss, examples, cfg, tmp_path / "straight")

    calls = 0

    def interrupted_loss(model, batch):
        nonlocal calls
        calls += 1
        if calls == 3 * cfg.grad_accum + 2:  # the second micro-batch of update 3 (0-based)
            raise KeyboardInterrupt
        return noisy_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), interrupted_loss, examples, cfg, tmp_path / "resumed")
    checkpoint = only_checkpoint(tmp_path / "resumed")
    assert checkpoint.name == "step-00000003"  # step 2's periodic checkpoint stays beside it, the fallback
    assert [p.name for p in checkpoints(tmp_path / "resumed")] == ["step-00000003", "step-00000002"]
    assert json.loads((checkpoint / STATE).read_text())["step"] == 3
    resumed = fresh_model()
    train(resumed, noisy_loss, examples, cfg, tmp_path / "resumed", resume=True)
    assert_same_run(straight, tmp_path / "straight", resumed, tmp_path / "resumed")


def test_accumulation_weights_every_target_token_alike(tmp_path, tiny_tokenizer):
    # Two short-target and two long-target examples: a mean per micro-batch would weight the two
    # short targets' tokens far more than the long ones'.
    rows = lm_examples(tiny_tokenizer, ["Q: a?\nA:", "Q: b?\nA:", "Q: c?\nA:", "Q: d?\nA:"],
                          [" B", " C", " long answer " * 4, " other answer " * 4], max_len=128)
    counts = [sum(e.target_mask) for e in rows]
    assert counts[0] < counts[2] // 10
    total = sum(counts)

    def run(name, batch_size, grad_accum, loss_fn, **overrides):
        cfg = config(max_steps=1, batch_size=batch_size, grad_accum=grad_accum, warmup_steps=0, max_len=128,
                     **overrides)
        model = fresh_model(["layers.1.mlp.*"])
        train(model, loss_fn, lambda step, micro: collate(rows[micro * batch_size:(micro + 1) * batch_size]),
                 cfg, tmp_path / name)
        return trainable_state(model)

    def mean_per_micro_batch(model, batch):
        loss_sum, n, extras = ce_loss(model, batch)
        return loss_sum * total / (2 * n), n, extras  # the trainer's / total turns this into a mean of means

    whole = run("whole", 4, 1, ce_loss)
    accumulated = run("accumulated", 2, 2, ce_loss)
    means = run("means", 2, 2, mean_per_micro_batch)
    checkpointed = run("checkpointed", 2, 2, ce_loss, gradient_checkpointing=True)
    # Adam's first step is about lr * sign(gradient): summation-order noise moves weights by far less
    # than lr / 1000, while the mean of means flips signs and moves thousands of them by 2 * lr.
    for name in whole:
        assert torch.allclose(whole[name], accumulated[name], rtol=0, atol=1e-5), name
        assert torch.equal(accumulated[name], checkpointed[name]), name
    assert sum(int(((whole[n] - means[n]).abs() > 1e-2).sum()) for n in whole) > 100


def test_frozen_parameters_stay_bit_identical(tmp_path, examples, caplog):
    model = fresh_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 + 3 + 2
    with caplog.at_level(logging.INFO, logger="medko"):
        summary = train(model, ce_loss, examples, config(max_steps=3), tmp_path)
    assert "frozen" in caplog.text
    assert summary["trainable"] == sum(before[n].numel() for n in trainable)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (name in trainable), name
    checkpoint = only_checkpoint(tmp_path)
    assert sorted(load_file(str(checkpoint / WEIGHTS))) == sorted(trainable)
    optimizer = torch.load(checkpoint / OPTIMIZER, weights_only=True)
    assert len(optimizer["state"]) == len(trainable)
    decay = {g["weight_decay"]: len(g["params"]) for g in optimizer["param_groups"]}
    assert decay == {0.1: 4, 0.0: 2}  # norm weights are never decayed

    with pytest.raises(MedkoError, match="no_such"):
        set_trainable(model, ["layers.*.no_such.weight"])


def test_added_layers_train_at_their_own_rate(tmp_path, examples):
    """added_lr_scale multiplies the rate of the duplicated layers' parameters only: one AdamW step moves each
    element by about its group's rate (the first step's m / sqrt(v) is the gradient's sign)."""
    torch.manual_seed(0)
    model = duplicate_edge_layers(randomize(Gemma3(tiny_config())))
    last = len(model.layers) - 1
    set_trainable(model, ["layers.0.*", f"layers.{last}.*", "layers.1.input_layernorm.weight",
                          "layers.1.mlp.up_proj.weight"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, ce_loss, examples, config(max_steps=1, warmup_steps=0, lr=1e-4, weight_decay=0.0,
                                           added_lr_scale=30.0), tmp_path)
    now = dict(model.named_parameters())
    moved = {n: float((now[n].detach() - old).abs().max()) for n, old in before.items()}
    is_added = lambda name: name.startswith(("layers.0.", f"layers.{last}."))  # noqa: E731
    for name, value in moved.items():  # an added layer's projections get no gradient until its norm gains move
        assert value <= (30e-4 if is_added(name) else 1e-4) * 1.001, name
    assert max(v for n, v in moved.items() if is_added(n)) == pytest.approx(30e-4, rel=1e-3)
    assert max(v for n, v in moved.items() if not is_added(n)) == pytest.approx(1e-4, rel=1e-3)
    assert {g["lr_scale"] for g in torch.load(only_checkpoint(tmp_path) / OPTIMIZER,
                                              weights_only=True)["param_groups"]} == {1.0, 30.0}


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == pytest.approx(1.0)
    assert lr_at(9, cfg) == pytest.approx(0.55)
    assert lr_at(13, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.9 * math.pi)))
    assert lr_at(14, cfg) == pytest.approx(0.1)
    assert lr_at(7, replace(cfg, min_lr_ratio=1.0)) == 1.0


def test_metrics_and_checkpoint_crash_safety(tmp_path, examples, monkeypatch):
    cfg = config(max_steps=4, log_every=2, save_every=2)
    reference = fresh_model()
    summary = train(reference, ce_loss, examples, cfg, tmp_path / "reference")
    lines = metrics(tmp_path / "reference")
    assert [line["step"] for line in lines] == [2, 4]
    for line in lines:
        assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed", "targets_per_row"} <= line.keys()
        assert line["lr"] == lr_at(line["step"] - 1, cfg)
    assert summary["steps"] == 4 and summary["loss"] > 0 and summary["tokens"] == lines[1]["tokens"]

    # A disk that fills while step 4's checkpoint is half written leaves step 2's, and nothing else, and says so
    # in one sentence naming the file and the cause.
    def disk_full(path, mode="r", *args, **kwargs):
        if "step-00000004" in str(path) and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(engine.train_checkpoints, "open", disk_full, raising=False)
    with pytest.raises(MedkoError, match=r"could not write checkpoint .*step-00000004: No space left on device "
                                         r"\(.*\.tmp-step-00000004-.*adapter\.safetensors\)"):
        train(fresh_model(), ce_loss, examples, cfg, tmp_path / "crashed")
    monkeypatch.delattr(engine.train_checkpoints, "open")
    assert only_checkpoint(tmp_path / "crashed").name == "step-00000002"

    # A temporary directory left by a killed save is never resumed from, however new its step.
    leftover = tmp_path / "crashed" / CHECKPOINTS / ".tmp-step-00000009-abc"
    leftover.mkdir()
    (leftover / STATE).write_text("{half")
    assert latest_checkpoint(tmp_path / "crashed").name == "step-00000002"
    resumed = fresh_model()
    train(resumed, ce_loss, examples, cfg, tmp_path / "crashed", resume=True)
    assert not leftover.exists()
    for name, tensor in trainable_state(reference).items():
        assert torch.equal(tensor, trainable_state(resumed)[name]), name
    # Step 4's line, logged before the crash, is dropped on resume and written once more.
    fields = ("step", "loss", "lr", "grad_norm", "tokens")
    assert [{k: m[k] for k in fields} for m in metrics(tmp_path / "crashed")] == \
        [{k: m[k] for k in fields} for m in lines]


def test_resume_refusals(tmp_path, examples):
    with pytest.raises(MedkoError, match="no checkpoint"):
        train(fresh_model(), ce_loss, examples, config(), tmp_path, resume=True)
    train(fresh_model(), ce_loss, examples, config(max_steps=2), tmp_path)
    with pytest.raises(MedkoError, match="already holds"):
        train(fresh_model(), ce_loss, examples, config(max_steps=2), tmp_path)
    with pytest.raises(MedkoError, match="'lr'.*'seed'"):
        train(fresh_model(), ce_loss, examples, config(lr=1e-3, seed=6), tmp_path, resume=True)
    # A checkpoint written before a config field existed ran at that field's default: it resumes at the default
    # and is refused at another value.
    state_file = only_checkpoint(tmp_path) / STATE
    state = json.loads(state_file.read_text())
    del state["config"]["added_lr_scale"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(MedkoError, match="'added_lr_scale': \\(1.0, 30.0\\)"):
        train(fresh_model(), ce_loss, examples, config(max_steps=3, added_lr_scale=30.0), tmp_path, resume=True)
    assert train(fresh_model(), ce_loss, examples, config(max_steps=3), tmp_path, resume=True)["steps"] == 3
    with pytest.raises(MedkoError, match="lr_max"):
        TrainConfig.from_dict({"lr_max": 1.0})


def test_examples_are_encoded_a_chunk_at_a_time_and_kept_compact(tiny_tokenizer, monkeypatch):
    """However many texts a stage reads, tokenizers' Encoding objects (~100 bytes a token) live one chunk at a time,
    and the examples keep 4 bytes an id and 1 a mask entry; the ids are those of encoding each text alone."""
    texts = [f"혈압 {i} " * (1 + i % 9) for i in range(150)]
    real, sizes = tiny_tokenizer.tok, []

    class Recording:
        def encode_batch(self, batch, **kwargs):
            sizes.append(len(batch))
            return real.encode_batch(batch, **kwargs)

    monkeypatch.setattr(tiny_tokenizer, "tok", Recording())
    examples = text_examples(tiny_tokenizer, texts, max_len=64)
    monkeypatch.setattr(tiny_tokenizer, "tok", real)
    assert sum(sizes) == 2 * len(texts) and max(sizes) <= 64  # the prompts ("") and the texts, 64 at a time
    for text, e in zip(texts, examples):
        assert list(e.ids) == (tiny_tokenizer.encode(text) + [tiny_tokenizer.eos_id])[:64]
        assert e.ids.itemsize == 4 and e.target_mask.itemsize == 1


def test_lm_examples_mask_prompts_and_truncate(tiny_tokenizer, caplog):
    tok = tiny_tokenizer
    (qa, text), = [lm_examples(tok, ["Q: 1+1?\nA:", ""], [" 2", "plain text"], max_len=64)]
    prompt = tok.encode("Q: 1+1?\nA:")
    assert list(qa.ids) == prompt + tok.encode(" 2", bos=False) + [tok.eos_id]
    assert list(qa.target_mask) == [False] * len(prompt) + [True] * (len(qa.ids) - len(prompt))
    assert text.ids[0] == tok.bos_id and list(text.target_mask) == [False] + [True] * (len(text.ids) - 1)

    with caplog.at_level(logging.INFO, logger="medko"):
        short = lm_examples(tok, ["Q: 1+1?\nA:", "a much longer prompt that fills the window"], [" 2", " x"],
                               max_len=len(prompt) + 1)
    assert len(short) == 1 and len(short[0].ids) == len(prompt) + 1 and sum(short[0].target_mask) == 1
    assert "truncated 2 of 2" in caplog.text and "dropped 1" in caplog.text
    with pytest.raises(MedkoError, match="max_len"):
        lm_examples(tok, ["a long prompt"], ["x"], max_len=3)

    batch = collate([qa, text])
    assert batch["input_ids"].shape == (2, max(len(qa.ids), len(text.ids)))
    assert batch["attention_mask"].sum().item() == len(qa.ids) + len(text.ids)
    assert batch["target_mask"][0].tolist()[:len(qa.ids)] == [bool(m) for m in qa.target_mask]
    assert not (batch["target_mask"] & ~batch["attention_mask"]).any()


def test_batches_are_a_pure_function_of_seed_step_micro():
    rows = [Example([2, 100 + i], [False, True]) for i in range(6)]
    cfg = TrainConfig(batch_size=2, grad_accum=3, seed=1, pack=False)  # one example per row, to read the order

    def drawn(step, micro, c=cfg):
        return batch_at(rows, step, micro, c)["input_ids"][:, 1].tolist()

    epoch = [i for micro in range(3) for i in drawn(0, micro)]
    assert sorted(epoch) == list(range(100, 106))  # one update here is exactly one epoch
    assert drawn(2, 1) == drawn(2, 1)
    assert [i for micro in range(3) for i in drawn(1, micro)] != epoch  # a new permutation per epoch
    assert epoch != [i for micro in range(3) for i in drawn(0, micro, replace(cfg, seed=2))]


def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, examples, monkeypatch):
    cfg = config(max_steps=4, save_every=2)
    train(fresh_model(), ce_loss, examples, replace(cfg, max_steps=2), tmp_path)
    kept = only_checkpoint(tmp_path)
    size = sum(f.stat().st_size for f in kept.iterdir())
    before = {f.name: f.read_bytes() for f in kept.iterdir()}

    # Room for more checkpoints until step 2's is loaded, then not even for one in its place: step 4's save is
    # refused whole.
    slack, real = engine.train_checkpoints.SLACK, engine.train_checkpoints.free_bytes
    free = {"bytes": 10 * size + slack}
    monkeypatch.setattr(engine.train_checkpoints, "free_bytes", lambda d: free["bytes"])
    real_load = engine.trainer.load_checkpoint

    def load_then_fill(*args, **kwargs):
        free["bytes"] = slack // 2
        return real_load(*args, **kwargs)

    monkeypatch.setattr(engine.trainer, "load_checkpoint", load_then_fill)
    with pytest.raises(MedkoError) as refused:
        train(fresh_model(), ce_loss, examples, cfg, tmp_path, resume=True)
    message = str(refused.value)
    assert (f"{tmp_path / CHECKPOINTS} has {slack // 2:,} bytes free ({size:,} more once the previous checkpoint is "
            f"replaced) but checkpoint step-00000004 needs") in message
    assert "\n" not in message
    assert only_checkpoint(tmp_path) == kept and {f.name: f.read_bytes() for f in kept.iterdir()} == before
    assert not list((tmp_path / CHECKPOINTS).glob(".tmp-*"))

    # A resume on a disk without room for the next checkpoint, even in the last one's place, is refused at once,
    # before any step is spent.
    monkeypatch.setattr(engine.trainer, "load_checkpoint", real_load)
    monkeypatch.setattr(engine.train_checkpoints, "free_bytes", lambda d: slack // 2)
    steps = []
    monkeypatch.setattr(engine.trainer, "accumulate_gradients", lambda *a: steps.append(1))
    with pytest.raises(MedkoError, match=f"has {slack // 2:,} bytes free .* but the next checkpoint needs "
                                         f"{size + slack:,}"):
        train(fresh_model(), ce_loss, examples, cfg, tmp_path, resume=True)
    assert not steps
    monkeypatch.setattr(engine.train_checkpoints, "free_bytes", real)


def test_checkpoints_record_threads_and_digests_and_resume_checks_them(tmp_path, examples, caplog):
    train(fresh_model(), ce_loss, examples, config(max_steps=2), tmp_path)
    path = only_checkpoint(tmp_path)
    state = json.loads((path / STATE).read_text())
    assert state["threads"] == torch.get_num_threads() == 1
    assert state["sha256"] == {name: engine.files.file_sha256(path / name) for name in (WEIGHTS, OPTIMIZER)}

    torch.set_num_threads(2)
    with caplog.at_level(logging.WARNING, logger="medko"):
        train(fresh_model(), ce_loss, examples, config(max_steps=3), tmp_path, resume=True)
    assert "written by a process with 1 threads and this one has 2" in caplog.text
    torch.set_num_threads(1)

    # A flipped bit in the newest checkpoint: the resume falls back to the previous one, with a warning.
    path = only_checkpoint(tmp_path)
    assert path.name == "step-00000003"
    damaged = bytearray((path / OPTIMIZER).read_bytes())
    damaged[-10] ^= 1
    (path / OPTIMIZER).write_bytes(bytes(damaged))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medko"):
        train(fresh_model(), ce_loss, examples, config(max_steps=4), tmp_path, resume=True)
    assert ("step-00000003/optimizer.pt differs from the sha256 its checkpoint recorded, so it is damaged; resuming "
            "from the previous complete checkpoint step-00000002 instead") in caplog.text
    assert (tmp_path / CHECKPOINTS / "damaged-step-00000003").is_dir()


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, examples, caplog):
    cfg = config(min_lr_ratio=1.0)
    straight = fresh_model()
    train(straight, noisy_loss, examples, cfg, tmp_path / "straight")

    out = tmp_path / "resumed"
    train(fresh_model(), noisy_loss, examples, replace(cfg, max_steps=4), out)
    assert [p.name for p in checkpoints(out)] == ["step-00000004", "step-00000002"]
    weights = checkpoints(out)[0] / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])  # a disk or copy that cut the file short
    resumed = fresh_model()
    with caplog.at_level(logging.WARNING, logger="medko"):
        train(resumed, noisy_loss, examples, cfg, out, resume=True)
    assert "step-00000004/adapter.safetensors differs from the sha256" in caplog.text
    assert "resuming from the previous complete checkpoint step-00000002" in caplog.text
    assert_same_run(straight, tmp_path / "straight", resumed, out)

    # With every kept checkpoint damaged, the sentence says none is left.
    for path in checkpoints(out):
        (path / STATE).write_text("{cut")
    with pytest.raises(MedkoError) as refused:
        train(fresh_model(), noisy_loss, examples, replace(cfg, max_steps=8), out, resume=True)
    message = str(refused.value)
    assert "step-00000006/state.json is not valid JSON" in message and "step-00000004/state.json" in message
    assert message.endswith(f"and no earlier complete checkpoint is kept; delete {out} and train it from the start "
                            f"(without --resume)")


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a directory on a tmpfs of that many bytes (root only; skipped elsewhere)."""
    import subprocess

    mounted = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if out.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {out.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


def test_a_disk_with_room_for_one_checkpoint_trains_and_resumes_exactly(tmp_path, examples, small_disk, monkeypatch,
                                                                         caplog):
    cfg = config(save_every=2)
    straight = fresh_model()
    train(straight, noisy_loss, examples, cfg, tmp_path / "straight")
    size = sum(f.stat().st_size for f in only_checkpoint(tmp_path / "straight").iterdir())

    # Room for one checkpoint and the check's slack, not for two: each save replaces the last in place (with a
    # warning), and a run killed after step 3 resumes on the same disk to the uninterrupted result.
    disk = small_disk((size + engine.train_checkpoints.SLACK + size // 2 + 4095) // 4096 * 4096)
    calls = 0

    def killed_loss(model, batch):
        nonlocal calls
        calls += 1
        if calls == 3 * cfg.grad_accum + 2:
            raise RuntimeError("killed")
        return noisy_loss(model, batch)

    with pytest.raises(RuntimeError, match="killed"):
        train(fresh_model(), killed_loss, examples, cfg, disk)
    assert only_checkpoint(disk).name == "step-00000002"
    assert "has room for one checkpoint only: step-00000002 replaces" not in caplog.text  # the first had room
    resumed = fresh_model()
    train(resumed, noisy_loss, examples, cfg, disk, resume=True)
    assert "has room for one checkpoint only" in caplog.text
    assert_same_run(straight, tmp_path / "straight", resumed, disk)

    # A disk without room for even one checkpoint is refused before the first step.
    with pytest.raises(MedkoError, match="bytes free but the next checkpoint needs"):
        train(fresh_model(), ce_loss, examples, cfg, small_disk(4096))

    # When the space runs out during the write itself, the kernel's ENOSPC is named with the file.
    tight = small_disk((size // 2 + 4095) // 4096 * 4096)
    monkeypatch.setattr(engine.train_checkpoints, "free_bytes", lambda d: 1 << 40)
    monkeypatch.setattr(engine.train_checkpoints, "require_space", lambda *a: None)
    with pytest.raises(MedkoError, match=r"could not write checkpoint .*step-00000002: No space left on device"):
        train(fresh_model(), ce_loss, examples, cfg, tight)
    assert not list((tight / CHECKPOINTS).glob("*"))


def test_long_reasoning_loses_its_middle_not_its_answer(tiny_tokenizer):
    from engine.reasoning import reasoning_examples, reasoning_prompt
    from engine.data import MCQ

    row = MCQ("r/0", "doctor", "Which drug?", {k: k.lower() for k in "ABCDE"}, "C", reasoning="step " * 200)
    short = MCQ("r/1", "doctor", "Which drug?", {k: k.lower() for k in "ABCDE"}, "B", reasoning="short")
    (long_ex, short_ex), cut = reasoning_examples(tiny_tokenizer, [row, short], max_len=120)
    assert cut == 1 and len(long_ex.ids) == 120
    prompt = tiny_tokenizer.encode(reasoning_prompt(row))
    assert list(long_ex.ids[:len(prompt)]) == prompt and not any(long_ex.target_mask[:len(prompt)])
    ending = tiny_tokenizer.encode("\n정답： C", bos=False) + [tiny_tokenizer.eos_id]
    assert list(long_ex.ids[-len(ending):]) == ending
    text = tiny_tokenizer.decode(long_ex.ids[len(prompt):])
    assert text.startswith(" step step") and " … " in text
    assert " … " not in tiny_tokenizer.decode(short_ex.ids)
