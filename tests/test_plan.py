"""The memory plan: its arithmetic on known cases, its fit decisions, the stages taking it on CUDA (flags override),
and `medko.py plan` as a user runs it."""
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

import shared_logic as sl
from engine import plan
from engine.adapters import add_language_embeddings, add_lora
from engine.model import PRESETS, Gemma3
from engine.plan import GIB, WORK, Setup, estimate, fitting_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("size", ["4b", "27b"])
def test_plan_prints_every_stage_with_the_settings_that_fit(size):
    out = subprocess.run([sys.executable, str(ROOT / "medko.py"), "plan", "--size", size, "--gpu-memory", "80"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"memory plan for --size {size}: {PRESETS[size].num_layers} layers")
    assert "base" in lines[2] and "act ckpt" in lines[2] and "teacher" in lines[2] and "fits with" in lines[2]
    for work in plan.STAGE_WORK:
        row = next(line for line in lines if line.startswith(work.title))
        assert "micro-batch" in row if work.trains else "as is" in row, row


def test_base_weights_are_the_parameters_times_their_width():
    config = tiny_config()
    count = sum(p.numel() for p in Gemma3(config).parameters())
    assert plan.base_params(config) == count
    assert plan.base_bytes(config, Setup(device="cpu")) == 4 * count
    assert plan.base_bytes(config, Setup(device="cuda")) == 2 * count
    quantized = plan.base_bytes(config, Setup(device="cuda", quantize=True))
    projections = config.num_layers * plan.projection_params(config)
    assert quantized == int((count - projections) * 2 + projections * plan.NF4_BYTES)


def test_trainable_bytes_count_what_the_surgery_adds(tiny_tokenizer):
    config = tiny_config()
    model = add_language_embeddings(add_lora(Gemma3(config), "lora1", rank=4), tiny_tokenizer)
    added = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "language_embedding" in n)
    weights, with_optimizer = plan.trainable_bytes(config, WORK["s3"], Setup(device="cpu", lora_rank=4))
    assert weights == 4 * added  # float32 master weights
    assert with_optimizer == 4 * weights  # weights, gradients and AdamW's two moments
    held, total = plan.trainable_bytes(config, WORK["test"], Setup(device="cpu", lora_rank=4))
    assert total == held  # a stage that does not train holds its additions only
    edge = sum(p.numel() for p in Gemma3(config).layers.parameters())  # the two duplicated layers, float32 on CPU
    lora_on_edges = 2 * plan.lora_params(config, 4, 1) * 4
    assert held == weights + 4 * edge + lora_on_edges


def test_layer_saved_matches_what_autograd_keeps_on_cpu():
    """The CPU formula against the bytes autograd saves for one LoRA'd decoder layer whose input needs gradients."""
    config = replace(PRESETS["270m"], vocab_size=512, num_layers=1, layer_types=())
    model = add_lora(Gemma3(config).requires_grad_(False), "lora1", rank=16)
    rows, tokens = 2, 64
    x = torch.randn(rows, tokens, config.hidden_size, requires_grad=True)
    saved = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    mask = torch.ones(rows, tokens, dtype=torch.bool)
    from engine.model import SLIDING, attention_masks, rope_tables

    rope = rope_tables(torch.arange(tokens).expand(rows, tokens), config.head_dim, 10_000.0, 1.0, torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.layers[0](x, rope, attention_masks(mask, mask, 0, config.sliding_window)[SLIDING])
    counted = sum(v for k, v in saved.items() if k not in params)
    estimated = plan.layer_saved(config, Setup(device="cpu"), rows, tokens)
    assert abs(estimated - counted) / counted < 0.05, (estimated, counted)


def test_fits_are_chosen_in_order_and_keep_the_global_batch():
    config, work, setup = PRESETS["27b"], WORK["s3"], Setup(device="cuda", batch=8)
    first = estimate(config, work, setup).peak
    roomy = plan.CUDA_CONTEXT + first / (1 - plan.CUDA_SLACK) + GIB
    fit = fitting_settings(config, work, setup, int(roomy))
    assert (fit.batch, fit.grad_accum, fit.checkpointing, fit.quantize) == (8, 1, False, False)
    tight = fitting_settings(config, work, setup, int(roomy - 2 * GIB))
    assert (tight.batch, tight.checkpointing) != (8, False) and tight.batch * tight.grad_accum == 8
    assert tight.estimate.peak <= plan.usable_bytes(int(roomy - 2 * GIB))
    assert fitting_settings(config, work, setup, 40 * GIB) is None or fitting_settings(
        config, work, setup, 40 * GIB).quantize  # 54 GB of bf16 weights cannot fit 40 GiB
    assert fitting_settings(config, work, setup, 8 * GIB) is None


def test_nproc_shards_weights_and_optimizer_but_not_activations():
    config, work = PRESETS["27b"], WORK["s4"]
    one, four = estimate(config, work, Setup()), estimate(config, work, Setup(nproc=4))
    gathered = (config.vocab_size * config.hidden_size + plan.FSDP_LAYERS * plan.layer_params(config)) * 2
    assert four.base == one.base // 4 + gathered
    assert four.trainable == one.trainable // 4
    assert (four.activations, four.teacher, four.evaluation) == (one.activations, one.teacher, one.evaluation)
    # At load a rank holds its shard of the base, one layer's rows in flight and the additions whole (engine.shard_load).
    assert four.load == plan.base_bytes(config, Setup()) // 4 + one.weights_only + plan.layer_params(config) * 2 // 4
    assert one.load == one.base + one.weights_only


@pytest.mark.parametrize("nproc, gib", [(2, 80), (4, 40), (8, 24)])
def test_27b_fits_every_stage_on_the_multi_gpu_boxes_without_nf4(nproc, gib):
    setup = Setup(batch=8, nproc=nproc)
    for work in plan.STAGE_WORK:
        fit = fitting_settings(PRESETS["27b"], work, setup, gib * GIB)
        assert fit is not None and not fit.quantize, work.name
        assert max(fit.estimate.load, fit.estimate.peak) <= plan.usable_bytes(gib * GIB)
    shown = subprocess.run([sys.executable, str(ROOT / "medko.py"), "plan", "--size", "27b", "--nproc", str(nproc),
                            "--gpu-memory", str(gib)], capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [line for line in shown.splitlines() if line.startswith(tuple(w.title for w in plan.STAGE_WORK))]
    assert "load" in shown.splitlines()[2] and len(rows) == len(plan.STAGE_WORK)
    assert not any("nothing" in row or "--quantize" in row for row in rows), rows


def test_a_rank_s_generation_that_does_not_fit_decodes_fewer_rows_at_once():
    config, work, setup = PRESETS["27b"], WORK["s5"], Setup(nproc=4)
    found = estimate(config, work, setup, 40 * GIB)
    rows = found.eval_rows["generate"]
    assert 1 <= rows < work.generate[0]
    layers = config.num_layers + 2  # s5 holds the duplicated edge layers
    wider = plan.evaluation_bytes(config, setup, "generate", rows * 2, work.generate[1], layers)
    assert found.base + found.weights_only + wider > plan.usable_bytes(40 * GIB)
    assert estimate(config, work, setup, 400 * GIB).eval_rows["generate"] == work.generate[0]


def test_the_plan_refuses_nf4_with_several_processes():
    done = subprocess.run([sys.executable, "medko.py", "plan", "--size", "27b", "--nproc", "4", "--quantize", "4bit"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == ("medko: --quantize 4bit does not run with FSDP2 under torchrun, which cannot shard "
                                   "NF4 weights; drop --quantize and let --nproc spread the bf16 base over the GPUs "
                                   "(27B: 2 x 80, 4 x 40 or 8 x 24 GB by the plan)")


def test_stages_take_the_plan_on_cuda_and_flags_override_it(monkeypatch):
    monkeypatch.setattr(plan, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(plan, "gpu_memory", lambda device: 80 * GIB)

    def config(**flags):
        run = sl.StageRun("s3", sl.StageOptions(**flags))
        run._base = {"size": "27b", "model": None}
        return run.train_config(steps=1)

    fit = fitting_settings(PRESETS["27b"], WORK["s3"], Setup(batch=8), 80 * GIB, allow_quantize=False,
                           part="training")
    planned = config()
    assert (planned.batch_size, planned.grad_accum, planned.gradient_checkpointing) == (
        fit.batch, fit.grad_accum, fit.checkpointing)
    explicit = config(batch_size=8)
    assert (explicit.batch_size, explicit.grad_accum, explicit.gradient_checkpointing) == (8, 1, False)
    with pytest.raises(sl.MedkoError, match="does not fit 20 GiB"):
        monkeypatch.setattr(plan, "gpu_memory", lambda device: 20 * GIB)
        config()


def test_stages_off_cuda_keep_their_defaults():
    assert plan.stage_settings("s3", "27b", None, "cpu", 8, 512, 16, False) == (8, 1, False)


def test_a_cpu_training_peak_counts_the_resident_heap_beside_the_tensors():
    config, setup = PRESETS["270m"], Setup(device="cpu", batch=2)
    trained, scored = estimate(config, WORK["s3"], setup), estimate(config, WORK["test"], setup)
    assert trained.allocator == int(plan.CPU_HEAP_RETENTION * trained.activations) + plan.CPU_RUNTIME
    assert scored.allocator == 0 and estimate(config, WORK["s3"], replace(setup, device="cuda")).allocator == 0
