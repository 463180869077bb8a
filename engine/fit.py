"""What fits this GPU, by the memory plan (engine.plan): the rows an evaluation or a generation takes at once, and
which models can run the curriculum at all, checked before anything is downloaded.

A GPU's memory is torch.cuda's, or MEDKO_GPU_MEMORY_GIB when set (engine.plan.gpu_memory): that variable lets a
CPU run the checks as a given GPU would, which is how the tests rehearse a 24 GB box.

Imports engine.checkpoints, engine.distributed, engine.errors, engine.model and engine.plan.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from engine import distributed
from engine.checkpoints import read_config
from engine.errors import MedkoError, log
from engine.model import PRESETS, ModelConfig, model_device, resolve_device
from engine.plan import GIB, STAGE_WORK, WORK, Fit, Setup, base_bytes, estimate, fitting_settings, gathered_bytes, \
    gpu_memory, rows_within, usable_bytes


def rows_that_fit(model: torch.nn.Module, kind: str, wanted: int, tokens: int, new_tokens: int = 0) -> int:
    """On CUDA, the most rows (`wanted` halved until they fit) of an evaluation ("logits", "measures" or
    "generate") of prompts of `tokens` whose working memory by the plan fits what the GPU has beside the tensors
    allocated now; elsewhere `wanted`. Every scoring and generation sizes its batch here, so a large model on a
    GPU it barely fits evaluates in smaller batches rather than running out of memory. Under FSDP2 the base is
    read first (its shard is then allocated), the layers a rank gathers whole while computing are set aside too,
    and the ranks take the least rows of any, since each runs the same forward passes."""
    device = model_device(model)
    total = gpu_memory(device) if device.type == "cuda" else None
    if total is None:
        return wanted
    distributed.materialize(model)
    setup = Setup("cuda", max_len=max(1, tokens))
    budget = usable_bytes(total) - torch.cuda.memory_allocated(device)
    if distributed.sharded(model):
        budget -= gathered_bytes(model.config, setup)
    rows = rows_within(model.config, setup, kind, wanted, budget, new_tokens)
    if distributed.sharded(model):
        rows = distributed.global_min(rows)
    if rows < wanted:
        log.debug("memory plan: %s runs %d rows at once rather than %d on this GPU", kind, rows, wanted)
    return rows


def curriculum_fits(c: ModelConfig, s: Setup, gpu_bytes: int) -> dict[str, Fit | None]:
    """Each stage's settings that fit, the base as s has it (bf16 or NF4), or None where nothing does."""
    return {w.name: fitting_settings(c, w, s, gpu_bytes, allow_quantize=False) for w in STAGE_WORK}


def _least(c: ModelConfig, stage: str, s: Setup, gpu_bytes: int) -> float:
    """GiB the stage needs at the least: micro-batch 1, checkpointing, one row per evaluation."""
    return estimate(c, WORK[stage], replace(s, batch=1, checkpointing=True), gpu_bytes).peak / GIB


def candidate_fit(name: str, c: ModelConfig, s: Setup, gpu_bytes: int, may_quantize: bool, others: list[str]
                  ) -> tuple[bool | None, str]:
    """(NF4 base or not, what the plan says) for a model that would run the whole curriculum on this GPU, or
    (None, one sentence why it is skipped and how to include it). An NF4 base is chosen only when bf16 weights
    fit no stage's settings and the model was asked for (may_quantize: --size or --candidates named it)."""
    usable = usable_bytes(gpu_bytes) / GIB
    fits = curriculum_fits(c, s, gpu_bytes)
    failing = next((stage for stage, fit in fits.items() if fit is None), None)
    if failing is None:
        return s.quantize, f"{name} fits this {gpu_bytes / GIB:.0f} GiB GPU{' with an NF4 base' if s.quantize else ''}"
    need = (f"by the memory plan its {'NF4' if s.quantize else 'bf16'} weights take {base_bytes(c, s) / GIB:.1f} GiB "
            f"and {failing} needs {_least(c, failing, s, gpu_bytes):.1f} GiB at the least, more than this "
            f"{gpu_bytes / GIB:.0f} GiB GPU's {usable:.1f} usable GiB")
    nf4 = s if s.quantize else replace(s, quantize=True)
    nf4_failing = next((st for st, fit in curriculum_fits(c, nf4, gpu_bytes).items() if fit is None), None)
    if nf4_failing is not None:
        nf4_need = "" if s.quantize else (f", and with an NF4 base {nf4_failing} still needs "
                                          f"{_least(c, nf4_failing, nf4, gpu_bytes):.1f} GiB")
        return None, f"{name} skipped before any download: {need}{nf4_need}; use a larger GPU, or more with --nproc"
    if may_quantize:
        return True, f"{name} loads with an NF4 base (--quantize 4bit chosen by the plan): {need}"
    asked = ",".join(others)
    return None, (f"{name} skipped before any download: {need}; to score it with an NF4 base, pass --candidates "
                  f"{asked} (the plan then chooses NF4 for it) or --quantize 4bit")


HUB_CANDIDATES = ("4b", "27b")  # the gate's default for a hub size: the small and the large MedGemma


def gate_candidates(size: str | None, candidates: str | None = None, model: str | None = None) -> list[str]:
    """Sizes (or the --model directory) the gate scores, smallest first: --candidates, else both MedGemmas for a
    hub --size, else the 270M alone."""
    if model:
        return [model]
    if candidates:
        return candidates.split(",")
    return list(HUB_CANDIDATES) if size in HUB_CANDIDATES else [size or "270m"]


def candidates_that_fit(names: list[str], asked: set[str], quantize: bool, device: str | None,
                        model_dir: str | Path | None = None) -> dict[str, bool]:
    """The gate's candidates that can run the curriculum on this GPU, each with whether its base loads in NF4,
    decided before anything is downloaded (sizes by their preset shape; --model by its local config). Each skip is
    logged in one sentence; none left is refused in one. No GPU known (a CPU run without MEDKO_GPU_MEMORY_GIB):
    every candidate, as given."""
    total = gpu_memory(resolve_device(device))
    if total is None:
        return {name: quantize for name in names}
    chosen = {}
    for name in names:
        config = read_config(Path(model_dir)) if model_dir else PRESETS[name]
        nf4, line = candidate_fit(name, config, Setup("cuda", quantize=quantize), total, name in asked, names)
        (log.info if nf4 is not None else log.warning)("gate: %s", line)
        if nf4 is not None:
            chosen[name] = nf4
    if not chosen:
        raise MedkoError(f"no gate candidate ({', '.join(names)}) fits this {total / GIB:.0f} GiB GPU by the memory "
                         f"plan (`python medko.py plan` shows why); use a larger GPU or --nproc")
    return chosen


def run_plan(c: ModelConfig, quantize: bool, gpu_bytes: int) -> dict:
    """What the curriculum costs on this GPU by the plan, for s1's meta.json and its log: per stage the settings
    and estimated peak GiB."""
    fits = curriculum_fits(c, Setup("cuda", quantize=quantize), gpu_bytes)
    stages = {stage: None if fit is None else {"batch": fit.batch, "grad_accum": fit.grad_accum,
                                               "checkpointing": fit.checkpointing, "eval_rows": fit.estimate.eval_rows,
                                               "peak_gib": round(fit.estimate.peak / GIB, 1)}
              for stage, fit in fits.items()}
    peak = max(v["peak_gib"] for v in stages.values() if v)
    return {"gpu_gib": round(gpu_bytes / GIB, 1), "quantize": quantize, "stages": stages, "peak_gib": peak}


def base_plan(name: str, nf4: bool, device: str | None, model_dir: str | Path | None = None) -> dict | None:
    """What training the gate's choice costs on this GPU by the plan (run_plan), with the line the gate logs and
    the report shows; None without a GPU to plan for."""
    total = gpu_memory(resolve_device(device))
    if total is None:
        return None
    plan = run_plan(read_config(Path(model_dir)) if model_dir else PRESETS[name], nf4, total)
    s5 = plan["stages"]["s5"]
    plan["line"] = (f"s1.1 to s5 train {name}{' with an NF4 base' if nf4 else ''}: by the memory plan on this "
                    f"{plan['gpu_gib']:.0f} GiB GPU every stage fits, at most {plan['peak_gib']} GiB (s5: micro-batch "
                    f"{s5['batch']} x {s5['grad_accum']}, reasoning generated {s5['eval_rows'].get('generate')} rows at "
                    f"once); `python medko.py plan --size {name} --gpu-memory {plan['gpu_gib']:.0f} --hours` shows "
                    f"each stage and its GPU hours")
    return plan
