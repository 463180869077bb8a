"""What fits a GPU before anything runs (engine.fit): the gate's candidates checked against the GPU's memory before
any download, NF4 chosen only when bf16 weights fit nothing, and evaluation batches cut to what the GPU holds."""
import importlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from engine import plan
from engine.errors import MedkoError
from engine.fit import base_plan, candidate_fit, candidates_that_fit
from engine.model import PRESETS
from engine.plan import GIB, STAGE_WORK, Setup, evaluation_bytes, rows_within

pytestmark = pytest.mark.xdist_group("hub-rehearsal")  # shares the session's hub cache with test_rehearsal.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "stages"))


def test_the_gpu_memory_override_is_read_in_gib_and_refused_when_not_a_number(monkeypatch):
    monkeypatch.delenv(plan.GPU_MEMORY_ENV, raising=False)
    assert plan.gpu_memory("cpu") is None  # a CPU run has no GPU to fit
    monkeypatch.setenv(plan.GPU_MEMORY_ENV, "24")
    assert plan.gpu_memory("cpu") == 24 * GIB
    monkeypatch.setenv(plan.GPU_MEMORY_ENV, "lots")
    with pytest.raises(MedkoError, match=plan.GPU_MEMORY_ENV):
        plan.gpu_memory("cpu")


def test_rows_are_halved_until_the_evaluation_fits_the_budget():
    c, s = PRESETS["27b"], Setup("cuda")
    budget = int(20 * GIB)
    rows = rows_within(c, s, "generate", 64, budget, 256)
    assert 1 <= rows < 64
    assert evaluation_bytes(c, s, "generate", rows, 256) <= budget < evaluation_bytes(c, s, "generate", 2 * rows, 256)
    assert rows_within(c, s, "generate", 64, None, 256) == 64  # no GPU: the default rows



def test_a_sharded_model_sets_its_gathered_layers_aside_and_the_ranks_agree_on_rows(monkeypatch):
    from types import SimpleNamespace

    import torch

    from engine import fit

    c, s = PRESETS["27b"], Setup("cuda")
    # A GPU whose room beside the tensors (none allocated here) holds 64 generation rows, but not with the
    # embedding and FSDP_LAYERS layers a rank gathers whole while it computes.
    room = evaluation_bytes(c, s, "generate", 64, 256) + plan.gathered_bytes(c, s) // 2
    monkeypatch.setenv(plan.GPU_MEMORY_ENV, str((room + plan.CUDA_CONTEXT) / (1 - plan.CUDA_SLACK) / GIB))
    monkeypatch.setattr(fit, "model_device", lambda model: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    model = SimpleNamespace(config=c)
    monkeypatch.setattr(fit.distributed, "sharded", lambda m: False)
    assert fit.rows_that_fit(model, "generate", 64, s.max_len, 256) == 64
    monkeypatch.setattr(fit.distributed, "sharded", lambda m: True)
    agreed = []
    monkeypatch.setattr(fit.distributed, "global_min", lambda rows: agreed.append(rows) or 1)
    assert fit.rows_that_fit(model, "generate", 64, s.max_len, 256) == 1  # another rank could do only one
    assert 1 <= agreed[0] < 64


@pytest.mark.parametrize("size,gib", [("27b", 80), ("4b", 24), ("4b", 48)])
def test_every_stage_fits_without_a_flag_it_does_not_choose(size, gib):
    for work in STAGE_WORK:
        fit = plan.fitting_settings(PRESETS[size], work, Setup("cuda"), gib * GIB)
        assert fit is not None and not fit.quantize, work.name
        assert fit.estimate.peak <= plan.usable_bytes(gib * GIB)


def test_27b_on_80_gb_cuts_s5_generation_rows_rather_than_asking_for_nf4():
    fit = plan.fitting_settings(PRESETS["27b"], plan.WORK["s5"], Setup("cuda"), 80 * GIB)
    assert not fit.quantize and fit.estimate.eval_rows["generate"] < plan.WORK["s5"].generate[0]


def test_a_large_candidate_is_skipped_in_one_sentence_that_says_how_to_include_it():
    c, s = PRESETS["27b"], Setup("cuda")
    nf4, line = candidate_fit("27b", c, s, 48 * GIB, False, ["4b", "27b"])
    assert nf4 is None and "--candidates 4b,27b" in line and "--quantize 4bit" in line and line.count(". ") == 0
    assert candidate_fit("27b", c, s, 48 * GIB, True, ["4b", "27b"])[0] is True  # named by the user: NF4 chosen
    assert candidate_fit("27b", c, s, 80 * GIB, False, ["4b", "27b"])[0] is False  # bf16 fits 80 GB
    nf4, line = candidate_fit("27b", c, s, 24 * GIB, True, ["4b", "27b"])
    assert nf4 is None and "NF4" in line  # even NF4 leaves a stage too large


def test_no_candidate_fitting_is_refused(monkeypatch):
    monkeypatch.setenv(plan.GPU_MEMORY_ENV, "8")
    with pytest.raises(MedkoError, match="no gate candidate"):
        candidates_that_fit(["27b"], {"27b"}, False, "cpu")


def test_size_4b_on_a_simulated_24_gb_gpu_skips_27b_before_any_download(offline_hub, tmp_path, monkeypatch, caplog):
    import huggingface_hub

    asked = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id) or
                        real(repo_id, **kw))
    monkeypatch.setenv(plan.GPU_MEMORY_ENV, "24")
    run_dir = tmp_path / "run"
    common = ["--size", "4b", "--run-dir", str(run_dir)]
    assert importlib.import_module("s0_data").main(common) == 0
    assert importlib.import_module("s1_gate").main([*common, "--translate-tokens", "2", "--eval-limit", "4"]) == 0
    assert "google/medgemma-4b-it" in asked and "google/medgemma-27b-text-it" not in asked
    skipped = [r.getMessage() for r in caplog.records if "27b skipped before any download" in r.getMessage()]
    assert len(skipped) == 1 and "24 GiB GPU" in skipped[0]
    meta = json.loads((run_dir / "s1_gate" / "meta.json").read_text())
    assert meta["skipped"] == ["27b"] and list(meta["scores"]) == ["4b"] and meta["base"]["quantize"] is None
    assert meta["plan"]["gpu_gib"] == 24 and "train 4b" in meta["plan"]["line"]


def test_the_chosen_base_plan_names_what_later_stages_train(monkeypatch):
    monkeypatch.setenv(plan.GPU_MEMORY_ENV, "80")
    found = base_plan("27b", False, "cpu")
    assert found["stages"]["s5"]["eval_rows"]["generate"] < 64 and "train 27b" in found["line"]
    assert found["peak_gib"] <= plan.usable_bytes(80 * GIB) / GIB


def test_a_missing_bitsandbytes_is_one_sentence_naming_the_package(monkeypatch):
    import importlib.util

    from engine.adapters import check_4bit

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MedkoError, match="bitsandbytes package, which is missing: `pip install -r requirements.txt`"):
        check_4bit("cuda")


def test_plan_hours_names_the_source_of_every_throughput_and_sums_its_stages():
    from engine import costs

    out = subprocess.run([sys.executable, str(ROOT / "medko.py"), "plan", "--size", "27b", "--gpu", "h200", "--hours"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    rows = [line for line in lines if line.startswith(tuple(w.title for w in plan.STAGE_WORK)) and " h" not in line
            and "M" in line]
    assert len(rows) == len(plan.STAGE_WORK)
    run = next(line for line in lines if line.startswith("run "))
    total = float(run.split()[-1])
    curriculum = [r for r in rows if not r.startswith(plan.WORK["sft"].title)]  # the baseline is a run of its own
    assert total == pytest.approx(sum(float(r.split()[-1]) for r in curriculum), abs=0.1)
    assert lines.index(run) < lines.index(next(r for r in rows if r not in curriculum))
    sources = [line for line in lines if line.startswith("  ") and ": " in line]
    assert len(sources) == 3 and all("measured" in s for s in sources)  # measured, or not measured (estimate ...)
    elsewhere = [line for line in costs.hours_table("27b", "80gb").splitlines() if line.startswith("  ")]
    assert all("not measured (estimate from the H200 27b figure scaled by 80gb" in s for s in elsewhere[:2])
    for size, script in (("4b", "bench/"), ("27b", "bash bench/gpu_cost.sh 27b")):  # what the H200 leases measured
        measured = costs.hours_table(size, "h200").splitlines()
        assert [line.split(": ")[0] for line in measured if line.startswith("  ")] == ["  train", "  score", "  decode"]
        assert all(f": measured: {script}" in line for line in measured if line.startswith("  "))


def test_hours_grow_with_the_work_and_with_checkpointing():
    from engine import costs

    fit = plan.fitting_settings(PRESETS["27b"], plan.WORK["s3"], Setup("cuda"), 80 * GIB)
    plain = costs.stage_hours("27b", "80gb", "s3", None)["train"]
    assert fit.checkpointing and costs.stage_hours("27b", "80gb", "s3", fit)["train"] == pytest.approx(plain * 4 / 3)
    assert costs.stage_hours("27b", "80gb", "s3", None)["train"] > costs.stage_hours("4b", "80gb", "s3", None)["train"]


def test_decoding_scales_with_the_layers_where_launches_bound_it_and_nf4_stages_train_at_the_nf4_rate(monkeypatch):
    from engine import costs

    step_4b = costs.THROUGHPUTS[("h200", "4b", "decode")].value
    monkeypatch.delitem(costs.THROUGHPUTS, ("h200", "27b", "decode"))  # as before the 27B was measured
    assert costs._scaled("27b", "h200", "decode")[0] == pytest.approx(step_4b * 62 / 34)
    # a GPU so slow that reading the weights takes longer than launching the kernels
    monkeypatch.setitem(costs.GPUS, "slow", dict(costs.GPUS["80gb"], tb_s=0.1))
    assert costs._scaled("27b", "slow", "decode")[0] == pytest.approx(2 * plan.base_params(PRESETS["27b"]) / 0.05e12)
    fit = plan.fitting_settings(PRESETS["27b"], plan.WORK["s3"], Setup("cuda"), 40 * GIB)
    assert fit.quantize  # 54 GB of bf16 weights cannot sit on 40 GiB
    hours = costs.stage_hours("27b", "80gb", "s3", fit)["train"]
    bf16 = costs.stage_hours("27b", "80gb", "s3", replace(fit, quantize=False))["train"]
    assert hours == pytest.approx(bf16 * costs.THROUGHPUTS[("h200", "4b", "train")].value
                                  / costs.THROUGHPUTS[("h200", "4b", "train_nf4")].value)
    value, source = costs._scaled("27b", "h200", "train_nf4")  # the 27B's bf16 figure times the 4B's NF4/bf16 ratio
    assert value == pytest.approx(costs.THROUGHPUTS[("h200", "27b", "train")].value
                                  * costs.THROUGHPUTS[("h200", "4b", "train_nf4")].value
                                  / costs.THROUGHPUTS[("h200", "4b", "train")].value)
    assert source.startswith("not measured (estimate from the H200 27b bf16 figure")


def test_the_hub_fixture_at_a_hundredth_of_the_real_volumes_reads_every_row_once(tmp_path, monkeypatch):
    """The reduced-volume check of bench/volumes.py: every source at REAL_ROWS x 0.01, read by s0 with no row
    dropped as a repeat and no question overlap between splits."""
    import huggingface_hub.constants as hub_constants
    from hub_cache import REAL_ROWS, SUBSETS, build_hub_cache

    cache = build_hub_cache(tmp_path / "cache", 0.01)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    run_dir = tmp_path / "run"
    assert importlib.import_module("s0_data").main(["--size", "4b", "--run-dir", str(run_dir)]) == 0
    meta = json.loads((run_dir / "s0_data" / "meta.json").read_text())
    for split in ("train", "dev", "test"):
        assert meta["counts"][f"exam_{split}.jsonl"] == len(SUBSETS) * round(REAL_ROWS[split] / len(SUBSETS) * 0.01)
    assert meta["counts"]["ko_text.jsonl"] + meta["counts"]["ko_heldout.jsonl"] == round(REAL_ROWS["asan"] * 0.01)
    assert all(c["dropped"] == 0 for c in meta["left_out"].values())
    assert all(n == 0 for name, n in meta["overlap"].items() if "fewshot" not in name)
