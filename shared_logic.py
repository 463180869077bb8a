"""The curriculum the stages share: the stage table, typed stage options, a run's directories, data and model,
measurements, training phases, the English guard, the stage runner, the test split and the run report.

Read it top to bottom. It imports the engine (engine/) and re-exports the engine names the stage scripts use,
so a stage imports only this module; nothing in engine/ imports it.
"""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from engine import distributed, faults, sources
from engine.adapters import additions_state_dict, apply_surgery, load_additions_file
from engine.checkpoints import SIZES, load_base
from engine.compare import score_exams
from engine.data import ENCODINGS, KORMEDMCQA_SPLITS, MCQ, Pair, lazy_rows, parse_field_map
from engine.errors import MedkoError, log, setup_logging
from engine.evaluate import translation_prompt
from engine.examples import Example, ExampleFile, text_examples
from engine.files import atomic_write, hold_lock, read_json, write_json_atomic
from engine.guard import guard_record, recover
from engine.loggers import LOG_TO, MetricLogger, log_stage, open_logger
from engine.measures import losses_and_drift, measure_parts
from engine.model import Gemma3
from engine.options import COUNT, FRACTION, POSITIVE, ZERO_OR_MORE, add_options, number, option
from engine.phase_losses import english_only_loss
from engine.plan import stage_settings
from engine.report import write_run_report as render_run_report
from engine.rows import Mapped
from engine.smoke import SMOKE_TEST_QUESTIONS, smoke_data, smoke_options
from engine.stats import bootstrap_mean, describe, guard_check, judge, mean, overall_verdict
from engine.tokenizer import Tokenizer
from engine.train_checkpoints import latest_checkpoint
from engine.trainer import TrainConfig, set_trainable, step_tokens, train

# Engine names the stage scripts use, re-exported (`x as x`), so a stage imports only this module.
from engine.adapters import (add_language_embeddings as add_language_embeddings, add_lora as add_lora,  # noqa: I001
                             adapter_specs as adapter_specs, duplicate_edge_layers as duplicate_edge_layers,
                             snapshot_adapter as snapshot_adapter, teacher_mode as teacher_mode)
from engine.data import mcq_record as mcq_record, split_overlap as split_overlap
from engine.evaluate import (choose_formulation as choose_formulation, evaluate as evaluate,
                             letter_token_ids as letter_token_ids, translate_mcqs as translate_mcqs)
from engine.examples import lm_examples as lm_examples
from engine.files import file_sha256 as file_sha256, write_jsonl_atomic as write_jsonl_atomic
from engine.fit import (base_plan as base_plan, candidates_that_fit as candidates_that_fit,
                        gate_candidates as gate_candidates)
from engine.measures import translation_scores as translation_scores
from engine.phase_losses import stage_loss as stage_loss
from engine.reasoning import (answer_line_tokens as answer_line_tokens, exam_examples as exam_examples,
                              reasoning_eval as reasoning_eval, reasoning_examples as reasoning_examples)
from engine.sources import (held_out_sets as held_out_sets, reference_exam as reference_exam,
                            unseen_answers as unseen_answers)
from engine.trainer import mixed_batches as mixed_batches, steps_for_tokens as steps_for_tokens

# ───────────────────────────── the stage table ─────────────────────────────

@dataclass(frozen=True)
class Stage:
    name: str  # short name used in options and messages: s0, s1, s1_1, ...
    directory: str  # its sub-directory of a run, and its script's name in stages/
    title: str  # how the report names it
    previous: str | None  # the stage whose output it reads (s2: s1_1 when the gate sent the run there)


# The one list of stages, in run order; run.sh, the report and the tests follow it.
STAGE_TABLE = (
    Stage("s0", "s0_data", "s0 data", None),
    Stage("s1", "s1_gate", "s1 gate", "s0"),
    Stage("s1_1", "s1_1_english", "s1.1 english", "s1"),
    Stage("s2", "s2_embed", "s2 embed", "s1"),
    Stage("s3", "s3_korean", "s3 korean", "s2"),
    Stage("s4", "s4_translate", "s4 translate", "s3"),
    Stage("s5", "s5_reasoning", "s5 reasoning", "s4"),
    Stage("sft", "lora_sft", "lora-sft baseline", "s1"),  # run.sh --recipe lora-sft: what users run without medko
)
STAGES = {s.name: s for s in STAGE_TABLE}
TRAINING_STAGES = ("s1_1", "s2", "s3", "s4", "s5", "sft")  # those that train and report before → after
# (optimizer steps per phase, examples per micro-batch, peak lr) by size and stage: the 270M's sized to run.sh's
# 20-minute CPU budget (README, "The 270M's defaults", says why each); the MedGemmas' LoRA 2e-4, s2 1e-2.
# The baseline's steps come from the curriculum's token budget (curriculum_tokens), so its entry names none (0);
# its rate is the usual LoRA SFT one.
SFT = (0, 4, 2e-4)
_MEDGEMMA = {"s1_1": (300, 8, 2e-4), "s2": (300, 8, 1e-2), **dict.fromkeys(("s3", "s4", "s5"), (300, 8, 2e-4))}
STAGE_DEFAULTS = {"270m": {"s1_1": (10, 2, 2e-4), "s2": (10, 2, 1e-2), "s3": (8, 4, 1e-4), "s4": (6, 4, 5e-5),
                           "s5": (24, 4, 4e-4), "sft": SFT}, "4b": {**_MEDGEMMA, "sft": SFT},
                  "27b": {**_MEDGEMMA, "sft": SFT}}
# s4's duplicated layers start with their post-norm gains at 1 + w = 0; AdamW moves a gain by about the rate per step,
# so at the LoRA's rate they stayed at identity (trained alone on the 270M: chrF +0.03). They train at 30 times it.
# The translation rows' English outputs pull English most in s4, so its per-layer loss weighs 30 rather than 10.
ADDED_LR_SCALE = 30.0
LAYER_WEIGHTS = {"s4": 30.0}  # the per-layer loss's weight by stage when --layer-weight is not given; else 10
# English texts per micro-batch for the per-layer loss where they are fewer than the stage's examples (without
# --batch-size): s5's reasoning rows are ~4 times an English text's length; on the 270M, 2 English texts a step held
# English drift where 4 did (0.045, n 53 held-out texts) at a fifth less time a step.
ENGLISH_BATCH = {"270m": {"s5": 2}}
DATA_DIR = Path(__file__).resolve().parent / "data"  # the bundled sample data
LORA_PATTERNS = ["*.lora_A.lora1*", "*.lora_B.lora1*"]
LANGUAGE_PATTERNS = ["language_embedding.*"]


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / STAGES[stage].directory


def stage_meta(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """The stage's meta.json when it finished, else None."""
    path = stage_dir(run_dir, stage) / "meta.json"
    return read_json(path) if path.is_file() else None


def previous_stage(run_dir: Path, stage: str) -> str | None:
    """The stage whose output this one reads; s2 follows s1.1 only when the gate sent the run there."""
    prev = STAGES[stage].previous
    if stage == "s2":
        gate = stage_meta(run_dir, "s1")
        prev = "s1_1" if gate and gate["needs_english"] else "s1"
    return prev


def require_previous(run_dir: Path, stage: str) -> None:
    """Refuses in one sentence to run a stage out of order."""
    prev = previous_stage(run_dir, stage)
    if prev is None:
        return
    meta = stage_meta(run_dir, prev)
    if meta is None or meta.get("status") != "done":
        script = f"stages/{STAGES[prev].directory}.py"
        state = "has not finished" if meta is None else f"ended with status {meta.get('status')!r}"
        raise MedkoError(f"{stage} needs {prev}, which {state} in {run_dir}: run `python {script} --run-dir "
                         f"{run_dir}` first")
    if stage == "s1_1" and not meta["needs_english"]:
        raise MedkoError(f"s1 found a model at the gate ({meta['chosen']}), so s1.1 is not needed; go on with s2")


def final_stage(run_dir: Path) -> str:
    """The last stage of the run that finished (s5 when the whole curriculum ran)."""
    for stage in reversed([s.name for s in STAGE_TABLE[1:]]):
        meta = stage_meta(run_dir, stage)
        if meta is not None and meta.get("status") == "done":
            return stage
    raise MedkoError(f"{run_dir} has no finished stage to score; run the curriculum first")


def run_and_stage(path: str | Path) -> tuple[Path, str]:
    """RUN_DIR/STAGE_DIR -> (RUN_DIR, stage); a bare RUN_DIR means its last finished stage."""
    path = Path(path)
    by_dir = {s.directory: s.name for s in STAGE_TABLE}
    if path.name in by_dir:
        if stage_meta(path.parent, by_dir[path.name]) is None:
            raise MedkoError(f"{path} has no meta.json: the stage has not finished")
        return path.parent, by_dir[path.name]
    return path, final_stage(path)


# ───────────────────────────── stage options ─────────────────────────────

@dataclass
class StageOptions:
    """Every option of the stage scripts, built from the command line in one place (parse_stage_options)."""

    run_dir: Path = option(Path("runs/default"), "the run's directory", Path)
    size: str | None = option(None, "base model (default 270m; later stages use the one s1 chose)", choices=SIZES)
    model: str | None = option(None, "local HF-layout base checkpoint (overrides --size)")
    device: str | None = option(None, "cpu or cuda (default: cuda when available)")
    quantize: str | None = option(None, "NF4 frozen base weights (CUDA only)", choices=["4bit"])
    resume: bool = option(False, "continue this stage from its last checkpoint")
    max_steps: int | None = option(None, "optimizer steps per training phase (default by stage and size)", COUNT)
    budget: float = option(1.0, "a longer (or shorter) run: each training phase's default steps times this, the "
                           "baseline's matched tokens with them (--max-steps overrides)", POSITIVE)
    batch_size: int | None = option(None, "examples per micro-batch and process (default by stage and size; on CUDA "
                                     "the memory plan's unless this, --grad-accum or --gradient-checkpointing is "
                                     "given)", COUNT)
    grad_accum: int | None = option(None, "micro-batches per optimizer step (default 1, or the memory plan's)", COUNT)
    lr: float | None = option(None, "peak learning rate (default by stage and size)", POSITIVE)
    max_len: int = option(512, "tokens per training example", COUNT)
    seed: int = option(0, "seed of data order, surgery and dropout", int)
    gate: float = option(0.97, "English validation accuracy the gate asks for", FRACTION)
    tolerance: float = option(0.02, "English guard: allowed drop below its reference (at least one dev question)",
                               FRACTION)
    drift_bound: float = option(0.05, "English guard: most mean English drift, KL(teacher || model) in nats per "
                                 "token on held-out English text", POSITIVE)
    guard_rounds: int = option(2, "English guard: recovery rounds before stopping", ZERO_OR_MORE)
    layer_loss: str = option("mse", "per-layer English loss", choices=["mse", "kl"])
    layer_weight: float | None = option(None, "weight of the per-layer English loss (default 10; s4 30)",
                                        number(float, 0))
    eval_limit: int | None = option(None, "score at most this many questions per exam", COUNT)
    debug: bool = option(False, "show an unexpected error's traceback here, not only in its crash log")
    smoke: bool = option(False, "quick install check: 1 step a phase, 8 questions, 4 held-out texts; meaningless")
    log_to: str | None = option(None, "live curves also in TensorBoard or W&B (metrics.jsonl stays)", choices=LOG_TO)
    gradient_checkpointing: bool = option(False, "recompute each layer in backward to save memory")
    lora_rank: int = option(16, "rank of lora1 (when this stage adds it)", COUNT)
    lora_alpha: float = option(32.0, "alpha of lora1; scaling is alpha/rank", POSITIVE)
    data: str | None = option(None, "'hub', or a directory laid out like data/ (default by --size)", stages=["s0"])
    subsets: str = option("doctor,nurse,pharm,dentist", "KorMedMCQA subsets", stages=["s0", "s1"])
    en_mcq: str | None = option(None, "English MCQ file (MedQA schema) instead of the default", stages=["s0"])
    ko_text: str | None = option(None, "Korean medical text file (JSONL with a text field)", stages=["s0"])
    en_text: str | None = option(None, "English medical text file (JSONL with a text field)", stages=["s0"])
    pairs: str | None = option(None, "Korean-English pair file (JSONL with ko and en fields)", stages=["s0"])
    reasoning: str | None = option(None, "Korean exam reasoning file", stages=["s0"])
    skip_bad: bool = option(False, "count and skip bad rows and clashing repeats instead of stopping", stages=["s0"])
    encoding: str = option("utf-8", "text files' encoding; auto tries UTF-8, then CP949", choices=ENCODINGS, stages=["s0"])
    max_bad: float = option(0.05, "--skip-bad still stops when a source's bad rows pass this share", FRACTION,
                             stages=["s0"])
    map: str | None = option(None, "field mappings ROLE.FIELD=COLUMN, comma-separated, e.g. "
                              "reasoning.reasoning=thinking; roles: exam, medqa, ko_text, en_text, pairs, reasoning",
                              stages=["s0"])
    candidates: str | None = option(None, "sizes to score, smallest first, e.g. 4b,27b (default --size)",
                                     stages=["s1"])
    english_exam: str = option("auto", "'model' (translate with the model), a directory of reference translations "
                                "laid out like data/kormedmcqa_en, or 'auto': the data directory's own "
                                "kormedmcqa_en/ when it has one, else 'model'", stages=["s1"])
    translate_tokens: int | None = option(None, "most new tokens per translated line, s1's exams and s4's held-out "
                                           "pairs (default: twice the line's source tokens plus 16)", COUNT,
                                           stages=["s1", "s4"])
    english_rounds: int | None = option(None, "gate checks within the step budget (default 2 on 4b and 27b, 1 on "
                                         "the 270M and --model)", COUNT, stages=["s1_1"])
    korean_delta: bool = option(False, "also a zero-initialised delta per Korean token", stages=["s2"])
    reasoning_tokens: int | None = option(None, "most new tokens when scoring reasoning (default: the longest trained "
                                           "reasoning with its answer line)", COUNT, stages=["s5", "sft"])


def parse_stage_options(stage: str, argv: Sequence[str] | None, description: str | None) -> StageOptions:
    """The stage's options from the command line; options of other stages are refused by argparse."""
    parser = argparse.ArgumentParser(description=description)
    add_options(parser, StageOptions, stage=stage)
    values = vars(parser.parse_args(argv))
    return smoke_options(StageOptions(**values))


# ───────────────────────────── a run: data and model ─────────────────────────────

@dataclass
class RunData:
    """The normalised data s0 wrote into the run. What grows with the data is read from s0's files as it is used
    (engine.rows), so a stage's memory stays flat however large the data; the small held-out sets are lists."""

    exam: dict[str, Sequence[MCQ]]  # Korean exam by split: train, dev, test, fewshot
    en_mcq: Sequence[MCQ]  # English exam-style questions (MedQA style)
    ko_text: Sequence[str]  # Korean medical text for training
    en_text: Sequence[str]  # English medical text for training
    ko_heldout: list[str]  # Korean text never trained on, for before/after losses
    en_heldout: list[str]  # English text never trained on, for losses and drift
    pairs: Sequence[Pair]  # Korean-English pairs
    reasoning: Sequence[MCQ]  # Korean exam rows with worked reasoning
    pairs_heldout: list[Pair] = field(default_factory=list)  # Korean-English pairs never trained on (s4's chrF)


def load_run_data(run_dir: Path) -> RunData:
    d = stage_dir(run_dir, "s0")
    exam = {s: lazy_rows(d / f"exam_{s}.jsonl", "mcq", "ko") for s in KORMEDMCQA_SPLITS}
    texts = lambda name: list(lazy_rows(d / f"{name}.jsonl", "text"))  # noqa: E731
    pairs = lambda name: lazy_rows(d / name, "pair") if (d / name).is_file() else []  # noqa: E731
    return RunData(exam, lazy_rows(d / "en_mcq.jsonl", "mcq", "en"), lazy_rows(d / "ko_text.jsonl", "text"),
                   lazy_rows(d / "en_text.jsonl", "text"), texts("ko_heldout"), texts("en_heldout"),
                   pairs("pairs.jsonl"), lazy_rows(d / "reasoning.jsonl", "reasoning", "ko"),
                   list(pairs("pairs_heldout.jsonl")))


def run_formulation(run_dir: Path) -> str:
    """The exam formulation s1 decided on for the run by OLMES's rule ("logits" or "cloze"); runs older than the
    choice scored letters."""
    return (stage_meta(run_dir, "s1") or {}).get("formulation", "logits")


def english_exam(run_dir: Path, split: str) -> Sequence[MCQ]:
    """The English translation of a Korean exam split that s1 made."""
    return lazy_rows(stage_dir(run_dir, "s1") / f"en_exam_{split}.jsonl", "mcq", "en")


def run_base(run_dir: Path, size: str | None, model: str | None) -> dict[str, Any]:
    """The base model the run is built on (chosen by s1); an explicit different --size/--model is refused."""
    gate = stage_meta(run_dir, "s1")
    if gate is None:
        raise MedkoError(f"{run_dir} has no finished s1 gate to name its base model; run stages/s1_gate.py first")
    base = gate["base"]
    if model is not None and str(model) != str(base["model"]):
        raise MedkoError(f"{run_dir} is built on {base}; drop --model or use a new --run-dir")
    if size is not None and base["model"] is None and size != base["size"]:
        # run.sh passes its --size to every stage; the gate's choice wins, and the log says so.
        log.info("the gate chose %s for %s; using it rather than --size %s", base["size"], run_dir, size)
    return base


def load_run_model_after(run_dir: Path, stage: str, device: str | None = None, quantize: str | None = None,
                         size: str | None = None, model: str | None = None) -> tuple[Gemma3, Tokenizer, dict]:
    """The model as `stage` left it: the run's base with the stage's surgery replayed and its additions loaded."""
    base = run_base(run_dir, size, model)
    net, tokenizer, _ = load_base(base["size"], base["model"], device, quantize=quantize or base.get("quantize"))
    meta = stage_meta(run_dir, stage)
    if meta and meta.get("surgery"):
        apply_surgery(net, meta["surgery"], tokenizer)
        load_additions_file(net, stage_dir(run_dir, stage) / "adapter.safetensors", stage)
    return net.eval(), tokenizer, base


def limited(rows: Sequence[MCQ], limit: int | None) -> Sequence[MCQ]:
    return rows[:limit] if limit else rows


# ───────────────────────────── measurements ─────────────────────────────

MEASURES = ("ko_accuracy", "en_accuracy", "ko_loss", "en_loss", "drift", "ko_correct", "en_correct", "ko_preds",
            "en_preds", "ko_losses", "en_losses", "drifts")  # what measure() returns with every part
# measure()'s parts: the Korean and English dev exams, the Korean held-out texts (loss), the English held-out texts
# (loss and drift, or loss alone). A stage measures what its purpose, the English guard and the next stage's "before"
# read. s1.1 skips the drift: its teacher would be the bare base and no verdict reads it (s2's teacher is the model
# as it enters s2, so s2's entering drift is 0 by definition). s2 skips the English exam: it is not s2's purpose, and
# the guard after s3 holds English dev accuracy to the accuracy entering s2. s4 and s5 judge translation and the
# answer line, not Korean text loss, so they skip the Korean texts. Korean dev accuracy is no stage's purpose: it is
# measured where the curriculum starts (s1.1's "after", or s2's entry) and where it ends (s5), and the report
# compares the two on the same questions; the stages between skip it.
MEASURE_PARTS = ("ko_exam", "en_exam", "ko_text", "en_text")
PART_KEYS = {"ko_exam": "ko_correct", "en_exam": "en_correct", "ko_text": "ko_losses", "en_text": "drifts",
             "en_loss": "en_losses"}
STAGE_MEASURES = {"s1_1": ("ko_exam", "en_exam", "ko_text", "en_loss"), "s2": ("ko_text", "en_text"),
                  "s3": ("en_exam", "ko_text", "en_text"), "s4": ("en_exam", "en_text"),
                  "s5": ("ko_exam", "en_exam", "en_text"), "sft": MEASURE_PARTS}


def measure(model: Gemma3, tokenizer: Tokenizer, run_dir: Path, data: RunData, opts: StageOptions,
            parts: Sequence[str] = MEASURE_PARTS) -> dict[str, Any]:
    """engine.measures.measure_parts on the run's dev exams (in its formulation, cut to --eval-limit) and held-out
    texts: the means for the tables and the per-item values behind them."""
    exams = {lang: limited(data.exam["dev"] if lang == "ko" else english_exam(run_dir, "dev"), opts.eval_limit)
             for lang in ("ko", "en") if f"{lang}_exam" in parts}
    return measure_parts(model, tokenizer, parts, exams, run_formulation(run_dir), data.ko_heldout, data.en_heldout,
                         opts.max_len)


# What each training stage exists for, and the held-out measures that decide it: (measure, kind, want). Drift is
# judged against --drift-bound, strict answer-line compliance against STRICT_COMPLIANCE (engine.stats.judge).
STRICT_COMPLIANCE = 0.9
STAGE_PURPOSES = {
    "s1_1": ("English exam accuracy up and English held-out loss down",
             [("en_correct", "accuracy", "up"), ("en_losses", "change", "down")]),
    "s2": ("Korean held-out loss down (language embeddings only)", [("ko_losses", "change", "down")]),
    "s3": ("Korean held-out loss down while English stays with the teacher",
           [("ko_losses", "change", "down"), ("drifts", "bound", "below"), ("en_losses", "change", "hold")]),
    "s4": ("Korean → English translation of held-out pairs improves while English stays with the teacher",
           [("chrf_pairs", "change", "up"), ("drifts", "bound", "below"), ("en_losses", "change", "hold")]),
    "s5": (f"the trained answer line on the Korean dev exam (strict compliance ≥ {STRICT_COMPLIANCE}) while "
           "English stays with the teacher",
           [("reasoning_strict", "bound", "above"), ("drifts", "bound", "below"), ("en_losses", "change", "hold")]),
    "sft": ("the baseline: Korean held-out loss down and the trained answer line, by LoRA cross-entropy alone",
            [("ko_losses", "change", "down"), ("reasoning_strict", "bound", "above"), ("en_losses", "change", "hold")]),
}


def stage_verdicts(stage: str, before: dict[str, Any], after: dict[str, Any], drift_bound: float
                   ) -> dict[str, Any]:
    """The stage's purpose, each of its measures judged above noise, and the verdict line."""
    purpose, specs = STAGE_PURPOSES[stage]
    judged = {}
    for key, kind, want in specs:
        if after.get(key):  # e.g. no held-out pairs to translate: nothing to judge
            bound = drift_bound if key == "drifts" else STRICT_COMPLIANCE
            judged[key] = judge(kind, before.get(key), after[key], want, bound)
    verdict = overall_verdict([j["verdict"] for j in judged.values()])
    lines = [describe(k, j) for k, j in judged.items()]
    return {"purpose": purpose, "verdict": verdict, "verdict_line": f"purpose {verdict}: " + "; ".join(lines),
            "lines": lines, "measures": judged}


# ───────────────────────────── training phases ─────────────────────────────

def translation_examples(run_dir: Path, data: RunData, tokenizer: Tokenizer, max_len: int) -> ExampleFile:
    """s4's translation rows: the train exam's translations from s1 (never dev or test) and any local pair file."""
    exam_pairs = [Pair(k, e) for ko, en in zip(data.exam["train"], english_exam(run_dir, "train"))
                  for k, e in zip((ko.question, *ko.options.values()), (en.question, *en.options.values()))]
    pairs = exam_pairs + data.pairs
    return lm_examples(tokenizer, Mapped(pairs, lambda p: translation_prompt(p.src, "en")),
                       Mapped(pairs, lambda p: f" {p.tgt}"), max_len)


def curriculum_tokens(opts: StageOptions, data: RunData, tokenizer: Tokenizer) -> dict[str, int]:
    """The tokens s2-s5 train on their own data (Korean text, translation pairs, reasoning) at these options, as
    their configs choose the batches: the baseline's budget. The per-layer loss's English texts and the guard's
    recovery rounds are not counted: they hold English, they teach nothing Korean."""
    streams = {"s2": [text_examples(tokenizer, data.ko_text, opts.max_len)]}
    streams["s3"] = streams["s2"]
    streams["s4"] = streams["s2"] + [translation_examples(opts.run_dir, data, tokenizer, opts.max_len)]
    streams["s5"] = [reasoning_examples(tokenizer, data.reasoning, opts.max_len)[0]]
    out = {}
    for stage, examples in streams.items():
        config = StageRun(stage, opts).train_config()
        out[stage] = sum(step_tokens(e, config, step) for e in examples for step in range(config.max_steps))
    return out


def added_layer_patterns(model: Gemma3) -> list[str]:
    return [f"layers.{i}.*" for i, layer in enumerate(model.layers) if layer.added]


# ───────────────────────────── a stage of a run ─────────────────────────────

# StageRun is built in layers, one concern each, every layer using those above it: RunInputs (options, data,
# base, the starting model), RunMeasures (dev exams and held-out texts, verdicts), RunPhases (training phases),
# RunGuard (the English guard) and StageRun (the stage's lock, directory and save). A stage sees one object.

class RunInputs:
    """What a stage starts from: its options and directories, the run's data, the base s1 chose, the previous
    stage's model."""

    def __init__(self, stage: str, opts: StageOptions):
        self.stage = stage
        self.opts = opts
        self.run_dir = Path(opts.run_dir)
        self.out = stage_dir(self.run_dir, stage)
        self._data: RunData | None = None
        self._base: dict[str, Any] | None = None


    @property
    def data(self) -> RunData:
        """The run's normalised data (s0's output)."""
        if self._data is None:
            self._data = smoke_data(load_run_data(self.run_dir), self.opts.smoke)
        return self._data

    @property
    def base(self) -> dict[str, Any]:
        """{"size", "model"}: the base model s1 chose for the run."""
        if self._base is None:
            self._base = run_base(self.run_dir, self.opts.size, self.opts.model)
        return self._base

    def english_exam(self, split: str) -> Sequence[MCQ]:
        return english_exam(self.run_dir, split)

    def dev(self, lang: str = "ko") -> Sequence[MCQ]:
        """The dev exam (Korean, or s1's English version), limited by --eval-limit."""
        rows = self.data.exam["dev"] if lang == "ko" else self.english_exam("dev")
        return limited(rows, self.opts.eval_limit)

    def load_previous(self) -> tuple[Gemma3, Tokenizer]:
        """The model this stage starts from: the base with the previous stage's surgery and additions."""
        o = self.opts
        model, tokenizer, _ = load_run_model_after(self.run_dir, previous_stage(self.run_dir, self.stage),
                                                   o.device, o.quantize, o.size, o.model)
        self._base = self.base
        return model, tokenizer

    def text(self, tokenizer: Tokenizer, texts: Sequence[str]) -> ExampleFile:
        return text_examples(tokenizer, texts, self.opts.max_len)


class RunMeasures(RunInputs):
    """The stage's measurements: dev exams and held-out texts as it enters and leaves; its verdicts."""

    def measure(self, model: Gemma3, tokenizer: Tokenizer, parts: Sequence[str] | None = None) -> dict[str, Any]:
        """measure() of the parts this stage reads (STAGE_MEASURES, else all)."""
        parts = STAGE_MEASURES.get(self.stage, MEASURE_PARTS) if parts is None else parts
        return measure(model, tokenizer, self.run_dir, self.data, self.opts, parts)

    def measure_entry(self, model: Gemma3, tokenizer: Tokenizer) -> dict[str, Any]:
        """The model as it enters: the previous stage's "after", since every surgery starts at zero (the tests
        assert unchanged logits); measured afresh, every part, when it lacks held-out text this stage compares. The
        dev exams' answers come along where the previous stage scored them, for the report: no verdict compares
        them within a stage (the guard holds English to a fixed floor; Korean dev is compared across the run)."""
        prev = stage_meta(self.run_dir, previous_stage(self.run_dir, self.stage))
        parts = [p for p in STAGE_MEASURES.get(self.stage, MEASURE_PARTS) if not p.endswith("_exam")]
        if self.stage == "s2":  # the teacher is fixed here: it is the entering model, so its drift is 0
            parts = ["en_loss" if p == "en_text" else p for p in parts]
        if prev is None or not {PART_KEYS[p] for p in parts} <= prev.get("after", {}).keys():
            return self.measure(model, tokenizer, MEASURE_PARTS)
        entry = {k: prev["after"][k] for k in MEASURES if k in prev["after"]}
        if self.stage == "s2":
            entry.update(drift=0.0, drifts=[0.0] * len(entry["en_losses"]))
        return entry

    def verdicts(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        """The stage's purpose and its verdict above noise, for meta.json and the report."""
        result = stage_verdicts(self.stage, before, after, self.opts.drift_bound)
        log.info("%s: %s", self.stage, result["verdict_line"])
        return result

    def gate_english(self, model: Gemma3, tokenizer: Tokenizer) -> dict[str, Any]:
        """The English dev exam's answers as s1 scored the chosen base (the model s1.1 starts from), else scored."""
        gate = stage_meta(self.run_dir, "s1") or {}
        correct = gate.get("en_correct", {}).get(gate.get("chosen"))
        preds = gate.get("en_preds", {}).get(gate.get("chosen"))
        if correct is None or preds is None or len(correct) != len(self.dev("en")):
            return self.measure(model, tokenizer, ("en_exam",))
        return {"en_accuracy": mean(correct), "en_correct": correct, "en_preds": preds}


class RunPhases(RunMeasures):
    """The stage's training phases and their settings: steps, batch, lr, the per-layer loss's weight."""

    def defaults(self) -> tuple[int, int, float]:
        """(steps per phase, micro-batch, lr) of this stage on the run's base when no option overrides them."""
        return STAGE_DEFAULTS[self.base["size"]][self.stage]

    def train_config(self, steps: int | None = None) -> TrainConfig:
        """The phase's TrainConfig: --max-steps, --batch-size, --grad-accum and --lr, else the stage's defaults; on
        CUDA engine.plan's fit. --batch-size counts examples per process: under torchrun the global micro-batch is
        N times it."""
        o = self.opts
        steps, (_, batch, lr) = steps or self.steps(), self.defaults()
        english = ENGLISH_BATCH.get(self.base["size"], {}).get(self.stage)  # per process
        batch, accum, checkpointing = o.batch_size or batch, o.grad_accum or 1, o.gradient_checkpointing
        if o.batch_size is None and o.grad_accum is None and not checkpointing:  # explicit flags override the plan
            batch, accum, checkpointing = stage_settings(self.stage, self.base["size"], self.base["model"], o.device,
                                                         batch, o.max_len, o.lora_rank,
                                                         (o.quantize or self.base.get("quantize")) == "4bit")
        return TrainConfig(max_steps=steps, batch_size=distributed.world() * batch, grad_accum=accum, lr=o.lr or lr,
                           warmup_steps=1, max_len=o.max_len, seed=o.seed, log_every=1, save_every=max(1, steps // 2),
                           gradient_checkpointing=checkpointing, device=o.device or "auto",
                           english_batch=distributed.world() * english if english and o.batch_size is None else None)

    def layer_weight(self) -> float:
        """The per-layer English loss's weight: --layer-weight, else the stage's (LAYER_WEIGHTS), else 10."""
        return self.opts.layer_weight if self.opts.layer_weight is not None else LAYER_WEIGHTS.get(self.stage, 10.0)

    def steps(self) -> int:
        """Optimizer steps of a training phase: --max-steps, else the stage's default times --budget (at least 1)."""
        return self.opts.max_steps or max(1, round(self.defaults()[0] * self.opts.budget))

    def train_phase(self, name: str, model: Gemma3, patterns: Sequence[str], loss_fn, batches,
                    config: TrainConfig, resume: bool | None = None) -> dict[str, Any]:
        """One training phase in OUT/name; resumed when --resume is given and a checkpoint exists."""
        trained = set_trainable(model, patterns)
        phase_dir = self.out / name
        resume = (self.opts.resume if resume is None else resume) and latest_checkpoint(phase_dir) is not None
        summary = train(model, loss_fn, batches, config, phase_dir, resume=resume, logger=self.logger, log_group=name)
        counts = dict(model.named_parameters())
        return {"phase": name, "steps": summary["steps"], "loss": summary["loss"], "seconds": summary["seconds"],
                "tokens": summary["tokens"],
                "tokens_per_s": summary["tokens_per_s"], "patterns": list(patterns),
                "trainable": sum(counts[n].numel() for n in trained), "tensors": len(trained)}


class RunGuard(RunPhases):
    """The English guard after a stage's training."""

    def english_guard(self, model: Gemma3, tokenizer: Tokenizer, patterns: Sequence[str],
                      after: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """English must hold above noise: mean English drift within --drift-bound, and English dev accuracy at
        min(gate, accuracy entering s2) minus a tolerance of at least one dev question (guard_check).

        Failing either, rounds of English-only per-layer training run, each re-checked; the best state (passing,
        then by English accuracy, then by drift) is kept. When recovery rounds changed the weights, "after" is
        measured again on the kept state (the next stage starts from it); the training's "after" stays in the
        guard record.
        """
        o = self.opts
        s2 = stage_meta(self.run_dir, "s2")
        reference = s2["english_reference"] if s2 else None
        reference = reference if reference is not None else stage_meta(self.run_dir, "s1")["scores"][self.base["size"]]
        floor, english_parts = min(o.gate, reference), ("en_exam", "en_text")
        english: dict[str, Any] = {}  # the last re-check's English measures: the kept state's "after" reuses them

        def check() -> dict[str, Any]:
            english.update(self.measure(model, tokenizer, english_parts))
            return guard_check(english["en_correct"], english["drifts"], floor, o.tolerance, o.drift_bound)

        config = self.train_config()
        examples = self.text(tokenizer, self.data.en_text)
        for_loss = Mapped(examples, lambda e: Example(e.ids, [False] + [True] * (len(e.ids) - 1)))  # all after BOS

        def train_round(n: int, failed: dict[str, Any]) -> None:
            log.info("English guard: %s; recovery round %d of %d", failed["line"], n, o.guard_rounds)
            self.train_phase(f"guard_round{n}", model, patterns, english_only_loss(o.layer_loss), for_loss, config)

        first = guard_check(after["en_correct"], after["drifts"], floor, o.tolerance, o.drift_bound)  # this state
        checks, passed, rounds = recover(model, first, check, train_round, o.guard_rounds)
        guard = guard_record(checks, passed, rounds, reference, o.drift_bound)
        log.info("English guard %s", guard["verdict_line"])
        if rounds:
            guard["after_training"] = after
            if passed:  # the last check measured English on the kept state: measure the rest
                rest = [p for p in STAGE_MEASURES.get(self.stage, MEASURE_PARTS) if p not in english_parts]
                after = {**self.measure(model, tokenizer, rest), **english}
            else:
                after = self.measure(model, tokenizer)
        return after, guard


class StageRun(RunGuard):
    """One stage of one run, as its script drives it: the layers above, and the stage's lock, directory and save."""

    def __init__(self, stage: str, opts: StageOptions):
        super().__init__(stage, opts)
        self._start = time.perf_counter()
        self._lock, self._made = None, []  # the stage's lock file; the directories this process made
        self.logger = MetricLogger()  # live curves (--log-to), opened by start() on the process that writes

    def start(self) -> None:
        """Takes the stage's lock for the life of the process, checks the stage order and makes the stage
        directory (under torchrun rank 0 alone does, and holds the lock)."""
        made_run = not self.run_dir.exists()
        self._lock = hold_lock(self.run_dir / f".{STAGES[self.stage].directory}.lock", str(self.out))
        self.logger = open_logger(self.opts.log_to, self.run_dir, STAGES[self.stage].directory, asdict(self.opts))
        self._made = [self.run_dir] if made_run else []
        require_previous(self.run_dir, self.stage)
        meta = stage_meta(self.run_dir, self.stage)
        if self.opts.resume and meta is not None:
            raise MedkoError(f"{self.stage} already ended in {self.out} with status {meta.get('status')!r}; --resume "
                             f"continues only an interrupted stage: delete {self.out} and the stages after it to "
                             f"train it again")
        if self.out.exists() and not self.opts.resume:
            raise MedkoError(f"{self.out} exists; pass --resume to continue it or delete it to start the stage over")
        if not self.out.exists():
            self._made.append(self.out)
            self.out.mkdir()

    def discard(self) -> bool:
        """After a refusal or failure: removes the directories this process made when they hold nothing to
        resume (no checkpoint, meta.json or translation cache), so the next command starts clean."""
        if self.out not in self._made or any(self.out.glob("*/checkpoints/step-*")) or any(
                (self.out / name).exists() for name in ("meta.json", "translations.jsonl")):
            return False
        shutil.rmtree(self.out, ignore_errors=True)
        if self.run_dir in self._made and list(self.run_dir.iterdir()) == [Path(self._lock.name)]:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return True

    def save(self, model: Gemma3 | None, meta: dict[str, Any]) -> None:
        """adapter.safetensors (the additions only, never base weights) and meta.json, each written atomically;
        then a failed guard stops the run in one sentence."""
        meta = {"stage": self.stage, "status": "done", **({"smoke": True} if self.opts.smoke else {}), **meta}
        guard = meta.get("guard")
        if guard is not None and not guard["passed"]:
            meta["status"] = "guard_failed"
        if model is not None:
            from safetensors.torch import save_file

            state = additions_state_dict(model)
            additions = distributed.on_main_whole(state)
            if additions:
                with atomic_write(self.out / "adapter.safetensors") as tmp:
                    save_file(additions, str(tmp))
            meta.update(surgery=model.surgery, additions=sum(v.numel() for v in state.values()),
                        seconds=time.perf_counter() - self._start)
        else:
            meta.setdefault("surgery", [])
        distributed.on_main(write_json_atomic, meta, self.out / "meta.json")
        log_stage(self.logger, meta)
        if guard is not None and not guard["passed"]:
            raise MedkoError(f"English guard failed after {self.stage} ({guard['verdict_line']}; accuracy history "
                             f"{[round(h, 3) for h in guard['history']]}); the best state is kept in {self.out}; "
                             f"lower --gate, --tolerance or raise --drift-bound, or train with more --max-steps")


def stage_script(stage: str, description: str | None) -> Callable[[Callable[[StageRun], None]], Callable[..., int]]:
    """Makes a stage's recipe, recipe(run), its script's main(argv) -> exit code: options parsed, order checked,
    the stage directory made; a MedkoError ends it in one line on stderr and exit code 1, another exception in one
    naming its crash log, Ctrl-C and SIGTERM (engine.faults) in one after the trainer's save, exit 130 and 143."""
    def wrap(recipe: Callable[[StageRun], None]) -> Callable[..., int]:
        @functools.wraps(recipe)
        def main(argv: Sequence[str] | None = None) -> int:
            setup_logging()
            faults.catch_sigterm()
            run = StageRun(stage, parse_stage_options(stage, argv, description))
            try:
                distributed.init()
                distributed.on_main(run.start)  # under torchrun rank 0 alone holds the lock and makes the directory
                torch.manual_seed(run.opts.seed)  # surgery (LoRA's A) starts alike on every rank
                recipe(run)
            except MedkoError as err:
                run.discard()
                if not isinstance(err, distributed.Relayed):  # rank 0 says what it relayed
                    print(f"medko: {err}", file=sys.stderr)
                return 1
            except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the trainer saved the last completed step
                kept = "nothing was kept, run it again" if run.discard() else f"continue it with --resume ({run.out})"
                if distributed.is_main():
                    print(faults.interrupt_line(err, stage, kept), file=sys.stderr)
                return faults.interrupt_code(err)
            except Exception as err:  # unforeseen: one sentence, the traceback in a crash log
                run.discard()
                print(faults.crash_report(err, stage, [run.out, run.run_dir], run.opts.debug), file=sys.stderr)
                return 1
            except BaseException:
                run.discard()
                raise
            finally:
                distributed.shutdown()
                run.logger.close()
                if run._lock is not None:
                    run._lock.close()
            log.info("%s done in %.0f s: %s", stage, time.perf_counter() - run._start, run.out)
            return 0
        return main
    return wrap


# ───────────────────────────── s0 and s1: data and the gate ─────────────────────────────

def read_sources(opts: StageOptions) -> tuple[str, dict[str, list], dict[str, dict[str, int]]]:
    """s0's sources: the bundled sample data, a local directory (--data DIR) or the hub, each replaceable by a file
    and read through --map. Returns where the data came from, the rows by role and engine.sources' counts."""
    hub = opts.data == "hub" or (opts.data is None and (opts.size or "270m") != "270m" and opts.model is None)
    root = None if hub else Path(opts.data or DATA_DIR)
    files = {"medqa": opts.en_mcq, "ko_text": opts.ko_text, "en_text": opts.en_text, "pairs": opts.pairs,
             "reasoning": opts.reasoning}
    rows, counts = sources.read_sources(root, files, parse_field_map(opts.map), opts.subsets.split(","),
                                        opts.skip_bad, opts.max_bad, opts.encoding)
    return ("hub" if hub else str(root)), rows, counts


def source_translations(run_dir: Path) -> Path | None:
    """The reference translations beside a local data source's exam (DIR/kormedmcqa_en, as the bundled data
    has), or None."""
    source = stage_meta(run_dir, "s0")["source"]
    return Path(source) / "kormedmcqa_en" if source != "hub" and (Path(source) / "kormedmcqa_en").is_dir() else None


def reference_translations(run_dir: Path, opts: StageOptions) -> Path | None:
    """Where s1 takes English exams from instead of translating: the data source's own translations
    (--english-exam auto), a directory given, or None when the model translates."""
    if opts.english_exam == "auto":
        return source_translations(run_dir)
    return None if opts.english_exam == "model" else Path(opts.english_exam)


def load_candidate(name: str, opts: StageOptions, nf4: bool) -> tuple[Gemma3, Tokenizer, Path]:
    """A gate candidate: a size, or the --model directory; nf4: its base in NF4 (engine.fit.candidates_that_fit)."""
    size, model = ("270m", name) if opts.model else (name, None)
    return load_base(size, model, opts.device, quantize="4bit" if nf4 else None)


# ───────────────────────────── the test split and the run report ─────────────────────────────

def test_english(run_dir: Path, rows: Sequence[MCQ]) -> Sequence[MCQ] | None:
    """The English version of the test split: s1's (reference or model translation), else the data source's own
    reference translations, else None."""
    if (stage_dir(run_dir, "s1") / "en_exam_test.jsonl").is_file():
        return english_exam(run_dir, "test")
    reference = source_translations(run_dir)
    return sources.reference_exam(reference, rows, "test", ",".join(sorted({r.subset for r in rows}))) if reference \
        else None


def score_test_split(run_dir: Path, device: str | None = None) -> dict[str, Any]:
    """The test split, scored once at the end on the run's final model: Korean and (where the run has the English
    version) English, in both formulations, with EN↔KO agreement overall and on the questions whose answer no Korean
    training text holds (s0's unseen_answers); strict answer-line compliance when the final stage trained it.

    The top-level report is the Korean exam in the run's formulation. The drift is the final stage's own
    measurement of the same model on the same held-out English texts (the texts the English guard decided on, which
    the report says), not a second identical pass."""
    out = Path(run_dir) / "test_report.json"
    if out.exists():
        raise MedkoError(f"{out} exists: the test split is scored once per run; delete it to score again")
    stage = final_stage(run_dir)
    model, tokenizer, _ = load_run_model_after(run_dir, stage, device)
    data = load_run_data(run_dir)
    if stage_meta(run_dir, "s0").get("smoke"):
        data.exam["test"] = data.exam["test"][:SMOKE_TEST_QUESTIONS]
    report = test_exams(model, tokenizer, run_dir, data, f"{run_dir}:{stage}")
    meta = stage_meta(run_dir, stage)
    if meta.get("reasoning_tokens"):  # the stage trained the answer line: score it on the test split too
        scores = reasoning_eval(model, tokenizer, data.exam["test"], meta["reasoning_tokens"])
        report["reasoning"] = {k: scores[k] for k in ("compliance", "accuracy", "strict", "correct")}
    drifts = meta.get("after", {}).get("drifts")
    source = f"{stage}'s measurement of held-out English texts (the guard's)"
    if not drifts:
        drifts, source = losses_and_drift(model, tokenizer, data.en_heldout, 512)[1], "held-out English texts"
    low, high = bootstrap_mean(drifts)
    report["drift"] = {"value": mean(drifts), "low": low, "high": high, "n": len(drifts), "source": source}
    write_json_atomic(report, out)
    return {"stage": stage, "accuracy": report["accuracy"], "subsets": report["subsets"], "n": report["n"],
            "formulation": report["formulation"], "en_accuracy": report.get("english", {}).get("accuracy"),
            "drift": report["drift"]["value"], "formulations": report["formulations"]}


def unseen_test_ids(run_dir: Path, rows: Sequence[MCQ]) -> set[str]:
    """Ids of the test questions whose answer no Korean training text holds (s0's unseen_answers)."""
    unseen = (stage_meta(run_dir, "s0") or {}).get("unseen_answers", {}).get("test", [])
    return {rows[i].id for i in unseen if i < len(rows)}  # a smoke run scores the first rows only


def test_exams(model: Gemma3, tokenizer: Tokenizer, run_dir: Path, data: RunData, name: str) -> dict[str, Any]:
    """The Korean test exam and its English version in both formulations (engine.compare.score_exams)."""
    rows = data.exam["test"]
    return score_exams(model, tokenizer, rows, test_english(run_dir, rows), run_formulation(run_dir),
                       unseen_test_ids(run_dir, rows), name)


def write_run_report(run_dir: Path) -> Path:
    """report.md and report.png (engine.report) from the stages' meta.json and the test split."""
    run_dir = Path(run_dir)
    metas = {s.name: stage_meta(run_dir, s.name) for s in STAGE_TABLE}
    if not any(metas.values()):
        raise MedkoError(f"{run_dir} holds no finished stage; run the curriculum (bash run.sh) first")
    test = run_dir / "test_report.json"
    return render_run_report(run_dir, [(s.name, s.title, s.directory) for s in STAGE_TABLE], TRAINING_STAGES, metas,
                             read_json(test) if test.is_file() else None)
