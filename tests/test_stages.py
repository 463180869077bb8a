"""The curriculum end to end on the tiny model: every stage, both gate branches, the guard, resume, run.sh."""
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.trainer import accumulate_gradients
import engine.trainer
import shared_logic as sl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "stages"))
EXTRA = {"s1_gate": ["--translate-tokens", "4", "--english-exam", "model"], "s4_translate": ["--translate-tokens", "4"],
         "s5_reasoning": ["--reasoning-tokens", "4"], "lora_sft": ["--reasoning-tokens", "4"]}
SCRIPTS = {"s0": "s0_data", "s1": "s1_gate", "s1_1": "s1_1_english", "s2": "s2_embed", "s3": "s3_korean",
           "s4": "s4_translate", "s5": "s5_reasoning", "sft": "lora_sft"}


SMALL: Path | None = None  # the bundled data cut to a few rows (conftest.small_data): the mechanics, fast


@pytest.fixture(autouse=True, scope="module")
def _small_data(small_data):
    global SMALL
    SMALL = small_data


def stage(name: str, run_dir: Path, model_dir: Path, *args: str) -> int:
    script = SCRIPTS[name]
    data = ["--data", str(SMALL)] if name == "s0" and "--data" not in args else []
    argv = ["--model", str(model_dir), "--run-dir", str(run_dir), "--max-steps", "2", "--max-len", "1024",
            *EXTRA.get(script, []), *data, *args]
    return importlib.import_module(script).main(argv)


def meta(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / sl.STAGES[name].directory / "meta.json").read_text())


@pytest.fixture(scope="module")
def gated_run(tiny_dir, tmp_path_factory) -> Path:
    """s0 and s1 done; the tiny model is far below the gate, so s1.1 is next."""
    run_dir = tmp_path_factory.mktemp("runs") / "gated"
    assert stage("s0", run_dir, tiny_dir) == 0
    assert stage("s1", run_dir, tiny_dir) == 0
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_whole_curriculum_with_the_english_branch(gated_run, tiny_dir, tmp_path, capsys):
    run_dir = copy_run(gated_run, tmp_path / "run")
    gate = meta(run_dir, "s1")
    assert gate["needs_english"] and gate["chosen"] == str(tiny_dir) and 0 <= gate["scores"][str(tiny_dir)] < 0.97
    english = [json.loads(l) for l in (run_dir / "s1_gate" / "en_exam_dev.jsonl").read_text().splitlines()]
    assert len(english) == meta(run_dir, "s0")["counts"]["exam_dev.jsonl"] == 12
    for name in ("s1_1", "s2", "s3", "s4", "s5"):
        assert stage(name, run_dir, tiny_dir, "--tolerance", "1") == 0, name
        m = meta(run_dir, name)
        assert m["status"] == "done"
        # Each stage measures what its purpose, the guard and the next stage read (sl.STAGE_MEASURES).
        every = {"ko_accuracy", "en_accuracy", "ko_loss", "en_loss", "drift"}
        assert {"ko_preds", "ko_correct"} <= set(m["after"]) or "ko_accuracy" not in m["after"]
        held_out = {"ko_loss", "en_loss", "drift"}
        entering = {"s1_1": {"en_accuracy", "en_loss", "drift"}, "s2": every, "s3": held_out,
                    "s4": every - {"ko_accuracy"}, "s5": every - {"ko_accuracy", "ko_loss"}}
        leaving = {"s1_1": every - {"drift"}, "s2": held_out, "s3": every - {"ko_accuracy"},
                   "s4": every - {"ko_accuracy", "ko_loss"}, "s5": every - {"ko_loss"}}
        assert set(m["before"]) & every == entering[name], name
        assert set(m["after"]) & every == leaving[name], name
        assert all(ph["steps"] == 2 for ph in m["phases"])
        saved = load_file(str(run_dir / sl.STAGES[name].directory / "adapter.safetensors"))
        added_layers = ("layers.0.", "layers.3.") if name in ("s4", "s5") else ()  # the duplicated edges
        base_weights = [k for k in saved if ".lora_" not in k and not k.startswith("language_embedding.")
                        and not k.startswith(added_layers)]
        assert not base_weights, base_weights  # base weights are never copied into a run
        assert m["additions"] == sum(v.numel() for v in saved.values())
    assert meta(run_dir, "s2")["english_reference"] == meta(run_dir, "s2")["before"]["en_accuracy"]
    # s1.1's "before" English answers are s1's for the same model, not a second scoring
    assert meta(run_dir, "s1_1")["before"]["en_correct"] == gate["en_correct"][gate["chosen"]]
    # one gate check, at the end of the budget: the 270M's defaults (which --model takes) make no check at half of it
    assert [c["steps"] for c in meta(run_dir, "s1_1")["gate_checks"]] == [2]
    assert meta(run_dir, "s3")["guard"]["passed"] and meta(run_dir, "s3")["guard"]["rounds"] == 0
    s4 = meta(run_dir, "s4")
    assert [e["op"] for e in s4["surgery"]] == ["add_lora", "snapshot_adapter", "add_language_embeddings",
                                                "duplicate_edge_layers"]
    assert [ph["phase"] for ph in s4["phases"]] == ["korean", "translation"]
    for phase in ("korean", "translation"):  # the duplicated layers at their own rate
        state = next((run_dir / "s4_translate" / phase / "checkpoints").glob("step-*/state.json"))
        assert json.loads(state.read_text())["config"]["added_lr_scale"] == sl.ADDED_LR_SCALE
    assert "reasoning_compliance" in meta(run_dir, "s5")["after"]
    state = next((run_dir / "s5_reasoning" / "train" / "checkpoints").glob("step-*/state.json"))
    assert json.loads(state.read_text())["config"]["english_batch"] == sl.ENGLISH_BATCH["270m"]["s5"]
    # A stage's saved state reloads to the same architecture and weights.
    model, _, _ = sl.load_run_model_after(run_dir, "s5", "cpu", model=str(tiny_dir))
    assert model.config.num_layers == 4 and model.language_embedding is not None

    import medko
    assert medko.main(["test", "--run-dir", str(run_dir), "--device", "cpu"]) == 0
    # The drift it prints names its teacher and source: compare's "from the base" is another number.
    assert "KL from the stage's teacher (s5's measurement of held-out English texts" in capsys.readouterr().out
    assert medko.main(["test", "--run-dir", str(run_dir), "--device", "cpu"]) == 1  # scored once
    assert "scored once" in capsys.readouterr().err
    assert medko.main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    formulation = gate["formulation"]
    assert formulation in ("logits", "cloze") and set(gate["formulations"][gate["chosen"]]) == {"formulation", "why"}
    assert f"Korean dev accuracy across the curriculum (entering s2 → after s5, {formulation}): accuracy " in report
    assert "## The English–Korean gap" in report and "dev, entering s2" in report and "test, final model (cloze)" in report
    test = json.loads((run_dir / "test_report.json").read_text())
    assert test["formulation"] == formulation and set(test["formulations"]) == {"logits", "cloze"}
    for scored in test["formulations"].values():
        assert scored["ko"]["n"] == scored["en"]["n"] == 12 and scored["languages"]["n"] == 12
        for lang in ("ko", "en"):  # each scoring's predictions in a file of their own, one line a question
            assert "predictions" not in scored[lang]
            assert len((run_dir / scored[lang]["predictions_file"]).read_text().splitlines()) == 12
    assert len(test["reasoning"]["strict"]) == 12  # s5 trained the answer line: scored on test too
    # The baseline's budget: what s2-s5 trained on their own data, counted without training.
    opts = sl.StageOptions(run_dir=run_dir, model=str(tiny_dir), max_steps=2, max_len=1024)
    budget = sl.curriculum_tokens(opts, sl.load_run_data(run_dir), sl.Tokenizer(tiny_dir / "tokenizer.json"))
    assert budget == {name: sum(ph["tokens"] for ph in meta(run_dir, name)["phases"]) for name in ("s2", "s3", "s4", "s5")}
    # --budget multiplies each phase's default steps (never below one), and the baseline's tokens follow them.
    size = sl.StageRun("s2", opts).base["size"]
    for budget_x in (0.01, 2.5):
        longer = replace(opts, max_steps=None, budget=budget_x)
        for name in ("s1_1", "s2", "s3", "s4", "s5"):
            assert sl.StageRun(name, longer).steps() == max(1, round(sl.STAGE_DEFAULTS[size][name][0] * budget_x))
    once, twice = (sl.curriculum_tokens(replace(opts, max_steps=None, budget=b), sl.load_run_data(run_dir),
                                        sl.Tokenizer(tiny_dir / "tokenizer.json")) for b in (1, 2))
    assert all(once[name] < twice[name] for name in once)
    for title in ("s1.1 english", "s2 embed", "s3 korean", "s4 translate", "s5 reasoning", "Test split", "dentist"):
        assert title in report
    assert (run_dir / "report.png").read_bytes()[:4] == b"\x89PNG"
    export = tmp_path / "export"
    assert medko.main(["export", str(run_dir / "s5_reasoning"), "--out", str(export)]) == 0
    assert json.loads((export / "config.json").read_text())["num_hidden_layers"] == 4


def test_lora_sft_baseline_trains_the_curriculums_tokens_and_compares(gated_run, tiny_dir, tmp_path, capsys):
    run_dir = copy_run(gated_run, tmp_path / "sft")
    assert stage("sft", run_dir, tiny_dir) == 0
    m = meta(run_dir, "sft")
    assert [e["op"] for e in m["surgery"]] == ["add_lora"]  # no language vectors, no added layers, no teacher
    assert m["trained_tokens"] >= sum(m["curriculum_tokens"].values()) and "guard" not in m
    assert m["before"]["drift"] == 0.0 and m["after"]["drift"] > 0 and "reasoning_compliance" in m["after"]
    import medko
    assert medko.main(["test", "--run-dir", str(run_dir), "--device", "cpu"]) == 0
    assert medko.main(["report", str(run_dir)]) == 0
    assert "lora-sft baseline" in (run_dir / "report.md").read_text()
    capsys.readouterr()
    out = tmp_path / "compare.json"
    assert medko.main(["compare", "base", str(run_dir), "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {r["measure"]: r for r in json.loads(out.read_text())["rows"]}
    for measure in ("Korean cloze", "English cloze", "EN−KO gap cloze", "answered alike EN/KO cloze", "Korean logits",
                    "English held-out loss", "English drift from the base"):
        assert measure in rows and f"| {measure} (n " in printed, measure
    assert rows["English drift from the base"]["a"]["value"] == 0.0  # the base against itself
    assert (run_dir / "base_test_report.json").is_file()  # the base's test split, scored once and kept
    sft_ko = json.loads((run_dir / "test_report.json").read_text())["formulations"]["cloze"]["ko"]["accuracy"]
    assert rows["Korean cloze"]["b"]["value"] == sft_ko


def test_gate_pass_skips_the_english_stage(tiny_dir, tmp_path, capsys):
    run_dir = tmp_path / "passing"
    assert stage("s0", run_dir, tiny_dir) == 0
    assert stage("s1", run_dir, tiny_dir, "--gate", "0.0") == 0
    assert not meta(run_dir, "s1")["needs_english"]
    assert stage("s1_1", run_dir, tiny_dir) == 1
    assert "s1.1 is not needed" in capsys.readouterr().err
    assert stage("s2", run_dir, tiny_dir, "--gate", "0.0") == 0
    assert meta(run_dir, "s2")["surgery"][0]["op"] == "add_language_embeddings"  # no lora1 to snapshot


def test_stages_refuse_to_run_out_of_order(tiny_dir, tmp_path, capsys):
    assert stage("s3", tmp_path / "empty", tiny_dir) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("medko: s3 needs s2, which has not finished") and "\n" not in err


def test_guard_failure_runs_recovery_then_stops_with_the_best_state(gated_run, tiny_dir, tmp_path, capsys):
    run_dir = copy_run(gated_run, tmp_path / "failing")
    for name in ("s1_1", "s2"):
        assert stage(name, run_dir, tiny_dir) == 0
    # A reference of 1.0 with --gate 1 and no tolerance puts the threshold above any accuracy: the guard must fail.
    s2_meta = run_dir / "s2_embed" / "meta.json"
    s2_meta.write_text(json.dumps({**json.loads(s2_meta.read_text()), "english_reference": 1.0}))
    assert stage("s3", run_dir, tiny_dir, "--gate", "1", "--tolerance", "0", "--guard-rounds", "2") == 1
    err = capsys.readouterr().err
    assert "English guard failed after s3" in err and "best state" in err
    m = meta(run_dir, "s3")
    assert m["status"] == "guard_failed" and m["guard"]["rounds"] == 2 and len(m["guard"]["history"]) == 3
    assert m["guard"]["kept_accuracy"] == max(m["guard"]["history"])
    for round_dir in ("guard_round1", "guard_round2"):
        assert (run_dir / "s3_korean" / round_dir / "metrics.jsonl").read_text().strip()
    assert stage("s4", run_dir, tiny_dir) == 1
    assert "ended with status 'guard_failed'" in capsys.readouterr().err


def test_a_guard_passed_after_recovery_keeps_the_measures_of_the_kept_state(gated_run, tiny_dir, tmp_path,
                                                                           monkeypatch):
    run_dir = copy_run(gated_run, tmp_path / "recovered")
    for name in ("s1_1", "s2"):
        assert stage(name, run_dir, tiny_dir) == 0
    real, calls = sl.guard_check, {"n": 0}

    def fails_first(*args, **kwargs):  # the trained state fails, the first recovery round passes
        calls["n"] += 1
        return {**real(*args, **kwargs), "passed": False} if calls["n"] == 1 else real(*args, **kwargs)

    monkeypatch.setattr(sl, "guard_check", fails_first)
    assert stage("s3", run_dir, tiny_dir, "--tolerance", "1") == 0
    m = meta(run_dir, "s3")
    assert m["guard"]["passed"] and m["guard"]["rounds"] == 1 and "after_training" in m["guard"]
    # "after" is the kept state's: its English measures come from the guard's last check, the rest measured anew
    model, tokenizer, _ = sl.load_run_model_after(run_dir, "s3", "cpu", model=str(tiny_dir))
    opts = sl.StageOptions(run_dir=str(run_dir), max_len=1024)
    fresh = sl.measure(model, tokenizer, run_dir, sl.load_run_data(run_dir), opts, sl.STAGE_MEASURES["s3"])
    assert set(m["after"]) == set(fresh)
    assert m["after"]["en_correct"] == fresh["en_correct"]
    for key in ("ko_losses", "en_losses", "drifts"):
        assert m["after"][key] == pytest.approx(fresh[key], abs=1e-4), key


def test_killed_stage_resumes_to_the_uninterrupted_result(gated_run, tiny_dir, tmp_path, monkeypatch, capsys):
    straight = copy_run(gated_run, tmp_path / "straight")
    killed = copy_run(gated_run, tmp_path / "killed")
    for run_dir in (straight, killed):
        assert stage("s1_1", run_dir, tiny_dir, "--max-steps", "4", "--english-rounds", "1") == 0
    assert stage("s2", straight, tiny_dir, "--max-steps", "4") == 0

    real, calls = accumulate_gradients, {"n": 0}

    def dies_at_step_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.trainer, "accumulate_gradients", dies_at_step_three)
    capsys.readouterr()
    assert stage("s2", killed, tiny_dir, "--max-steps", "4") == 130  # Ctrl-C: one line after the save
    assert capsys.readouterr().err.splitlines()[-1] == f"medko: s2 interrupted; continue it with --resume " \
                                                       f"({killed / 's2_embed'})"
    monkeypatch.setattr(engine.trainer, "accumulate_gradients", real)
    assert not (killed / "s2_embed" / "meta.json").exists()
    assert not list(killed.glob(".*.lock"))  # an interrupted stage takes its lock file with it
    assert stage("s2", killed, tiny_dir, "--max-steps", "4") == 1  # an existing stage needs --resume
    assert stage("s2", killed, tiny_dir, "--max-steps", "4", "--resume") == 0
    a = load_file(str(straight / "s2_embed" / "adapter.safetensors"))
    b = load_file(str(killed / "s2_embed" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert meta(straight, "s2")["after"] == meta(killed, "s2")["after"]


def test_sigterm_saves_the_last_step_and_the_resume_matches(gated_run, tiny_dir, tmp_path):
    """A real SIGTERM (a cluster's preemption) to a stage training in its own process, as SLURM sends it."""
    entered = copy_run(gated_run, tmp_path / "entered")
    assert stage("s1_1", entered, tiny_dir, "--max-steps", "4", "--english-rounds", "1") == 0
    straight, killed = copy_run(entered, tmp_path / "straight"), copy_run(entered, tmp_path / "killed")
    args = ["--model", str(tiny_dir), "--run-dir", str(killed), "--max-steps", "6", "--max-len", "1024"]
    # Step 4 is done and its checkpoint not due (save_every is 3): the fifth step's forward pass waits for the signal.
    waits = ("import sys, time, torch, engine.trainer as t, s2_embed; torch.set_num_threads(int(sys.argv[1])); "
             "real, n = t.accumulate_gradients, [0]\n"
             "def waits(*a):\n n[0] += 1\n if n[0] == 5: print('step 4 done', flush=True); time.sleep(120)\n"
             " return real(*a)\n"
             "t.accumulate_gradients = waits; sys.exit(s2_embed.main(sys.argv[2:]))")
    # One thread in all three processes: a reduction split over threads that the other tests' load can reorder
    # (under the full suite on 2 cores) would make bit-identical weights a matter of luck.
    child = subprocess.Popen([sys.executable, "-c", waits, "1", *args], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'stages'}"})
    try:
        assert child.stdout.readline().strip() == "step 4 done"
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 143, err[-3000:]
    assert err.splitlines()[-1] == f"medko: s2 terminated (SIGTERM); continue it with --resume ({killed / 's2_embed'})"
    assert "Traceback" not in err
    assert sl.latest_checkpoint(killed / "s2_embed" / "train").name == "step-00000004"  # the last completed step
    # Both runs train in fresh processes like the killed one: a global torch setting another test left in this
    # process would otherwise make the in-process steps differ from the child's.
    threads, env = "1", {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'stages'}"}
    again = "import sys, torch, s2_embed; torch.set_num_threads(int(sys.argv[1])); sys.exit(s2_embed.main(sys.argv[2:]))"
    for run_dir, extra in ((killed, ["--resume"]), (straight, [])):
        done = subprocess.run([sys.executable, "-c", again, threads, *args[:3], str(run_dir), *args[4:], *extra],
                              cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    a = load_file(str(straight / "s2_embed" / "adapter.safetensors"))
    b = load_file(str(killed / "s2_embed" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert meta(straight, "s2")["after"] == meta(killed, "s2")["after"]


def test_run_sh_smoke_on_the_tiny_model(tiny_dir, small_data, tmp_path):
    """`bash run.sh --smoke --log-to tensorboard --budget 4` as a user runs it: every stage, the cut measurements, a
    report that says it is a smoke run, files others can read, no lock left, and each stage's curves in TensorBoard.
    --budget reaches every stage (each would refuse an option it does not take); the smoke run's one step wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.smoke import SMOKE_HELD_OUT, SMOKE_TEST_QUESTIONS

    run_dir = tmp_path / "smoke"
    env = {**os.environ, "S0_ARGS": f"--data {small_data}", "S1_ARGS": "--translate-tokens 2",
           "S4_ARGS": "--translate-tokens 2", "S5_ARGS": "--reasoning-tokens 2", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(["bash", str(ROOT / "run.sh"), "--model", str(tiny_dir), "--smoke", "--log-to", "tensorboard",
                          "--budget", "4", "--max-len", "1024", "--run-dir", str(run_dir)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "its numbers mean nothing" in (run_dir / "report.md").read_text().splitlines()[2]
    # A colleague can read what the run wrote (the test runs under whatever umask pytest has: compare with it).
    mask = os.umask(0)
    os.umask(mask)
    shared = [run_dir / n for n in ("report.md", "report.png", "test_report.json")] + list(run_dir.glob("s*/meta.json"))
    shared += list(run_dir.glob("s*/*/metrics.jsonl")) + list(run_dir.glob("test_predictions/*.jsonl"))
    modes = {str(f.relative_to(run_dir)): oct(f.stat().st_mode & 0o777) for f in shared}
    assert len(modes) == 20 and set(modes.values()) == {oct(0o666 & ~mask)}, modes
    assert not list(run_dir.glob(".*.lock"))
    test = json.loads((run_dir / "test_report.json").read_text())
    assert test["n"] == SMOKE_TEST_QUESTIONS < 12 and test["english"]["n"] == SMOKE_TEST_QUESTIONS  # of 12
    for name in ("s1_1", "s2", "s3", "s4", "s5"):
        m = meta(run_dir, name)
        assert m["smoke"] and all(ph["steps"] == 1 for ph in m["phases"]), name
        assert len(m["after"]["en_losses"]) == SMOKE_HELD_OUT < meta(run_dir, "s0")["counts"]["en_heldout.jsonl"]
        # Each stage is a TensorBoard run; its event file holds each phase's loss curve as metrics.jsonl has it,
        # the measures entering and leaving it, and the guard's checks.
        events = EventAccumulator(str(run_dir / "tensorboard" / sl.STAGES[name].directory))
        events.Reload()
        tags = events.Tags()["scalars"]
        for phase in m["phases"]:
            logged = [json.loads(line) for line in
                      (run_dir / sl.STAGES[name].directory / phase["phase"] / "metrics.jsonl").read_text().splitlines()]
            curve = [(e.step, e.value) for e in events.Scalars(f"{phase['phase']}/loss")]
            assert curve == [(r["step"], pytest.approx(r["loss"])) for r in logged], (name, phase["phase"])
        assert {"eval/en_loss", "eval/drift"} <= set(tags) or name == "s1_1", (name, tags)
        assert ("guard/drift" in tags) == (name in ("s3", "s4", "s5")), (name, tags)
    assert [ph["phase"] for ph in meta(run_dir, "s4")["phases"]] == ["korean", "translation"]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """A stage script as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{SCRIPTS[name]}.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_a_second_writer_is_refused_and_a_dead_holder_is_taken_over(tiny_dir, tmp_path):
    run_dir = tmp_path / "locked"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, shared_logic as sl; "
         "run = sl.StageRun('s0', sl.StageOptions(run_dir=sys.argv[1])); run.start(); print('started', flush=True); "
         "time.sleep(300)", str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "started"
        second = run_script("s0", "--run-dir", str(run_dir), "--model", str(tiny_dir), "--resume")
        assert second.returncode == 1
        assert second.stderr.splitlines()[-1] == (
            f"medko: {run_dir / 's0_data'} is in use by process {holder.pid} (lock {run_dir / '.s0_data.lock'}); "
            f"wait for it to end or stop it, then run again")
    finally:
        holder.kill()
        holder.wait()
    # The holder died with its lock taken and its empty directory made: the next writer takes both over.
    taken = run_script("s0", "--run-dir", str(run_dir), "--model", str(tiny_dir), "--resume")
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert meta(run_dir, "s0")["status"] == "done"
    assert not (run_dir / ".s0_data.lock").exists()  # and removes it when it ends


def test_a_stage_that_fails_before_its_first_checkpoint_leaves_no_directory(gated_run, tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    fresh = tmp_path / "fresh"
    refused = run_script("s0", "--run-dir", str(fresh), "--model", str(tiny_dir), "--ko-text", str(bad))
    assert refused.returncode == 1 and f"{bad}:2: field 'text' is missing or empty" in refused.stderr.splitlines()[-1]
    assert not fresh.exists()  # nor the run directory it made

    offline = tmp_path / "offline"
    assert stage("s0", offline, tiny_dir) == 0
    hub = subprocess.run([sys.executable, str(ROOT / "stages" / "s1_gate.py"), "--run-dir", str(offline), "--size",
                          "4b"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert hub.returncode == 1 and "is not in the local cache" in hub.stderr.splitlines()[-1]
    assert not (offline / "s1_gate").exists() and (offline / "s0_data" / "meta.json").is_file()
    assert not list(offline.glob(".*.lock"))  # a failed stage leaves no lock file, nor does a finished one

    run_dir = copy_run(gated_run, tmp_path / "clash")
    assert stage("s1_1", run_dir, tiny_dir) == 0
    # A different --size now follows the gate's choice (issue 10); a different --model is still a clash.
    clash = run_script("s2", "--run-dir", str(run_dir), "--model", str(tmp_path / "another"), "--max-steps", "1")
    assert clash.returncode == 1 and "drop --model or use a new --run-dir" in clash.stderr.splitlines()[-1]
    assert not (run_dir / "s2_embed").exists() and (run_dir / "s1_1_english" / "meta.json").is_file()
    assert stage("s2", run_dir, tiny_dir, "--max-steps", "1") == 0  # no "exists; pass --resume"


def test_resume_does_not_retrain_a_finished_stage(gated_run, tiny_dir, tmp_path, capsys):
    run_dir = copy_run(gated_run, tmp_path / "finished")
    before = (run_dir / "s1_gate" / "meta.json").read_text()
    assert stage("s1", run_dir, tiny_dir, "--resume", "--max-steps", "5") == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"medko: s1 already ended in {run_dir / 's1_gate'} with status 'done'; --resume continues only an "
        f"interrupted stage: delete {run_dir / 's1_gate'} and the stages after it to train it again")
    assert (run_dir / "s1_gate" / "meta.json").read_text() == before


def test_skip_bad_covers_every_source_and_is_recorded(tiny_dir, tmp_path, capsys):
    files = {}
    for flag, fields in (("--ko-text", ("text",)), ("--en-text", ("text",)), ("--pairs", ("ko", "en"))):
        rows = [json.dumps({f: f"{flag} {f} {i}" for f in fields}) for i in range(20)]
        files[flag] = tmp_path / f"{flag[2:]}.jsonl"
        files[flag].write_text("\n".join(rows[:7] + ['{"wrong": 1}'] + rows[7:]) + "\n")
    args = [a for flag, path in files.items() for a in (flag, str(path))]
    assert stage("s0", tmp_path / "strict", tiny_dir, *args) == 1
    assert capsys.readouterr().err.splitlines()[-1].endswith("fix the row, or skip bad rows with --skip-bad")

    run_dir = tmp_path / "skipping"
    assert stage("s0", run_dir, tiny_dir, *args, "--skip-bad") == 0
    left_out = meta(run_dir, "s0")["left_out"]
    assert {k: v["skipped"] for k, v in left_out.items() if v["skipped"]} == {"ko_text": 1, "en_text": 1, "pairs": 1}
    assert meta(run_dir, "s0")["counts"]["pairs.jsonl"] == 20
    assert sl.write_run_report(run_dir).read_text().count(" 1 bad, 0 repeated") == 3

    assert stage("s0", tmp_path / "too_bad", tiny_dir, *args, "--skip-bad", "--max-bad", "0.01") == 1
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "1 of 21 rows of ko_text are bad, more than --max-bad 1%; fix that source or raise --max-bad")


def test_s0_reads_other_encodings_and_records_repeats_and_nfc(tiny_dir, tmp_path, capsys):
    import unicodedata

    ko, en, pairs = tmp_path / "ko.jsonl", tmp_path / "en.jsonl", tmp_path / "pairs.jsonl"
    lines = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)  # noqa: E731
    ko.write_text(lines([{"text": unicodedata.normalize("NFD", f"한국어 문장 {i}")} for i in range(3)]
                        + [{"text": f"text {i}"} for i in range(17)] + [{"text": "text 0"}]))
    en.write_bytes(b"\xef\xbb\xbf" + lines([{"text": f"English {i}"} for i in range(20)]).encode())  # a BOM
    pair_rows = [{"ko": f"원문 {i}", "en": f"source {i}"} for i in range(20)] + [{"ko": "원문 3", "en": "other"}]
    pairs.write_bytes(lines(pair_rows).encode("cp949"))
    args = ["--ko-text", str(ko), "--en-text", str(en), "--pairs", str(pairs)]
    assert stage("s0", tmp_path / "strict", tiny_dir, *args) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"medko: {pairs}:1: byte offset 8 ")
    assert stage("s0", tmp_path / "auto", tiny_dir, *args, "--encoding", "auto") == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"medko: pairs: {pairs}:21 repeats {pairs}:4 with another translation ('other', there 'source 3'); fix one "
        f"of them, or drop both with --skip-bad")
    run_dir = tmp_path / "kept"
    assert stage("s0", run_dir, tiny_dir, *args, "--encoding", "auto", "--skip-bad") == 0
    left_out = meta(run_dir, "s0")["left_out"]
    assert left_out["ko_text"] == {"skipped": 0, "dropped": 0, "conflicting": 0, "repeated": 1, "normalized": 3}
    assert left_out["pairs"]["conflicting"] == 2 and meta(run_dir, "s0")["counts"]["pairs.jsonl"] == 19
    assert "한국어 문장 0" in (run_dir / "s0_data" / "ko_text.jsonl").read_text()  # composed (NFC) again
    assert ("Rows within a source: ko_text 1 repeated, 0 dropped for another answer, 3 NFC-normalised, pairs 0 "
            "repeated, 2 dropped for another answer, 0 NFC-normalised.") in sl.write_run_report(run_dir).read_text()


def test_gate_compares_small_and_large_for_hub_sizes():
    assert sl.gate_candidates("4b") == ["4b", "27b"]
    assert sl.gate_candidates("27b") == ["4b", "27b"]
    assert sl.gate_candidates(None) == ["270m"]
    assert sl.gate_candidates("27b", "27b") == ["27b"]


def test_later_stages_use_the_gate_choice_whatever_size_run_sh_passes(tmp_path, caplog):
    (tmp_path / "s1_gate").mkdir()
    (tmp_path / "s1_gate" / "meta.json").write_text(json.dumps({"status": "done", "base": {"size": "4b", "model": None}}))
    with caplog.at_level("INFO", logger="medko"):
        assert sl.run_base(tmp_path, "27b", None) == {"size": "4b", "model": None}
    assert "the gate chose 4b" in caplog.text
    with pytest.raises(sl.MedkoError, match="drop --model"):
        sl.run_base(tmp_path, None, "/some/model")
