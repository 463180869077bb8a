"""--log-to: live curves mirrored to TensorBoard (read back with tensorboard's own event reader) or W&B (offline
unless the user is logged in); a missing package is one sentence naming its pip install."""
import json
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.errors import MedkoError
from engine.examples import text_examples
from engine.loggers import MetricLogger, log_stage, open_logger
from engine.phase_losses import stage_loss
from engine.trainer import TrainConfig, set_trainable, train


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_training_curves_reach_tensorboard_as_metrics_jsonl_has_them(tiny_model, tiny_tokenizer, tmp_path):
    examples = text_examples(tiny_tokenizer, ["The heart pumps blood.", "Insulin lowers glucose."] * 4, 64)
    set_trainable(tiny_model, ["layers.0.mlp.*"])
    logger = open_logger("tensorboard", tmp_path / "run", "s3_korean")
    config = TrainConfig(max_steps=3, batch_size=2, log_every=1, device="cpu")
    train(tiny_model, stage_loss("mse", 0.0), examples, config, tmp_path / "phase", logger=logger, log_group="korean")
    logger.close()
    logged = [json.loads(line) for line in (tmp_path / "phase" / "metrics.jsonl").read_text().splitlines()]
    curves = scalars(tmp_path / "run" / "tensorboard" / "s3_korean")
    assert [s for s, _ in curves["korean/loss"]] == [1, 2, 3]
    assert [v for _, v in curves["korean/loss"]] == pytest.approx([r["loss"] for r in logged])
    assert [v for _, v in curves["korean/lr"]] == pytest.approx([r["lr"] for r in logged])


def test_a_stage_logs_its_evaluation_points_and_guard_checks(tmp_path):
    meta = {"phases": [{"steps": 6}, {"steps": 6}],
            "before": {"drift": 0.01, "en_correct": [True, False], "en_accuracy": 0.5},
            "after": {"drift": 0.04, "en_accuracy": 0.25, "reasoning_compliance": 0.9},
            "guard": {"history": [0.2, 0.3], "drift_history": [0.07, 0.045], "threshold": 0.15, "drift_bound": 0.05}}
    logger = open_logger("tensorboard", tmp_path, "s4_translate")
    log_stage(logger, meta)
    logger.close()
    curves = scalars(tmp_path / "tensorboard" / "s4_translate")
    assert curves["eval/drift"] == [(0, pytest.approx(0.01)), (12, pytest.approx(0.04))]  # entering, after 12 steps
    assert curves["eval/reasoning_compliance"] == [(12, pytest.approx(0.9))]
    assert "eval/en_correct" not in curves  # per-question answers are not a curve
    assert curves["guard/drift"] == [(0, pytest.approx(0.07)), (1, pytest.approx(0.045))]
    assert [v for _, v in curves["guard/drift_bound"]] == pytest.approx([0.05, 0.05])


@pytest.mark.parametrize("kind, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_is_one_sentence_naming_its_install(kind, package, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import now raises ImportError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(MedkoError) as err:
        open_logger(kind, tmp_path, "s2_embed")
    assert str(err.value) == f"--log-to {kind} needs the {package} package: pip install {package}"


class FakeWandb(types.ModuleType):
    """wandb's calls medko makes, recorded (wandb is not installed here, and a test must not reach the network)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.metrics, self.finished = [], [], [], False

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self
        return types.SimpleNamespace(log=self.logged.append, finish=lambda: setattr(fake, "finished", True),
                                     define_metric=lambda name, **kw: fake.metrics.append((name, kw)))


@pytest.mark.parametrize("env, mode", [({}, "offline"), ({"WANDB_API_KEY": "k"}, "online"),
                                       ({"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}, "disabled")])
def test_wandb_runs_offline_unless_the_user_is_logged_in(env, mode, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    for key in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    logger = open_logger("wandb", tmp_path / "default", "s3_korean", {"lr": 1e-4, "run_dir": tmp_path})
    logger.log("train", {"loss": 2.5, "lr": 1e-4}, 1)
    logger.log("train", {"loss": 2.25, "lr": 1e-4}, 2)
    logger.close()
    init = fake.inits[0]
    assert init["mode"] == mode and init["name"] == "default/s3_korean" and init["group"] == "default"
    assert init["dir"] == str(tmp_path / "default" / "wandb") and init["config"]["run_dir"] == str(tmp_path)
    assert fake.logged == [{"train/step": 1, "train/loss": 2.5, "train/lr": 1e-4},
                           {"train/step": 2, "train/loss": 2.25, "train/lr": 1e-4}]
    assert ("train/*", {"step_metric": "train/step"}) in fake.metrics and fake.finished


def test_wandb_login_in_netrc_counts_as_logged_in(tmp_path, monkeypatch):
    from engine.loggers import wandb_logged_in

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    assert not wandb_logged_in()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_logged_in()


def test_without_log_to_nothing_is_written(tmp_path):
    logger = open_logger(None, tmp_path, "s2_embed")
    assert type(logger) is MetricLogger
    logger.log("train", {"loss": 1.0}, 1)
    logger.close()
    assert not any(tmp_path.iterdir())
