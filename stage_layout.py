"""The curriculum's layout, the lower layer of shared_logic.py: the stage table and the stages' defaults, typed stage
options, a run's directories, data and model, what a stage measures and how its purpose is judged, s0's sources and
s1's candidates, the test split and the run report.

Read it top to bottom. It imports only the engine (engine/); shared_logic.py builds the stage runner on it and
re-exports the names stages use, so a stage imports shared_logic alone. Nothing in engine/ imports it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from engine import sources
from engine.adapters import apply_surgery, load_additions_file
from engine.checkpoints import SIZES, load_base
from engine.compare import read_test_report, score_exams
from engine.data import ENCODINGS, KORMEDMCQA_SPLITS, MCQ, Pair, lazy_rows, parse_field_map
from engine.errors import MedkoError, log
from engine.files import read_json, write_json_atomic
from engine.loggers import LOG_TO
from engine.measures import losses_and_drift, measure_parts
from engine.model import Gemma3
from engine.options import COUNT, FRACTION, POSITIVE, ZERO_OR_MORE, add_options, number, option
from engine.reasoning import reasoning_eval
from engine.report import write_run_report as render_run_report
from engine.smoke import SMOKE_TEST_QUESTIONS, smoke_options
from engine.stats import bootstrap_mean, describe, judge, mean, overall_verdict
from engine.tokenizer import Tokenizer

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
    """The normalised data s0 wrote into the run, read from s0's files as it is used (engine.rows), held-out sets
    too (53 MiB of strings at ten times the real volumes), so that a stage's memory stays flat however large the
    data."""

    exam: dict[str, Sequence[MCQ]]  # Korean exam by split: train, dev, test, fewshot
    en_mcq: Sequence[MCQ]  # English exam-style questions (MedQA style)
    ko_text: Sequence[str]  # Korean medical text for training
    en_text: Sequence[str]  # English medical text for training
    ko_heldout: Sequence[str]  # Korean text never trained on, for before/after losses
    en_heldout: Sequence[str]  # English text never trained on, for losses and drift
    pairs: Sequence[Pair]  # Korean-English pairs
    reasoning: Sequence[MCQ]  # Korean exam rows with worked reasoning
    pairs_heldout: Sequence[Pair] = ()  # Korean-English pairs never trained on (s4's chrF)


def load_run_data(run_dir: Path) -> RunData:
    d = stage_dir(run_dir, "s0")
    exam = {s: lazy_rows(d / f"exam_{s}.jsonl", "mcq", "ko") for s in KORMEDMCQA_SPLITS}
    texts = lambda name: lazy_rows(d / f"{name}.jsonl", "text")  # noqa: E731
    pairs = lambda name: lazy_rows(d / name, "pair") if (d / name).is_file() else []  # noqa: E731
    return RunData(exam, lazy_rows(d / "en_mcq.jsonl", "mcq", "en"), lazy_rows(d / "ko_text.jsonl", "text"),
                   lazy_rows(d / "en_text.jsonl", "text"), texts("ko_heldout"), texts("en_heldout"),
                   pairs("pairs.jsonl"), lazy_rows(d / "reasoning.jsonl", "reasoning", "ko"),
                   pairs("pairs_heldout.jsonl"))


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


# ───────────────────────────── s0 and s1: data and the gate ─────────────────────────────

def read_sources(opts: StageOptions, directory: Path) -> tuple[str, dict[str, Any], dict[str, dict[str, int]]]:
    """s0's sources: the bundled sample data, a local directory (--data DIR) or the hub, each replaceable by a file
    and read through --map, each into a spool in `directory`. Returns where the data came from, the spools by role
    and engine.sources' counts."""
    hub = opts.data == "hub" or (opts.data is None and (opts.size or "270m") != "270m" and opts.model is None)
    root = None if hub else Path(opts.data or DATA_DIR)
    files = {"medqa": opts.en_mcq, "ko_text": opts.ko_text, "en_text": opts.en_text, "pairs": opts.pairs,
             "reasoning": opts.reasoning}
    rows, counts = sources.read_sources(root, files, parse_field_map(opts.map), opts.subsets.split(","),
                                        opts.skip_bad, opts.max_bad, directory, opts.encoding)
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
        raise MedkoError(f"{out} exists: the test split is scored once per run; delete it (and test_predictions/) "
                         f"to score again")
    stage = final_stage(run_dir)
    model, tokenizer, _ = load_run_model_after(run_dir, stage, device)
    data = load_run_data(run_dir)
    if stage_meta(run_dir, "s0").get("smoke"):
        data.exam["test"] = data.exam["test"][:SMOKE_TEST_QUESTIONS]
    report = test_exams(model, tokenizer, run_dir, data, f"{run_dir}:{stage}", "test_predictions")
    meta = stage_meta(run_dir, stage)
    if meta.get("reasoning_tokens"):  # the stage trained the answer line: score it on the test split too
        scores = reasoning_eval(model, tokenizer, data.exam["test"], meta["reasoning_tokens"])
        report["reasoning"] = {k: scores[k] for k in ("compliance", "accuracy", "strict", "correct")}
    drifts = meta.get("after", {}).get("drifts")
    source = f"{stage}'s measurement of held-out English texts, the guard's"
    if not drifts:
        drifts, source = losses_and_drift(model, tokenizer, data.en_heldout, 512)[1], "held-out English texts"
    low, high = bootstrap_mean(drifts)
    report["drift"] = {"value": mean(drifts), "low": low, "high": high, "n": len(drifts), "source": source}
    write_json_atomic(report, out)
    return {"stage": stage, "accuracy": report["accuracy"], "subsets": report["subsets"], "n": report["n"],
            "formulation": report["formulation"], "en_accuracy": report.get("english", {}).get("accuracy"),
            "drift": report["drift"]["value"], "drift_source": source, "formulations": report["formulations"]}


def unseen_test_ids(run_dir: Path, rows: Sequence[MCQ]) -> set[str]:
    """Ids of the test questions whose answer no Korean training text holds (s0's unseen_answers)."""
    unseen = (stage_meta(run_dir, "s0") or {}).get("unseen_answers", {}).get("test", [])
    return {rows[i].id for i in unseen if i < len(rows)}  # a smoke run scores the first rows only


def test_exams(model: Gemma3, tokenizer: Tokenizer, run_dir: Path, data: RunData, name: str,
               predictions: str) -> dict[str, Any]:
    """The Korean test exam and its English version in both formulations (engine.compare.score_exams), each
    scoring's predictions written to RUN_DIR/PREDICTIONS/."""
    rows = data.exam["test"]
    return score_exams(model, tokenizer, rows, test_english(run_dir, rows), run_formulation(run_dir),
                       unseen_test_ids(run_dir, rows), name, Path(run_dir) / predictions)


def write_run_report(run_dir: Path) -> Path:
    """report.md and report.png (engine.report) from the stages' meta.json and the test split."""
    run_dir = Path(run_dir)
    metas = {s.name: stage_meta(run_dir, s.name) for s in STAGE_TABLE}
    if not any(metas.values()):
        raise MedkoError(f"{run_dir} holds no finished stage; run the curriculum (bash run.sh) first")
    test = run_dir / "test_report.json"
    return render_run_report(run_dir, [(s.name, s.title, s.directory) for s in STAGE_TABLE], TRAINING_STAGES, metas,
                             read_test_report(test) if test.is_file() else None)
