"""Shard-at-load under FSDP2 on two CPU processes (gloo, MEDKO_FSDP=1): a random model whose base dominates is read
from safetensors, each rank its own rows, so that a rank's resident memory above its runtime through the load and
the first update stays within base/N + two layers + 10%; the training equals one process's, and s4's duplicated
layers, written by rank 0 and read back into a third load, compute what the trained model computes; a checkpoint is
gathered into rank 0 alone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shard_load_worker as worker
from engine.plan import FSDP_LAYERS, base_params, layer_params
from test_distributed import losses, relative

pytestmark = pytest.mark.xdist_group("torchrun")

ROOT = Path(__file__).resolve().parents[1]
# A fixed mmap threshold makes glibc return every freed tensor of 64 KiB or more, so a rank's resident memory is
# the tensors it holds; glibc's default keeps freed heap resident (engine.plan's CPU_HEAP_RETENTION), which on a
# CPU would measure the allocator, not the loader.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MEDKO_FSDP": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return worker.write_model(tmp_path_factory.mktemp("big") / "model")


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = worker.Tokenizer(worker.tiny_tokenizer_json(out / "tokenizer.json"))
        worker.measured_run(model_dir, tok, out / "straight")
        worker.duplicated_run(model_dir, tok, out / "duplicated")
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def two_processes(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "tests/shard_load_worker.py", str(model_dir), str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_each_rank_holds_its_shard_through_load_and_first_step(two_processes):
    """At load and through the first step: base/N + two layers + 10%. A rank holds the layer computing whole and,
    for the copy into its parameters or while backward prefetches the next, one all-gather buffer (engine.distributed
    unshards as an async op, so FSDP2 frees that buffer after the copy instead of keeping it until the next layer's
    all-gather; measured before that: 3.6 layers). The rest of the step's own memory (activations of three passes,
    gradients) is ~0.4 layer here; engine.plan counts it apart from the FSDP_LAYERS gathered."""
    config = worker.big_config()
    base, layer = base_params(config) * 4, layer_params(config) * 4
    assert FSDP_LAYERS == 2
    load_bound = step_bound = 1.1 * (base / 2 + 2 * layer)
    figures = json.loads((two_processes / "figures.json").read_text())
    print(f"\nbase {base / worker.MIB:.1f} MiB, layer {layer / worker.MIB:.1f} MiB, 2 ranks: bounds above the runtime "
          f"{load_bound / worker.MIB:.1f} MiB at load, {step_bound / worker.MIB:.1f} MiB through the first step")
    for f in figures:
        print(f"rank {f['rank']}: runtime {f['runtime'] / worker.MIB:.1f} MiB; above it, peak at load "
              f"{f['load'] / worker.MIB:.1f} MiB (base/N + {(f['load'] - base / 2) / layer:.2f} layers), through "
              f"the first step {f['step'] / worker.MIB:.1f} MiB (base/N + {(f['step'] - base / 2) / layer:.2f} layers)")
    assert len(figures) == 2
    assert all(base / 2 < f["load"] <= load_bound and f["load"] <= f["step"] <= step_bound for f in figures)


def test_sharded_loading_trains_like_one_process(one_process, two_processes):
    one, two = one_process / "straight", two_processes / "straight"
    assert len(losses(two)) == worker.STEPS
    assert max(abs(a - b) / abs(a) for a, b in zip(losses(one), losses(two))) <= 1e-6
    # Each rank computes its example alone where one process pads two into a batch, and the float32 sums round
    # apart by ~1e-7; AdamW's first, normalised steps carry that into gradients near its eps (measured: 2e-5).
    assert relative(torch.load(one / "trainable.pt"), torch.load(two / "trainable.pt")) <= 1e-4


def test_duplicated_layers_load_from_the_base_and_reload_from_the_adapter_file(one_process, two_processes):
    one, two = one_process / "duplicated", two_processes / "duplicated"
    assert max(abs(a - b) / abs(a) for a, b in zip(losses(one), losses(two))) <= 1e-6
    measured = json.loads((two / "reloaded.json").read_text())
    assert measured["reloaded"] == pytest.approx(measured["trained"], rel=1e-6)
    assert measured["trained"] == pytest.approx(json.loads((one / "reloaded.json").read_text())["trained"], rel=1e-5)


def test_only_rank_0_gathers_the_checkpoint(two_processes):
    """A checkpoint of s4's update (the duplicated layers, lora1, language vectors, and AdamW's two moments of each)
    is gathered into rank 0, one tensor at a time; rank 1 sends its rows and never holds the whole."""
    figures = {f["rank"]: f for f in json.loads((two_processes / "duplicated" / "save.json").read_text())}
    whole = figures[0]["trainable"]  # the trainable weights whole, in bytes; the checkpoint holds them three times
    print(f"\ntrainable state {whole / worker.MIB:.1f} MiB; peak above the step's memory through the checkpoint: "
          + ", ".join(f"rank {r} {f['save'] / worker.MIB:.1f} MiB" for r, f in sorted(figures.items())))
    assert figures[0]["save"] >= 3 * whole  # weights and both moments, whole, serialised on rank 0
    assert figures[1]["save"] <= 0.25 * whole  # at most one tensor's rows in flight
