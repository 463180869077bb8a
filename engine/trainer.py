"""The training loop: TrainConfig, the batch of each step, trainable parameters, the optimizer, and train().

Under torchrun (engine.distributed) each rank trains on its contiguous share of every global micro-batch, each
loss is divided by the global target count and the gradients are summed over the ranks, so N processes with
micro-batches of b examples take the same updates as one process with N*b (config.batch_size is that N*b).

Imports engine.distributed, engine.errors, engine.examples, engine.files, engine.loggers, engine.model and
engine.train_checkpoints.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import math
import sys
import time
from array import array
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from engine import distributed
from engine.errors import MedkoError, log
from engine.files import write_text_atomic
from engine.loggers import MetricLogger
from engine.model import compute_dtype, model_dtype, resolve_device, strict_config
from engine.examples import Example, collate, pack
from engine.train_checkpoints import (
    SLACK,
    _rng_state,
    _set_rng_state,
    checkpoint_bytes,
    latest_checkpoint,
    load_checkpoint,
    prepare_directory,
    resumable_checkpoint,
    save_checkpoint,
)


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer updates; the only field that may change on resume
    batch_size: int = 8  # examples per micro-batch over all processes; each of N takes batch_size/N of them
    grad_accum: int = 1  # micro-batches per optimizer update
    lr: float = 1e-4  # peak learning rate, reached at the end of warm-up
    weight_decay: float = 0.0  # AdamW decay of matrices; vectors, norms and embeddings are never decayed
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio; 1.0 keeps lr constant
    clip_norm: float = 1.0  # global gradient-norm clip; 0 turns clipping off
    max_len: int = 512  # tokens per example, and per packed row; longer batches are refused
    pack: bool = True  # pack each micro-batch's examples into as few rows of max_len as fit (no padding waste)
    seed: int = 0  # data order and torch RNG (dropout) of a fresh run
    log_every: int = 10  # steps between metrics.jsonl lines
    save_every: int = 100  # steps between checkpoints; one is also written at the end
    gradient_checkpointing: bool = False  # recompute each layer in backward to save activation memory
    device: str = "auto"  # "auto" is cuda when available, else cpu
    added_lr_scale: float = 1.0  # the rate of added (duplicated) layers' parameters over lr
    english_batch: int | None = None  # English texts per micro-batch for a per-layer loss (None: batch_size)

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "max_len", "log_every", "save_every")
        bad = [name for name in positive if getattr(self, name) < 1]
        if bad:
            raise MedkoError(f"train config fields {bad} must be at least 1; fix them")
        if self.english_batch is not None and self.english_batch < 1:
            raise MedkoError(f"train config english_batch is {self.english_batch}; give at least 1, or None")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise MedkoError(f"train config min_lr_ratio is {self.min_lr_ratio}; give a value in [0, 1]")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return strict_config(cls, values, "train config")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of update `step` (0-based): linear warm-up, then cosine down to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> array:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return array("q", torch.randperm(n, generator=generator).numpy().tobytes())  # 8 bytes an example, not 36


def batch_at(examples: Sequence[Example], step: int, micro: int, config: TrainConfig) -> dict[str, torch.Tensor]:
    """Micro-batch `micro` of update `step`: a pure function of (seed, step, micro), so resume repeats it.

    The examples are read as one endless stream, each epoch a fresh permutation seeded by (seed, epoch). Under
    torchrun this rank packs only its contiguous share of the micro-batch's examples.
    """
    n = len(examples)
    first = (step * config.grad_accum + micro) * config.batch_size
    positions = range(first, first + config.batch_size)
    chosen = distributed.share([examples[_epoch_order(n, config.seed, p // n)[p % n]] for p in positions])
    return pack(chosen, config.max_len) if config.pack else collate(chosen)


def step_tokens(examples: Sequence[Example], config: TrainConfig, step: int) -> int:
    """The tokens update `step` reads from `examples` (all processes together), as batch_at chooses them: what a
    phase trains on, counted without running it."""
    n, per_step = len(examples), config.grad_accum * config.batch_size
    return sum(len(examples[_epoch_order(n, config.seed, p // n)[p % n]].ids)
               for p in range(step * per_step, (step + 1) * per_step))


def steps_for_tokens(examples: Sequence[Example], config: TrainConfig, budget: int) -> int:
    """The fewest updates whose tokens reach `budget` (at least one)."""
    total, step = 0, 0
    while total < budget or step == 0:
        total += step_tokens(examples, config, step)
        step += 1
    return step


def mixed_batches(main: Sequence[Example], english: Sequence[Example] | None, config: TrainConfig):
    """Batch function: a micro-batch of the stage's data, plus English text (prefixed en_) for the layer loss,
    config.english_batch texts of it when set, else as many as the stage's micro-batch."""
    en_config = replace(config, batch_size=config.english_batch) if config.english_batch else config

    def batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        out = batch_at(main, step, micro, config)
        if english:
            out.update({f"en_{k}": v for k, v in batch_at(english, step, micro, en_config).items()})
        return out
    return batch


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


def set_trainable(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Trains exactly the parameters whose names match a pattern (fnmatch, e.g. "layers.*.lora_*"); freezes the rest."""
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise MedkoError(f"trainable patterns {unmatched} match no parameter; names look like {names[:3]}")
    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(fnmatch.fnmatchcase(name, p) for p in patterns))
        if param.requires_grad:
            chosen.append(name)
    return chosen


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Shrinking gains, biases or (language) embeddings toward zero changes what they mean, not their size.
    return param.ndim < 2 or "norm" in name or "embed" in name


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, matrices decayed, everything else not; the parameters of added
    (duplicated) layers at added_lr_scale times the rate."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise MedkoError("the model has no trainable parameters; call set_trainable(model, patterns) first")
    added = tuple(f"layers.{i}." for i, layer in enumerate(getattr(model, "layers", ())) if getattr(layer, "added", False))
    groups = []
    for scale, in_added in ((1.0, False), (config.added_lr_scale, True)):
        part = [(n, p) for n, p in params if n.startswith(added) == in_added]  # startswith(()) is False
        groups += [{"params": [p for n, p in part if not _no_decay(n, p)], "weight_decay": config.weight_decay,
                    "lr_scale": scale},
                   {"params": [p for n, p in part if _no_decay(n, p)], "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


# loss_fn(model, batch) -> (sum of the loss over target tokens, number of target tokens, extra metrics)
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int, dict[str, Any]]]
BatchFn = Callable[[int, int], dict[str, torch.Tensor]]
METRICS = "metrics.jsonl"


def _append_metrics(out_dir: Path, record: dict[str, Any]) -> None:
    with open(out_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(out_dir: Path, step: int) -> None:
    """Drops lines logged after the checkpoint being resumed, and a line cut off by a crash."""
    path = out_dir / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
    write_text_atomic("".join(kept), path)


def accumulate_gradients(model: nn.Module, loss_fn: LossFn, batches: Sequence[dict[str, torch.Tensor]],
                         autocast: contextlib.AbstractContextManager) -> tuple[float, int, dict[str, list[float]]]:
    """Backward over the micro-batches of one update; returns (loss sum, target tokens, extras per micro-batch).

    Every micro-batch's loss sum is divided by the target tokens of all of them (on every rank), counted before
    any forward pass, so an update weights each target token alike however the tokens fall into micro-batches
    and ranks. The loss sum, target count and extras returned are those of all ranks.
    """
    counts = [int(b["target_mask"].sum()) for b in batches]
    total = distributed.global_sum(sum(counts))
    if total == 0:
        raise MedkoError("an accumulated batch has no target tokens; check the target masks of the training data")
    loss, extras = 0.0, {}
    for batch, count in zip(batches, counts):
        with autocast:
            loss_sum, n_targets, metrics = loss_fn(model, batch)
        if int(n_targets) != count:
            raise MedkoError(f"loss_fn counted {int(n_targets)} targets where the batch's target_mask holds "
                             f"{count}; a loss must sum over the target_mask tokens")
        (loss_sum / total).backward()
        loss += float(loss_sum.detach())
        for key, value in metrics.items():
            extras.setdefault(key, []).append(float(value))
    return distributed.global_sum(loss), total, distributed.gather_metrics(extras)


def train(model: nn.Module, loss_fn: LossFn, examples_or_batch_fn: Sequence[Example] | BatchFn,
          config: TrainConfig, out_dir: Path, resume: bool = False, logger: MetricLogger | None = None,
          log_group: str = "train") -> dict[str, Any]:
    """Trains the model's trainable parameters for config.max_steps updates and returns a summary.

    Batches come from batch_at over the examples, or from examples_or_batch_fn(step, micro), which must
    then be a pure function of its arguments for resume to be exact. Each micro-batch's loss sum is
    divided by the target tokens of the whole accumulated batch. Ctrl-C (or SIGTERM, under engine.faults) saves a
    checkpoint at the last completed step and re-raises KeyboardInterrupt. Each metrics.jsonl line also goes to
    `logger` under `log_group` (live curves; metrics.jsonl stays the record). Returns steps, loss (of the last
    update), tokens, targets, seconds and tokens_per_s (of this call) and trainable (parameter count).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    compute_dtype(device, model_dtype(model))  # refuses fp16 weights
    if config.batch_size % distributed.world():
        raise MedkoError(f"batch_size {config.batch_size} does not split over {distributed.world()} processes; "
                         f"give a multiple of the process count")
    distributed.materialize(model)  # a base loaded under FSDP2 is sharded and read here, at its first use
    if not distributed.sharded(model):  # a sharded model's parameters are on their device, each rank its own part
        model.to(device)
        distributed.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
    distributed.wrap(model)
    model.gradient_checkpointing = config.gradient_checkpointing
    optimizer = make_optimizer(model, config)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainable, frozen = parameter_counts(model)
    log.info("training %s parameters in %d tensors; %s frozen", f"{trainable:,}", len(trainable_names), f"{frozen:,}")
    if callable(examples_or_batch_fn):
        next_batch = examples_or_batch_fn
    else:
        examples = examples_or_batch_fn  # read where batch_at picks them: an ExampleFile stays on disk
        if not examples:
            raise MedkoError("train got no examples; check the data files of this stage")
        next_batch = functools.partial(batch_at, examples, config=config)

    # A resume takes the newest checkpoint that verifies, falling back to the previous one with a warning.
    found = resumable_checkpoint(out_dir) if resume else latest_checkpoint(out_dir)
    # Fail now rather than at the first save, after the steps are spent: a checkpoint is about the size of the
    # last one, or the trainable weights plus AdamW's two moments; on a disk with room for one, it replaces the last.
    last = checkpoint_bytes(found) if found else 0
    needed = last if found else 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    distributed.on_main(prepare_directory, out_dir, needed + SLACK, last)
    if resume:
        state = load_checkpoint(found, model, optimizer, asdict(config), asdict(TrainConfig()))
        _set_rng_state(state["rng"])
        distributed.on_main(_trim_metrics, out_dir, state["step"])
        log.info("resumed from %s at step %d", found, state["step"])
    else:
        if found is not None:
            raise MedkoError(f"{out_dir} already holds checkpoint {found.name}; "
                             f"pass --resume or choose a new directory")
        torch.manual_seed(config.seed)
        distributed.on_main((out_dir / METRICS).write_text, "")
        state = {"step": 0, "tokens": 0, "targets": 0, "elapsed": 0.0, "loss": None, "metrics": {}}

    from tqdm import tqdm

    step = saved_step = state["step"]
    run_start, run_tokens, earlier_seconds = time.perf_counter(), 0, state["elapsed"]
    window = {"loss": 0.0, "targets": 0, "tokens": 0, "start": run_start, "extras": {}}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def save(at: int, alone: bool = False) -> None:
        nonlocal saved_step
        state.update(step=at, config=asdict(config), trainable=trainable_names,
                     elapsed=earlier_seconds + time.perf_counter() - run_start)
        path = save_checkpoint(out_dir, at, model, optimizer, state, alone)
        saved_step = at
        log.info("saved %s", path)

    was_training = model.training
    model.train()
    bar = tqdm(total=config.max_steps, initial=step, desc="train", unit="step", file=sys.stderr,
               disable=not distributed.is_main())
    updating = False
    try:
        while step < config.max_steps:
            batches = [{k: v.to(device) for k, v in next_batch(step, m).items()} for m in range(config.grad_accum)]
            width = max(b["input_ids"].shape[1] for b in batches)
            if width > config.max_len:
                raise MedkoError(f"a batch of step {step} is {width} tokens long but max_len is {config.max_len}; "
                                 f"build the examples with the same max_len")
            step_loss, total, extras = accumulate_gradients(model, loss_fn, batches, autocast)
            for key, values in extras.items():
                window["extras"].setdefault(key, []).extend(values)
            tokens = distributed.global_sum(sum(int((b["attention_mask"] != 0).sum()) for b in batches))

            updating = True  # an interrupt from here to the end of the update leaves no consistent state
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            if not distributed.sharded(model):  # FSDP2 sums them itself
                distributed.sum_gradients([p for p in model.parameters() if p.requires_grad])
            grad_norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], config.clip_norm or math.inf)))
            if not math.isfinite(grad_norm):
                raise MedkoError(f"the gradient norm at step {step} is {grad_norm}; lower lr or check the data, "
                                 f"then resume from the last checkpoint")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["tokens"] += tokens
            state["targets"] += total
            state["loss"] = step_loss / total
            state["rng"] = _rng_state()
            updating = False

            run_tokens += tokens
            window["loss"] += step_loss
            window["targets"] += total
            window["tokens"] += tokens
            now = time.perf_counter()
            speed = window["tokens"] / max(now - window["start"], 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{state['loss']:.4f}", tok_s=f"{speed:.0f}")
            if step % config.log_every == 0 or step == config.max_steps:
                record = {"step": step, "loss": window["loss"] / window["targets"], "lr": lr, "grad_norm": grad_norm,
                          "tokens": state["tokens"], "tokens_per_s": speed,
                          "elapsed": earlier_seconds + now - run_start}
                record.update({k: sum(v) / len(v) for k, v in window["extras"].items()})
                distributed.on_main(_append_metrics, out_dir, record)
                if logger is not None:
                    logger.log(log_group, record, step)
                state["metrics"] = record
                window = {"loss": 0.0, "targets": 0, "tokens": 0, "start": now, "extras": {}}
            if step % config.save_every == 0 or step == config.max_steps:
                save(step)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (engine.faults.Terminated)
        # Ranks are interrupted at different points, so rank 0 saves alone; a sharded model would need the others,
        # so under FSDP2 the last periodic checkpoint stands, and err.kept says so for the command's one line.
        if updating:
            log.info("interrupted inside the update of step %d, which is not saved", step)
        elif step > saved_step and not distributed.sharded(model):
            save(step, alone=True)
        elif step > saved_step:
            err.kept = (f"under FSDP2 the last periodic checkpoint (step {saved_step}) stands and steps "
                        f"{saved_step + 1}-{step} are lost")
        log.info("interrupted after step %d; resume to continue", step)
        raise
    finally:
        bar.close()
        model.train(was_training)

    seconds = time.perf_counter() - run_start
    return {"steps": step, "loss": state["loss"], "tokens": state["tokens"], "targets": state["targets"],
            "seconds": seconds, "tokens_per_s": run_tokens / max(seconds, 1e-9), "trainable": trainable}
