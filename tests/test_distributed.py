"""Two CPU processes under torchrun (gloo) on the tiny model: N processes with micro-batch b train like one with
N*b (replicated and FSDP2), an interrupted run resumes to the uninterrupted result, the evaluator and measures
split the questions and gather them in order, and a stage killed under torchrun resumes with --resume."""
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distributed_worker as worker
from engine.errors import MedkoError

# Under `pytest -n 2 --dist loadgroup` this file's tests share one worker and its session fixtures.
pytestmark = pytest.mark.xdist_group("torchrun")

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, cwd=ROOT, env=env or ENV, timeout=600)


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |a| of the trainable weights taken as one vector (Euclidean norms)."""
    assert a.keys() == b.keys()
    x, y = (torch.cat([t[k].double().flatten() for k in sorted(a)]) for t in (a, b))
    return float((x - y).norm() / x.norm())


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: the worker's training and evaluation in this process, one process taking the global
    micro-batch alone."""
    out = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = worker.tokenizer(out)
        (out / "evaluation.json").write_text(json.dumps(worker.evaluation(tok)))
        worker.train_run(out / "straight", tok)
    finally:
        torch.set_num_threads(threads)
    return out


def small_data(directory: Path, rows: int = 12) -> Path:
    """The bundled data with at most `rows` lines per text, pair and MCQ file (the exams whole): a stage's held-out
    measures then take seconds, not minutes, in each process."""
    shutil.copytree(ROOT / "data" / "kormedmcqa", directory / "kormedmcqa")
    for path in (ROOT / "data").glob("*.jsonl"):
        (directory / path.name).write_text("".join(path.read_text().splitlines(keepends=True)[:rows]))
    return directory


@pytest.fixture(scope="module")
def gated(tiny_dir, tmp_path_factory) -> Path:
    """s0 and s1 done in this process, the gate at 0 so that s2 (language embeddings on Korean text) is next."""
    sys.path.insert(0, str(ROOT / "stages"))
    root = tmp_path_factory.mktemp("stage")
    run_dir, common = root / "gated", ["--model", str(tiny_dir), "--run-dir", str(root / "gated"), "--eval-limit", "4"]
    assert importlib.import_module("s0_data").main([*common, "--data", str(small_data(root / "data"))]) == 0
    s1 = [*common, "--gate", "0", "--english-exam", str(ROOT / "data" / "kormedmcqa_en")]
    assert importlib.import_module("s1_gate").main(s1) == 0
    return run_dir


@pytest.fixture(scope="module")
def two_processes(gated, tiny_dir, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One torchrun launch of the worker: the engine checks, then s2 on a copy of the gated run, interrupted."""
    out = tmp_path_factory.mktemp("two")
    run_dir = shutil.copytree(gated, out / "run")
    done = torchrun("tests/distributed_worker.py", str(out), *stage_args(tiny_dir, run_dir, 1))
    return out, run_dir, done


@pytest.fixture(scope="module")
def engine_out(two_processes) -> Path:
    out, _, done = two_processes
    assert (out / worker.MODES[-1] / "resumed" / "trainable.pt").is_file(), done.stderr[-3000:]
    return out


def stage_args(model: Path, run_dir: Path, batch_size: int) -> list[str]:
    return ["--model", str(model), "--run-dir", str(run_dir), "--max-steps", "4", "--max-len", "128",
            "--eval-limit", "4", "--batch-size", str(batch_size)]


@pytest.mark.parametrize("mode", worker.MODES)
def test_two_processes_train_like_one_with_the_global_batch(one_process, engine_out, mode):
    one, two = one_process / "straight", engine_out / mode / "straight"
    assert len(losses(two)) == worker.STEPS
    assert max(abs(a - b) / abs(a) for a, b in zip(losses(one), losses(two))) <= 1e-6
    assert relative(torch.load(one / "trainable.pt"), torch.load(two / "trainable.pt")) <= 1e-6
    # The checkpoint is the one a single process writes: the whole trainable state, gathered.
    saved = load_file(str(two / "checkpoints" / f"step-{worker.STEPS:08d}" / "adapter.safetensors"))
    assert relative(torch.load(one / "trainable.pt"), saved) <= 1e-6


@pytest.mark.parametrize("mode", worker.MODES)
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(engine_out, mode):
    straight, resumed = engine_out / mode / "straight", engine_out / mode / "resumed"
    a, b = torch.load(straight / "trainable.pt"), torch.load(resumed / "trainable.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(resumed)


def test_an_error_on_rank_0_stops_every_rank_with_its_sentence(engine_out):
    errors = [json.loads((engine_out / f"error-{rank}.json").read_text()) for rank in (0, 1)]
    assert errors == [["MedkoError", "rank 0 refuses; every rank stops with this sentence"],
                      ["Relayed", "rank 0 refuses; every rank stops with this sentence"]]


def test_resuming_with_another_global_batch_is_refused_in_one_sentence(tmp_path):
    tok = worker.tokenizer(tmp_path)
    worker.train_run(tmp_path / "run", tok, stop_at=worker.STOP_AT)
    with pytest.raises(MedkoError, match=r"changed train config fields \{'batch_size': \(4, 8\)\} \(saved, now\) "
                                         r"\(batch_size counts every process: keep --batch-size times the process "
                                         r"count\); resume with the saved values"):
        worker.train_run(tmp_path / "run", tok, resume=True, batch=8)


def test_evaluation_and_measures_split_and_gather_in_order(one_process, engine_out):
    one = json.loads((one_process / "evaluation.json").read_text())
    two = json.loads((engine_out / "evaluation.json").read_text())
    assert one["logits"] == two["logits"] and len(one["logits"]) == 30
    assert one["generate"] == two["generate"]
    for key in ("text_losses", "losses", "drifts"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key


def test_a_stage_interrupted_under_torchrun_resumes_like_one_process(two_processes, gated, tiny_dir, tmp_path):
    _, two, stopped = two_processes
    assert stopped.returncode != 0 and "medko: s2 interrupted; continue it with --resume" in stopped.stderr
    assert (two / "s2_embed" / "train" / "checkpoints" / "step-00000002").is_dir()
    assert not (two / "s2_embed" / "meta.json").exists() and not list((two / "s2_embed").glob("**/.tmp-*"))
    resumed = torchrun(str(ROOT / "stages" / "s2_embed.py"), *stage_args(tiny_dir, two, 1), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    one = shutil.copytree(gated, tmp_path / "one")  # uninterrupted, one process, the same global batch
    assert importlib.import_module("s2_embed").main(stage_args(tiny_dir, one, 2)) == 0
    a = load_file(str(one / "s2_embed" / "adapter.safetensors"))
    b = load_file(str(two / "s2_embed" / "adapter.safetensors"))
    assert relative(a, b) <= 1e-6
    assert max(abs(x - y) / x for x, y in zip(losses(one / "s2_embed" / "train"),
                                              losses(two / "s2_embed" / "train"))) <= 1e-6
    after_one = json.loads((one / "s2_embed" / "meta.json").read_text())["after"]
    after_two = json.loads((two / "s2_embed" / "meta.json").read_text())["after"]
    assert not {"ko_correct", "en_correct"} & after_two.keys()  # s2 measures held-out text only
    for key in ("en_losses", "drifts"):
        assert after_two[key] == pytest.approx(after_one[key], abs=1e-5), key
    assert after_two["ko_losses"] == pytest.approx(after_one["ko_losses"], abs=1e-5)
