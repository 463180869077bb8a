"""Live training curves for the tools researchers watch (`--log-to tensorboard` or `--log-to wandb`): one small
interface, MetricLogger, that the training loop and the stage runner write scalars to. metrics.jsonl and meta.json
stay the record of a run; a logger only mirrors numbers to a viewer, so nothing reads them back.

Both back ends are optional dependencies, imported only when asked for. Imports engine.errors.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Mapping

from engine.errors import MedkoError, log

LOG_TO = ("tensorboard", "wandb")


class MetricLogger:
    """Scalars under `group/name` at a step of that group. This base logs nothing: a run without --log-to (and
    every rank but 0 under torchrun) uses it, so callers never check."""

    def log(self, group: str, values: Mapping[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _scalars(values: Mapping[str, object]) -> dict[str, float]:
    """The plain numbers of `values` (booleans and lists, such as per-question answers, are not curves)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger(MetricLogger):
    """Event files in `directory`, written by torch.utils.tensorboard's SummaryWriter and flushed at every call,
    so a stage killed mid-run still shows its curve up to the kill."""

    def __init__(self, directory: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MedkoError("--log-to tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(directory))

    def log(self, group: str, values: Mapping[str, float], step: int) -> None:
        for name, value in _scalars(values).items():
            self.writer.add_scalar(f"{group}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_logged_in() -> bool:
    """Whether this user gave W&B a key: WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(MetricLogger):
    """One W&B run per stage, named RUN/STAGE and grouped by the run, its files under `directory`. Offline unless
    the user is logged in (WANDB_MODE, when set, decides instead); `wandb sync` uploads an offline run later.
    Each group has its own step axis (`group/step`), since a stage's phases each count from 1."""

    def __init__(self, directory: Path, run: str, stage: str, config: Mapping[str, object]):
        try:
            import wandb
        except ImportError:
            raise MedkoError("--log-to wandb needs the wandb package: pip install wandb") from None
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
        directory.mkdir(parents=True, exist_ok=True)
        config = {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in config.items()}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "medko"), name=f"{run}/{stage}", group=run,
                              job_type=stage, dir=str(directory), mode=mode, config=config)
        self.groups: set[str] = set()
        log.info("W&B %s run %s/%s in %s", mode, run, stage, directory)

    def log(self, group: str, values: Mapping[str, float], step: int) -> None:
        if group not in self.groups:
            self.groups.add(group)
            self.run.define_metric(f"{group}/step")
            self.run.define_metric(f"{group}/*", step_metric=f"{group}/step")
        self.run.log({f"{group}/step": step, **{f"{group}/{k}": v for k, v in _scalars(values).items()}})

    def close(self) -> None:
        self.run.finish()


def log_stage(logger: MetricLogger, meta: Mapping[str, object]) -> None:
    """A finished stage's evaluation points and guard, from its meta.json record: the measures entering it at step 0
    and after it at its steps trained (group `eval`), and each of the English guard's checks, its accuracy and
    drift against their floor and bound, at its recovery round (group `guard`, round 0 the trained state)."""
    steps = sum(phase["steps"] for phase in meta.get("phases") or [])
    for step, key in ((0, "before"), (steps, "after")):
        if meta.get(key):
            logger.log("eval", meta[key], step)
    guard = meta.get("guard")
    for i, (accuracy, drift) in enumerate(zip(guard["history"], guard["drift_history"]) if guard else ()):
        logger.log("guard", {"accuracy": accuracy, "drift": drift, "accuracy_floor": guard["threshold"],
                             "drift_bound": guard["drift_bound"]}, i)


def open_logger(kind: str | None, run_dir: Path, stage: str, config: Mapping[str, object] | None = None
                ) -> MetricLogger:
    """The logger --log-to names for one stage of a run: TensorBoard events in RUN_DIR/tensorboard/STAGE (each
    stage a TensorBoard run: `tensorboard --logdir RUN_DIR/tensorboard`), W&B files in RUN_DIR/wandb."""
    if kind is None:
        return MetricLogger()
    if kind == "tensorboard":
        return TensorBoardLogger(Path(run_dir) / "tensorboard" / stage)
    if kind == "wandb":
        return WandbLogger(Path(run_dir) / "wandb", Path(run_dir).name, stage, config or {})
    raise MedkoError(f"--log-to {kind!r} is not known; give one of {', '.join(LOG_TO)}")
