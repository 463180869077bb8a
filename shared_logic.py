"""The curriculum the stages share: stage_layout.py's stage table, options, run data and model, measurements, test split
and run report, and on them the stage runner: training phases, the English guard, StageRun and stage_script.

Read it top to bottom. It imports stage_layout and the engine (engine/) and re-exports the names of both that the stage
scripts use, so a stage imports only this module; nothing in engine/ or stage_layout imports it.
"""
from __future__ import annotations

import functools
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from engine import distributed, faults
from engine.adapters import additions_state_dict
from engine.data import MCQ, Pair
from engine.errors import MedkoError, log, setup_logging
from engine.evaluate import translation_prompt
from engine.examples import Example, ExampleFile, text_examples
from engine.files import atomic_write, hold_lock, write_json_atomic
from engine.guard import guard_record, recover
from engine.loggers import MetricLogger, log_stage, open_logger
from engine.model import Gemma3
from engine.phase_losses import english_only_loss
from engine.plan import stage_settings
from engine.rows import Mapped
from engine.smoke import smoke_data
from engine.stats import guard_check, mean
from engine.tokenizer import Tokenizer
from engine.train_checkpoints import latest_checkpoint
from engine.trainer import TrainConfig, set_trainable, step_tokens, train
from stage_layout import (ENGLISH_BATCH, LAYER_WEIGHTS, MEASURES, MEASURE_PARTS, PART_KEYS, STAGES, STAGE_DEFAULTS,
                          STAGE_MEASURES, RunData, StageOptions, english_exam, limited, load_run_data,
                          load_run_model_after, measure, parse_stage_options, previous_stage, require_previous,
                          run_base, stage_dir, stage_meta, stage_verdicts)

# Engine and stage_layout names the stage scripts, medko.py, tests and bench use, re-exported (`x as x`), so a
# stage imports only this module.
from engine.adapters import (add_language_embeddings as add_language_embeddings, add_lora as add_lora,  # noqa: I001
                             adapter_specs as adapter_specs, duplicate_edge_layers as duplicate_edge_layers,
                             snapshot_adapter as snapshot_adapter, teacher_mode as teacher_mode)
from engine.data import (KORMEDMCQA_SPLITS as KORMEDMCQA_SPLITS, lazy_rows as lazy_rows, mcq_record as mcq_record,
                         split_overlap as split_overlap)
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
from engine.spool import spooling as spooling, write_rows as write_rows
from engine.sources import (held_out_sets as held_out_sets, korean_training_text as korean_training_text,
                            reference_exam as reference_exam, unseen_answers as unseen_answers)
from engine.trainer import mixed_batches as mixed_batches, steps_for_tokens as steps_for_tokens
from stage_layout import (ADDED_LR_SCALE as ADDED_LR_SCALE, DATA_DIR as DATA_DIR,
                          LANGUAGE_PATTERNS as LANGUAGE_PATTERNS, LORA_PATTERNS as LORA_PATTERNS,
                          STAGE_TABLE as STAGE_TABLE, TRAINING_STAGES as TRAINING_STAGES, final_stage as final_stage,
                          load_candidate as load_candidate, read_sources as read_sources,
                          reference_translations as reference_translations, run_and_stage as run_and_stage,
                          run_formulation as run_formulation, score_test_split as score_test_split,
                          test_exams as test_exams, unseen_test_ids as unseen_test_ids,
                          write_run_report as write_run_report)

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
