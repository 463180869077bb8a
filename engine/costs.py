"""What a run costs in GPU hours: each stage's work at the real volumes (tokens trained, tokens generated,
questions scored, held-out texts measured) over throughputs kept in one table with where each figure came from.

Every figure is in THROUGHPUTS with its device, shape, date and source; a figure never measured says so
("not measured (estimate from ...)") and is derived from a measured one by a named ratio. `python medko.py plan
--size 27b --hours` prints the estimate; docs/costs.md shows it for 4B and 27B on an H200 and an 80 GB GPU.

Imports engine.model and engine.plan.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.model import PRESETS
from engine.plan import GIB, WORK, Fit, Setup, base_params, fitting_settings


@dataclass(frozen=True)
class Throughput:
    value: float  # in `unit`
    unit: str
    device: str
    shape: str
    date: str
    source: str  # the command and where its output is recorded, or "not measured (estimate from ...)"


# GPUs costed, with the specifications the unmeasured figures are scaled by (vendor datasheets, dense bf16).
GPUS = {"h200": {"name": "one H200 (141 GB)", "memory_gib": 141, "tflops": 989.0, "tb_s": 4.8},
        "80gb": {"name": "one A100 80 GB", "memory_gib": 80, "tflops": 312.0, "tb_s": 2.0}}

# The one table, keyed (GPU, size, kind). Only H200 figures were measured; every other figure derives from them.
THROUGHPUTS = {
    ("h200", "4b", "train"): Throughput(
        3378, "tokens/s", "H200", "4B, bf16 base, LoRA r16, bf16 autocast, 4 x 256 tokens a step", "2026-12-04",
        "measured: bench/gpu_cost.sh (bench/train.py --shape 4b --steps 6 --warmup 2; transformers + peft: 4,173)"),
    ("h200", "4b", "train_nf4"): Throughput(
        3568, "tokens/s", "H200", "4B, NF4 base, LoRA r16, bf16 autocast", "2026-11-30",
        "measured: bench/train.py --shape 4b --quantize 4bit --steps 6 --warmup 2 (bench/gpu_checks.sh)"),
    ("h200", "4b", "score"): Throughput(
        160.6, "questions/s", "H200", "4B, bf16, logits, KorMedMCQA prompts, batch 16", "2026-11-30",
        "measured: bench/eval.py --shape 4b --questions 300 (bench/gpu_checks.sh)"),
    ("h200", "4b", "decode"): Throughput(
        0.0410, "s per decoding step", "H200", "4B, bf16, 64 rows, 128 new tokens (16 rows: 0.0430), seconds per new "
        "token with prompt-lookup drafting on, random weights", "2026-12-04",
        "measured: bench/gpu_cost.sh (bench/gpu_generate.py; transformers' generate: 0.0763 at 64 rows, 0.0436 "
        "at 16, identical outputs)"),
    ("h200", "27b", "train"): Throughput(
        1787, "tokens/s", "H200", "27B, bf16 base, LoRA r16, bf16 autocast, 4 x 256 tokens a step", "2026-12-04",
        "measured: bash bench/gpu_cost.sh 27b (bench/gpu_shape.py --shape 27b, medko alone, 6 steps after 2; its "
        "attention ran a variant not landed, which at 4B trained within noise of the landed code)"),
    ("h200", "27b", "score"): Throughput(
        92.0, "questions/s", "H200", "27B, bf16, logits, KorMedMCQA prompts, batch 16, 300 questions", "2026-12-04",
        "measured: bash bench/gpu_cost.sh 27b (bench/gpu_shape.py --shape 27b, medko alone; its attention ran a "
        "variant not landed, which at 4B scored 10-20% slower than the landed code)"),
    ("h200", "27b", "decode"): Throughput(
        0.1085, "s per decoding step", "H200", "27B, bf16, 64 rows, 128 new tokens (16 rows: 0.1033), seconds per new "
        "token with prompt-lookup drafting on, random weights", "2026-12-04",
        "measured: bash bench/gpu_cost.sh 27b (bench/gpu_shape.py --shape 27b, medko alone)"),
}


def _scaled(size: str, gpu: str, kind: str) -> tuple[float, str]:
    """(value, source) of a throughput for a size on a GPU. The H200 figure of that size where one was measured;
    NF4 training at a size measured in bf16 alone, its bf16 figure times the 4B NF4/bf16 ratio; anything else, the
    4B figure scaled by parameters. Another GPU scales training and scoring by its bf16 FLOP/s. A decoding step is
    bound by the host's kernel launches (41 ms at 4B against 3 ms of weights read at HBM bandwidth): with no
    measurement it scales with the layers, and on another GPU it stays, or is the weights' bytes over half the
    bandwidth where that is longer."""
    spec, c = GPUS[gpu], PRESETS[size]
    measured = THROUGHPUTS.get(("h200", size, kind))
    if measured is not None:
        value, source = measured.value, measured.source
    elif kind == "train_nf4" and ("h200", size, "train") in THROUGHPUTS:
        ratio = THROUGHPUTS[("h200", "4b", "train_nf4")].value / THROUGHPUTS[("h200", "4b", "train")].value
        value = THROUGHPUTS[("h200", size, "train")].value * ratio
        source = f"not measured (estimate from the H200 {size} bf16 figure times the 4B NF4/bf16 ratio)"
    elif kind == "decode":
        value = THROUGHPUTS[("h200", "4b", kind)].value / PRESETS["4b"].num_layers * c.num_layers
        source = "not measured (estimate from the H200 4B step per layer times the layers)"
    else:
        value = THROUGHPUTS[("h200", "4b", kind)].value * base_params(PRESETS["4b"]) / base_params(c)
        source = f"not measured (estimate from the H200 4B figure scaled by {size} parameters)"
    if gpu == "h200":
        return value, source
    if kind == "decode":
        weights = 2 * base_params(c) / (0.5 * spec["tb_s"] * 1e12)
        return max(value, weights), ("not measured (estimate: the H200 step, host-bound, or the weights read at half "
                                     "the HBM bandwidth where longer)")
    value *= spec["tflops"] / GPUS["h200"]["tflops"]
    if measured is not None:
        return value, f"not measured (estimate from the H200 {size} figure scaled by {gpu} bf16 FLOP/s)"
    return value, f"{source[:-1]}, then by {gpu} bf16 FLOP/s)"


# The real volumes (the counts; token lengths are estimates with MedGemma's tokenizer, not counted).
VOLUMES = {"dev": 1060, "train": 3400, "test": 3009, "lines": 27000, "line_tokens": 25, "ko_text": 19200,
           "medqa": 10000, "reasoning": 3400, "reasoning_tokens": 300, "prompt_tokens": 200}
STEPS = 300  # optimizer steps per phase (shared_logic.STAGE_DEFAULTS for 4b and 27b)
TRAIN_TOKENS = {"s1_1": 250, "s2": 400, "s3": 400, "s4": 230, "s5": 512}  # tokens per example (s4: text, pairs)
ENGLISH_TOKENS = 250  # an English text for the per-layer loss (MedQA vignettes)
ENGLISH_COST = 4 / 3  # its student graph (a training pass) and the teacher's forward (a third of one)
MEASURE_TEXTS = {"ko": 1920, "en": 1000}  # held-out tenths of Asan (19.2k) and MedQA (10k)
MEASURES = {"s1_1": 1, "s2": 2, "s3": 2, "s4": 2, "s5": 2}  # held-out measurements a stage makes (before, after)


def stage_work(stage: str) -> dict[str, float]:
    """One stage's work at the real volumes: tokens trained (English per-layer tokens counted at ENGLISH_COST, and
    apart as "english"), tokens generated, questions scored and held-out tokens measured."""
    v, work = VOLUMES, {"trained": 0.0, "generated": 0.0, "scored": 0.0, "measured": 0.0, "english": 0.0}
    if stage == "s1":
        work.update(generated=v["lines"] * v["line_tokens"], scored=2 * v["dev"])  # translated once, 2 candidates
        return work
    if stage == "test":
        work.update(scored=v["test"])
        return work
    if stage == "sft":  # the lora-sft baseline: the tokens s2-s5 train on their own data, reasoning, every measure
        work.update(trained=sum(stage_work(s)["trained"] - stage_work(s)["english"] for s in ("s2", "s3", "s4", "s5")),
                    generated=2 * v["dev"] * v["reasoning_tokens"], scored=2 * 2 * v["dev"])
        work["measured"] = 2 * (MEASURE_TEXTS["ko"] * 400 + 2 * MEASURE_TEXTS["en"] * ENGLISH_TOKENS)
        return work
    examples = (2 if stage == "s4" else 1) * STEPS * 8  # s4 trains two phases
    work["trained"] = examples * TRAIN_TOKENS[stage]
    if WORK[stage].english:
        work["english"] = examples * ENGLISH_TOKENS * ENGLISH_COST
        work["trained"] += work["english"]
    if stage == "s5":  # reasoning on the Korean dev exam, before and after
        work["generated"] = 2 * v["dev"] * v["reasoning_tokens"]
    work["scored"] = MEASURES[stage] * 2 * v["dev"]  # Korean and English dev where measured (an upper bound)
    work["measured"] = MEASURES[stage] * (MEASURE_TEXTS["ko"] * 400 + 2 * MEASURE_TEXTS["en"] * ENGLISH_TOKENS)
    return work


def stage_hours(size: str, gpu: str, stage: str, fit: Fit | None) -> dict[str, float]:
    """GPU hours of a stage's work: training at the train rate (NF4's where the plan quantizes; a third more under the
    plan's checkpointing), generation at its rows per decoding step (the plan's rows on this GPU), scoring at the
    score rate and measuring (forward only) at three times the train rate."""
    work = stage_work(stage)
    train = _scaled(size, gpu, "train_nf4" if fit is not None and fit.quantize else "train")[0]
    rows = (fit.estimate.eval_rows.get("generate") if fit else None) or WORK[stage].generate[0] or 1
    step = _scaled(size, gpu, "decode")[0]
    recompute = 4 / 3 if fit is not None and fit.checkpointing else 1.0  # checkpointing runs each forward twice
    hours = {"train": work["trained"] * recompute / train, "generate": work["generated"] / rows * step,
             "score": work["scored"] / _scaled(size, gpu, "score")[0], "measure": work["measured"] / (3 * train)}
    return {k: v / 3600 for k, v in hours.items()}


def hours_table(size: str, gpu: str, gpu_gib: float | None = None) -> str:
    """The printed estimate: per stage its work, its hours by part, the total, and the throughputs' sources."""
    gib = gpu_gib or GPUS[gpu]["memory_gib"]
    lines = [f"GPU hours for --size {size} on {GPUS[gpu]['name']}, at the real volumes (KorMedMCQA dev {VOLUMES['dev']}, "
             f"train {VOLUMES['train']}, test {VOLUMES['test']}; s1 translates {VOLUMES['lines']} lines; Asan "
             f"{VOLUMES['ko_text']} texts; MedQA {VOLUMES['medqa']}), {STEPS} steps x 8 examples a phase",
             f"{'stage':<18}{'trained':>10}{'generated':>11}{'scored':>8}{'train h':>9}{'gen h':>7}{'score h':>8}"
             f"{'meas h':>8}{'total h':>9}"]
    total, rows, nf4 = 0.0, {}, False
    for w in WORK.values():
        fit = fitting_settings(PRESETS[size], w, Setup("cuda"), int(gib * GIB))
        nf4 = nf4 or (fit is not None and fit.quantize)
        work, hours = stage_work(w.name), stage_hours(size, gpu, w.name, fit)
        total += sum(hours.values()) if w.name != "sft" else 0.0
        rows[w.name] = (f"{w.title:<18}{work['trained'] / 1e6:>9.1f}M{work['generated'] / 1e6:>10.2f}M"
                        f"{work['scored']:>8.0f}{hours['train']:>9.2f}{hours['generate']:>7.2f}{hours['score']:>8.2f}"
                        f"{hours['measure']:>8.2f}{sum(hours.values()):>9.2f}")
    baseline = rows.pop("sft")  # run.sh --recipe lora-sft is a run of its own: after the curriculum's total
    lines += [*rows.values(), f"{'run':<18}{total:>65.1f}", baseline]
    lines.append("throughputs:")
    kinds = [("train", "tokens/s"), ("train_nf4", "tokens/s")] if nf4 else [("train", "tokens/s")]
    for kind, unit in (*kinds, ("score", "questions/s"), ("decode", "s per decoding step")):
        value, source = _scaled(size, gpu, kind)
        lines.append(f"  {kind}: {value:,.4g} {unit} ({size}, {gpu}): {source}")
    lines.append("s1.1 runs when no candidate reaches the gate (none does: MedGemma-27B scores 87.7 on MedQA); the "
                 "guard's recovery rounds, when they run, add a training phase each")
    return "\n".join(lines)
