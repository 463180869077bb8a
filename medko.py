"""medko command line: download, convert, generate, eval, translate, export, report.

Results go to stdout; logs and progress bars go to stderr.
"""
from __future__ import annotations

import argparse
import sys

import shared_logic as sl


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="270m", choices=["270m", "4b", "27b"], help="model size (default: embedded 270m)")
    p.add_argument("--model", default=None, help="local HF-layout checkpoint directory (overrides --size)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def cmd_download(args: argparse.Namespace) -> None:
    print(sl.hub_download(sl.HUB_MODELS[args.size]))


def cmd_convert(args: argparse.Namespace) -> None:
    print(sl.ensure_270m(args.cache_dir))


def cmd_generate(args: argparse.Namespace) -> None:
    model, tokenizer, _ = sl.load_base(args.size, args.model, args.device)
    prompt = sl.chat_prompt(args.prompt) if args.chat else args.prompt
    print(sl.generate(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens)[0])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medko", description="Teach MedGemma the Korean medical exams.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("download", help="fetch a MedGemma checkpoint from the Hugging Face hub into its cache")
    p.add_argument("--size", default="4b", choices=sorted(sl.HUB_MODELS))
    p.set_defaults(run=cmd_download)

    p = sub.add_parser("convert", help="convert the embedded Gemma 3 270M GGUF into a cached HF-layout directory")
    p.add_argument("--cache-dir", default=None, help="where to put it (default: ~/.cache/medko/gemma3-270m)")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("generate", help="greedy continuation of a prompt; prints only the continuation")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat turn format")
    p.set_defaults(run=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    sl.setup_logging()
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except sl.MedkoError as err:
        print(f"medko: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
