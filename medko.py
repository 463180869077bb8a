"""medko command line: download, convert, plan, generate, eval, translate, export, report.

Results go to stdout; logs and progress bars go to stderr.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import shared_logic as sl
from engine import distributed
from engine.checkpoints import ensure_270m, load_base, resolve_model_dir
from engine.costs import GPUS, hours_table
from engine.data import KORMEDMCQA_SUBSETS, load_kormedmcqa, load_mcq_file, load_texts, normalize_question
from engine.evaluate import (EXTRACTIONS, GENERATE_TOKENS, MODES as EVAL_MODES, agreement, check_cloze_prompt,
                             format_table, translate)
from engine.compare import Side, compare, read_test_report, table as compare_table
from engine.export import FORMATS, HeldOut, export_run
from engine.export_gguf import GGUF_TYPES
from engine.faults import catch_sigterm, crash_report, interrupt_code, interrupt_word
from engine.files import read_json
from engine.generate import generate
from engine.measures import BASE, losses_and_drift
from engine.hub import HUB_MODELS, hub_download
from engine.options import COUNT, POSITIVE, ZERO_OR_MORE, add_options
from engine.model import PRESETS
from engine.plan import GIB, Setup, plan_table
from engine.stats import describe_agreement, language_agreement
from engine.model_card import RunSummary, base_model_id
from engine.tokenizer import chat_prompt

MODEL_OPTIONS = ("size", "model", "device", "quantize")  # declared once, in shared_logic.StageOptions


def add_model_args(p: argparse.ArgumentParser) -> None:
    add_options(p, sl.StageOptions, MODEL_OPTIONS, size="270m")


def cmd_download(args: argparse.Namespace) -> None:
    print(hub_download(HUB_MODELS[args.size]))


def cmd_convert(args: argparse.Namespace) -> None:
    print(ensure_270m(args.cache_dir))


def cmd_plan(args: argparse.Namespace) -> None:
    """The memory plan at the stages' defaults (the largest micro-batch of STAGE_DEFAULTS, --max-len, --lora-rank)."""
    if args.size == "tiny":
        raise sl.MedkoError("plan the real sizes (270m, 4b, 27b); tiny is the tests' model")
    if args.quantize and args.nproc > 1:
        raise sl.MedkoError(distributed.NO_NF4)
    defaults = sl.StageOptions()
    setup = Setup(device=args.device, batch=max(b for _, b, _ in sl.STAGE_DEFAULTS[args.size].values()), max_len=defaults.max_len,
                  lora_rank=defaults.lora_rank, quantize=args.quantize == "4bit", nproc=args.nproc)
    gib = args.gpu_memory or GPUS[args.gpu]["memory_gib"]
    print(plan_table(PRESETS[args.size], setup, int(gib * GIB), f"--size {args.size}"))
    if args.hours:
        print()
        print(hours_table(args.size, args.gpu, gib))


def cmd_generate(args: argparse.Namespace) -> None:
    model, tokenizer, _ = load_base(args.size, args.model, args.device, quantize=args.quantize)
    prompt = chat_prompt(args.prompt) if args.chat else args.prompt
    print(generate(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens)[0])


def load_questions(data: str, split: str, subsets: str, lang: str, skip_bad: bool, encoding: str = "utf-8") -> list:
    """--data: 'kormedmcqa' (the hub), a directory laid out like it, or one MCQ file."""
    names = subsets.split(",")
    if data == "kormedmcqa" or Path(data).is_dir():
        return list(load_kormedmcqa(names, split, "hub" if data == "kormedmcqa" else data, lang, skip_bad,
                                    encoding=encoding))
    return list(load_mcq_file(data, lang=lang, skip_bad=skip_bad, encoding=encoding))


def model_for(args: argparse.Namespace):
    """(model, tokenizer, name): a run's model when --run is given, else the base of --size/--model."""
    if args.run:
        run_dir, stage = sl.run_and_stage(args.run)
        model, tokenizer, _ = sl.load_run_model_after(run_dir, stage, args.device, args.quantize)
        return model, tokenizer, f"{run_dir}:{stage}"
    model, tokenizer, path = load_base(args.size, args.model, args.device, quantize=args.quantize)
    return model, tokenizer, str(args.model or args.size)


def cmd_eval(args: argparse.Namespace) -> None:
    rows = load_questions(args.data, args.split, args.subsets, args.lang, args.skip_bad, args.encoding)[:args.limit]
    fewshot = []
    if args.fewshot:
        if not (args.data == "kormedmcqa" or Path(args.data).is_dir()):
            raise sl.MedkoError("--fewshot takes examples from the fewshot split, so --data must be kormedmcqa or "
                                "a directory laid out like it")
        shots = load_questions(args.data, "fewshot", args.subsets, args.lang, False, args.encoding)
        fewshot = [r for s in args.subsets.split(",") for r in [x for x in shots if x.subset == s][:args.fewshot]]
    # KorMedMCQA's fewshot split is dev questions: a question whose answer sits in the prompt is not scored.
    in_prompt = {normalize_question(r.question) for r in fewshot}
    left_out = [r.id for r in rows if normalize_question(r.question) in in_prompt]
    if left_out:
        rows = [r for r in rows if normalize_question(r.question) not in in_prompt]
        print(f"{len(left_out)} questions left out of scoring: they are the few-shot examples", file=sys.stderr)
    check_cloze_prompt(args.mode, args.chat, fewshot)  # before the model loads
    model, tokenizer, name = model_for(args)
    modes = {"both": ["logits", "generate"], "all": list(EVAL_MODES)}.get(args.mode, [args.mode])
    reports = [sl.evaluate(model, tokenizer, rows, mode, args.lang, args.chat, fewshot, args.batch_size,
                           args.max_new_tokens, model_name=name, extraction=args.extraction) for mode in modes]
    report = reports[0]
    extra = {"left_out_as_shots": left_out}
    for other in reports[1:]:
        extra[f"{other.mode}_agreement"] = agreement(report, other)
        extra[other.mode] = asdict(other)
    if args.agree_with:
        extra["agreement_with"] = agree_with(report, read_json(args.agree_with), args.agree_with)
    for r in reports:
        print(f"{r.mode} ({r.lang}):\n{format_table(r)}")
    for other in reports[1:]:
        print(f"agreement {report.mode}/{other.mode}: {extra[f'{other.mode}_agreement']:.3f}")
    if "agreement_with" in extra:
        found = extra["agreement_with"]
        print(f"agreement with {args.agree_with}: {found['agreement']:.3f}")
        if "languages" in found:
            print(f"EN↔KO ({report.mode}): {describe_agreement(found['languages'])}")
    if args.out:
        sl.write_json_atomic({**asdict(report), **extra}, Path(args.out))


def agree_with(report, other: dict, path: str) -> dict:
    """The share of shared questions answered alike; for the same exam in the other language (row-aligned ids,
    same formulation), the EN↔KO table and McNemar on the gap too."""
    found = {"report": path, "agreement": agreement(report, other)}
    if other.get("lang") not in (None, report.lang) and other.get("mode") == report.mode:
        ko, en = (report.predictions, other["predictions"]) if report.lang == "ko" else (other["predictions"],
                                                                                          report.predictions)
        found["languages"] = language_agreement(ko, en)
    return found


def cmd_translate(args: argparse.Namespace) -> None:
    model, tokenizer, name = model_for(args)
    cache = Path(args.cache or f"{args.out}.cache.jsonl")
    if args.texts:
        texts = list(load_texts(args.data, args.field, encoding=args.encoding))
        out = translate(model, tokenizer, texts, args.to, cache, args.batch_size, args.max_new_tokens,
                           progress=True, model_id=name, chat=args.chat)
        records = [{"source": t, "translation": o} for t, o in zip(texts, out)]
    else:
        rows = load_questions(args.data, args.split, args.subsets, "ko" if args.to == "en" else "en", False,
                              args.encoding)
        out = sl.translate_mcqs(rows, model, tokenizer, args.to, cache_path=cache, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, progress=True, model_id=name, chat=args.chat)
        records = map(sl.mcq_record, out)  # written as translated: one chunk in memory at a time
    sl.write_jsonl_atomic(records, Path(args.out))
    print(args.out)


def run_summary(run_dir: Path, stage: str, base: dict) -> RunSummary:
    """The exported stage and the stages before it, as their meta.json files hold them."""
    chain, name = [], stage
    while name is not None:
        chain.append(name)
        name = sl.previous_stage(run_dir, name)
    stages = [(n, sl.STAGES[n].title, sl.stage_meta(run_dir, n)) for n in reversed(chain) if n in sl.TRAINING_STAGES]
    test = run_dir / "test_report.json"
    return RunSummary(name=f"{run_dir}:{stage}", base_model=base_model_id(base["size"], base["model"]),
                      stages=stages, data=sl.stage_meta(run_dir, "s0"),
                      test=read_json(test) if test.is_file() and stage == sl.final_stage(run_dir) else None)


def cmd_export(args: argparse.Namespace) -> None:
    run_dir, stage = sl.run_and_stage(args.run_stage_dir)
    model, _, base = sl.load_run_model_after(run_dir, stage, args.device)
    tokenizer_path = resolve_model_dir(base["size"], base["model"]) / "tokenizer.json"
    held_out = None
    if args.format == "tied":
        data = sl.load_run_data(run_dir)
        held_out = HeldOut(data.ko_heldout, data.en_heldout, data.exam["dev"])
    print(export_run(model, Path(args.out), tokenizer_path, args.format, args.gguf_type,
                     run_summary(run_dir, stage, base), held_out))


def cmd_test(args: argparse.Namespace) -> None:
    result = sl.score_test_split(Path(args.run_dir), args.device)
    english = "" if result["en_accuracy"] is None else f", English {result['en_accuracy']:.3f}"
    print(f"test accuracy after {result['stage']} ({result['formulation']}): Korean {result['accuracy']:.3f}{english} "
          f"on {result['n']} questions; English drift {result['drift']:.4f} nats/token, KL from the stage's teacher "
          f"({result['drift_source']}; `compare` gives it from the base)")
    for mode, scored in result["formulations"].items():
        if "languages" in scored:
            print(f"EN↔KO ({mode}): {describe_agreement(scored['languages'])}")


def compare_side(path: str, other: str, device: str | None = None) -> tuple[Side, set[str]]:
    """A run directory's final model (its test_report.json, and English held-out loss and drift from its base), or
    "base": the base model of the other run, its test split scored once and kept in OTHER/base_test_report.json.
    Returns the side and the test ids whose answer no Korean training text holds."""
    run_dir = Path(other if path == "base" else path)
    data = sl.load_run_data(run_dir)
    if path == "base":
        base = sl.run_base(run_dir, None, None)
        model, tokenizer, _ = load_base(base["size"], base["model"], device)
        cached = run_dir / "base_test_report.json"
        if not cached.is_file():
            test = sl.test_exams(model, tokenizer, run_dir, data, "base", "base_test_predictions")
            distributed.on_main(sl.write_json_atomic, test, cached)
        test = read_test_report(cached)
        name = f"base ({base['model'] or base['size']})"
    else:
        report = run_dir / "test_report.json"
        if not report.is_file():
            raise sl.MedkoError(f"{report} is missing: score the run's test split first (python medko.py test --run-dir "
                             f"{run_dir})")
        test, name = read_test_report(report), str(run_dir)
        model, tokenizer, _ = sl.load_run_model_after(run_dir, sl.final_stage(run_dir), device)
    losses, drifts = losses_and_drift(model, tokenizer, data.en_heldout, 512, teacher=BASE)
    return Side(name, test, losses, drifts), sl.unseen_test_ids(run_dir, data.exam["test"])


def cmd_compare(args: argparse.Namespace) -> None:
    if args.a == "base" and args.b == "base":
        raise sl.MedkoError("compare needs at least one run directory; 'base' is the base of the other run")
    a, unseen = compare_side(args.a, args.b, args.device)
    b, _ = compare_side(args.b, args.a, args.device)
    rows = compare(a, b, sorted(unseen))
    print(compare_table(a, b, rows))
    if args.out:
        sl.write_json_atomic({"a": a.name, "b": b.name, "rows": rows}, Path(args.out))


def cmd_report(args: argparse.Namespace) -> None:
    print(sl.write_run_report(Path(args.run_dir)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medko", description="Teach MedGemma the Korean medical exams.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("download", help="fetch a MedGemma checkpoint from the Hugging Face hub into its cache")
    p.add_argument("--size", default="4b", choices=sorted(HUB_MODELS))
    p.set_defaults(handler=cmd_download)

    p = sub.add_parser("convert", help="convert the embedded Gemma 3 270M GGUF into a cached HF-layout directory")
    p.add_argument("--cache-dir", default=None, help="where to put it (default: ~/.cache/medko/gemma3-270m)")
    p.set_defaults(handler=cmd_convert)

    p = sub.add_parser("plan", help="estimated peak memory per stage, by part, and the settings that fit a GPU")
    p.add_argument("--size", default="27b", choices=sorted(sl.STAGE_DEFAULTS))
    p.add_argument("--gpu-memory", type=POSITIVE, default=None, help="GiB per GPU (default: --gpu's)")
    p.add_argument("--gpu", default="80gb", choices=sorted(GPUS), help="the GPU --hours costs (and its memory)")
    p.add_argument("--hours", action="store_true", help="also each stage's GPU hours at the real data volumes")
    p.add_argument("--nproc", type=COUNT, default=1, help="GPUs sharing the model (FSDP2 shards)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: float32, as measured on a CPU")
    p.add_argument("--quantize", default=None, choices=["4bit"], help="plan with an NF4 base")
    p.set_defaults(handler=cmd_plan)

    p = sub.add_parser("generate", help="greedy continuation of a prompt; prints only the continuation")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=COUNT, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat turn format")
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("eval", help="score multiple-choice questions (KorMedMCQA or a file); prints a table")
    add_model_args(p)
    p.add_argument("--run", default=None, help="score a run's model: RUN_DIR (its last stage) or RUN_DIR/STAGE_DIR")
    p.add_argument("--data", default="kormedmcqa", help="'kormedmcqa' (hub), a directory laid out like it, or a file")
    p.add_argument("--lang", default="ko", choices=["ko", "en"])
    p.add_argument("--mode", default="logits", choices=["logits", "generate", "cloze", "both", "all"],
                   help="logits: the next letter (MCF); generate: greedy answer, extracted; cloze: each option's text "
                        "scored per character (OLMES CF, for small models); both: logits and generate; all: the three")
    p.add_argument("--split", default="dev", choices=list(sl.KORMEDMCQA_SPLITS))
    p.add_argument("--subsets", default=",".join(KORMEDMCQA_SUBSETS))
    p.add_argument("--chat", action="store_true", help="wrap prompts in Gemma's chat turn format")
    p.add_argument("--fewshot", type=ZERO_OR_MORE, default=0, help="examples per subset from the fewshot split")
    p.add_argument("--limit", type=COUNT, default=None, help="score only the first N questions")
    p.add_argument("--batch-size", type=COUNT, default=16)
    p.add_argument("--max-new-tokens", type=COUNT, default=GENERATE_TOKENS, help="generate mode (lm-eval's 1024)")
    p.add_argument("--extraction", default="medko", choices=sorted(EXTRACTIONS),
                   help="generate mode's answer extraction: ours, or lm-eval kormedmcqa v3.0's (IGNORECASE)")
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad rows instead of stopping")
    p.add_argument("--agree-with", default=None, help="another report to compare answers with; the same exam in the "
                   "other language (row-aligned, same --mode) adds the EN↔KO table and McNemar on the gap")
    add_options(p, sl.StageOptions, ["encoding"])
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("translate", help="translate exam questions (or texts) with the model; cached and resumable")
    add_model_args(p)
    p.add_argument("--run", default=None, help="translate with a run's model")
    p.add_argument("--data", required=True, help="'kormedmcqa', a directory laid out like it, an MCQ file, or a text file")
    p.add_argument("--texts", action="store_true", help="--data is a text file (JSONL with --field)")
    p.add_argument("--field", default="text")
    add_options(p, sl.StageOptions, ["encoding"])
    p.add_argument("--split", default="dev", choices=list(sl.KORMEDMCQA_SPLITS))
    p.add_argument("--subsets", default=",".join(KORMEDMCQA_SUBSETS))
    p.add_argument("--to", default="en", choices=["en", "ko"])
    p.add_argument("--chat", action="store_true")
    p.add_argument("--batch-size", type=COUNT, default=16)
    p.add_argument("--max-new-tokens", type=COUNT, default=None,
                   help="most new tokens per line (default: twice the line's source tokens plus 16)")
    p.add_argument("--cache", default=None, help="translation cache (default: OUT.cache.jsonl)")
    p.add_argument("--out", required=True)
    p.set_defaults(handler=cmd_translate)

    p = sub.add_parser("export", help="write a run stage for transformers, vLLM or llama.cpp/Ollama, with a model card")
    p.add_argument("run_stage_dir", help="e.g. runs/default/s5_reasoning")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="hf", choices=FORMATS,
                   help="hf: exact (transformers); tied: tied embeddings for vLLM/SGLang, deviation measured; "
                        "gguf: llama.cpp and Ollama")
    p.add_argument("--gguf-type", default="f32", choices=GGUF_TYPES, help="tensor type of --format gguf")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("test", help="score the test split once on a run's final model")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--device", default=None)
    p.set_defaults(handler=cmd_test)

    p = sub.add_parser("compare", help="two runs (or a run and its base) paired on the test split: Korean and "
                       "English accuracy in both formulations, the EN-KO gap, compliance, English loss and drift")
    p.add_argument("a", help="a run directory, or 'base': the base model of the other run")
    p.add_argument("b", help="a run directory, or 'base'")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("report", help="write RUN_DIR/report.md and report.png from a run")
    p.add_argument("run_dir")
    p.set_defaults(handler=cmd_report)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="show an unexpected error's traceback here, not only in "
                                                             "its crash log")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; a MedkoError ends it in one line and exit code 1, any other exception in one line naming
    its crash log in ~/.cache/medko (engine.faults), Ctrl-C with 130 and SIGTERM with 143."""
    sl.setup_logging()
    catch_sigterm()
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except sl.MedkoError as err:
        print(f"medko: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # the files a command writes are atomic: nothing is left half-written
        print(f"medko: {args.command} {interrupt_word(err)}", file=sys.stderr)
        return interrupt_code(err)
    except Exception as err:
        print(crash_report(err, args.command, debug=args.debug), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
