"""What travels with an export: the model card (README.md in Hugging Face's format, YAML metadata first), Gemma's
chat template and the Ollama Modelfile. Every figure in the card is read from the run's records, never retyped.

Imports engine.data, engine.locations, engine.hub, engine.model and engine.export_gguf.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.data import KORMEDMCQA
from engine.locations import SOURCES
from engine.hub import HUB_MODELS
from engine.export_gguf import gguf_file_name, llama_cpp_problems
from engine.model import ModelConfig
from engine.stats import wilson

# Gemma 3's text chat template (as in Google's tokenizer_config.json, images left out): a system message is
# folded into the first user turn, "assistant" is written "model".
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# Ollama's Go template for the same turns; greedy decoding, as the exam is scored.
OLLAMA_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "user") (eq .Role "system") }}<start_of_turn>user
{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""

# Data a run may read from the hub, with the licence its card states (data/README.md has the same table).
DATA_LICENCES = {
    KORMEDMCQA: "CC BY-NC 2.0 (non-commercial)",
    SOURCES["medqa"].location: "CC BY 4.0 per its dataset card",
    SOURCES["ko_text"].location: "see its dataset card",
    SOURCES["reasoning"].location: "see its dataset card",
}
GEMMA_TERMS = "https://ai.google.dev/gemma/terms"
# The hub model each size is built from; the embedded 270M is a dequantized GGUF of Google's Gemma 3 270M.
BASE_MODELS = {**HUB_MODELS, "270m": "google/gemma-3-270m"}


@dataclass
class RunSummary:
    """The run behind an export, as its records hold it."""

    name: str  # RUN_DIR:stage
    base_model: str  # hub id of the base, or its local path
    stages: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (name, title, meta.json) in order
    data: dict[str, Any] | None = None  # s0's meta.json
    test: dict[str, Any] | None = None  # test_report.json, when the test split was scored


def base_model_id(size: str | None, model: str | None) -> str:
    """The hub id of a run's base (--size), or the local directory it was given as (--model)."""
    return str(Path(model).resolve()) if model else BASE_MODELS.get(size or "270m", size or "")


def chat_template(tokenizer_path: Path) -> str:
    """The base tokenizer's chat template when its tokenizer_config.json has one, else Gemma 3's."""
    config = Path(tokenizer_path).parent / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return GEMMA_CHAT_TEMPLATE


def ollama_modelfile(gguf_name: str) -> str:
    return (f"FROM ./{gguf_name}\nTEMPLATE \"\"\"{OLLAMA_TEMPLATE}\"\"\"\n"
            "PARAMETER stop <end_of_turn>\nPARAMETER temperature 0\n")


def accuracy_cell(value: float | None, n: int | None) -> str:
    """accuracy (k/n) [95% interval]; n only when it reproduces the accuracy (an --eval-limit run scores fewer)."""
    if value is None:
        return "–"
    if n and abs(value * n - round(value * n)) < 1e-6:
        lo, hi = wilson(round(value * n), n)
        return f"{value:.3f} ({round(value * n)}/{n}) [{lo:.3f}, {hi:.3f}]"
    return f"{value:.3f} (n not recorded)"


def _stage_rows(summary: RunSummary, n_dev: int | None) -> list[str]:
    rows = ["| stage | trained | steps | Korean dev accuracy before → after | English dev accuracy before → after "
            "| guard |", "| --- | --- | ---: | --- | --- | --- |"]
    for _, title, meta in summary.stages:
        phases = meta.get("phases", [])
        trained = ", ".join(f"`{p}`" for p in sorted({p for ph in phases for p in ph["patterns"]})) or "–"
        steps = sum(ph["steps"] for ph in phases)
        before, after = meta.get("before", {}), meta.get("after", {})
        cells = [f"{accuracy_cell(before.get(k), n_dev)} → {accuracy_cell(after.get(k), n_dev)}"
                 for k in ("ko_accuracy", "en_accuracy")]
        guard = meta.get("guard")
        guard_cell = "–" if not guard else ("passed" if guard["passed"] else "FAILED") + f" (threshold {guard['threshold']:.3f})"
        rows.append(f"| {title} | {trained} | {steps} | {cells[0]} | {cells[1]} | {guard_cell} |")
    return rows


def _data_section(summary: RunSummary) -> tuple[list[str], list[str]]:
    """(lines, hub dataset ids) for the data the run read."""
    data = summary.data or {}
    source = data.get("source", "unknown")
    counts = ", ".join(f"{k.removesuffix('.jsonl')} {v}" for k, v in data.get("counts", {}).items())
    lines = [f"Data read by s0 from `{source}`" + (f": {counts}." if counts else "."), ""]
    datasets = list(DATA_LICENCES) if source == "hub" else []
    lines += ["The sources medko reads from the hub, and their licences:", "", "| data set | licence |", "| --- | --- |"]
    lines += [f"| `{repo}` | {licence} |" for repo, licence in DATA_LICENCES.items()]
    lines += ["", "KorMedMCQA is CC BY-NC 2.0: this model was trained and selected on it, so it is for "
              "**non-commercial use only**, on top of the Gemma terms of use of the base model "
              f"({GEMMA_TERMS}). A run on local data is bound by that data's licence instead."]
    return lines, datasets


def _loading(fmt: str, out_dir: Path, gguf_type: str) -> list[str]:
    name = out_dir.name
    if fmt == "gguf":
        return ["```sh", f"ollama create {name} -f {out_dir}/Modelfile", f"ollama run {name} \"고혈압의 정의는?\"",
                f"llama-cli -m {out_dir}/{gguf_file_name(gguf_type)} -cnv   # llama.cpp", "```"]
    lines = ["```python", "from transformers import AutoTokenizer, Gemma3ForCausalLM",
             f"tok = AutoTokenizer.from_pretrained(\"{out_dir}\")",
             f"model = Gemma3ForCausalLM.from_pretrained(\"{out_dir}\")", "```"]
    if fmt == "tied":
        lines += ["", "```sh", f"vllm serve {out_dir}", "```"]
    else:
        lines += ["", "vLLM's Gemma 3 requires tied embeddings; export with `--format tied` for vLLM or SGLang."]
    return lines


def model_card(summary: RunSummary, fmt: str, config: ModelConfig, deviation: str | None, gguf_type: str,
               out_dir: Path) -> str:
    """README.md of an export directory; deviation is the tied fold's measurement as export prints it."""
    dir_name = Path(out_dir).name
    data_lines, datasets = _data_section(summary)
    n_dev = (summary.data or {}).get("counts", {}).get("exam_dev.jsonl")
    yaml = ["---"]
    if summary.base_model and not Path(summary.base_model).is_absolute():
        yaml.append(f"base_model: {summary.base_model}")
    yaml += ["license: other", "license_name: gemma-terms-and-cc-by-nc-2.0", f"license_link: {GEMMA_TERMS}",
             "language:", "- ko", "- en",
             f"library_name: {'gguf' if fmt == 'gguf' else 'transformers'}", "pipeline_tag: text-generation",
             "tags:", "- medical", "- korean", "- gemma3", "- medko", "- kormedmcqa"]
    yaml += ["- gguf"] if fmt == "gguf" else []
    yaml += (["datasets:"] + [f"- {d}" for d in datasets]) if datasets else []
    yaml.append("---")
    what = {"hf": "exact: LoRA merged, added layers as ordinary layers, language vectors folded into an untied "
                  "input embedding (logits equal the run's model to float rounding)",
            "tied": "tied embeddings for vLLM/SGLang: the language vectors are folded into the one embedding "
                    "matrix, which the head then also sees; the deviation from the exact model is measured below",
            "gguf": f"GGUF ({gguf_type}) for llama.cpp and Ollama, norms stored as 1 + w; an Ollama Modelfile is "
                    f"beside it"}[fmt]
    lines = [*yaml, "", f"# {dir_name}", "",
             f"Gemma 3 ({config.num_layers} layers, hidden {config.hidden_size}) taught the Korean medical "
             f"licensing exams by medko's curriculum, exported from run `{summary.name}` on base "
             f"`{summary.base_model}`.", "", f"Format `{fmt}`: {what}.", "", "## Stages", "",
             *_stage_rows(summary, n_dev), "",
             "Accuracies are logits-mode scores on the dev split as each stage's meta.json records them, with "
             "(correct/n) and 95% Wilson intervals.", ""]
    if summary.test:
        t = summary.test
        lines += [f"Test split, scored once on `{t['model']}`: {accuracy_cell(t['accuracy'], t['n'])}.", ""]
    if deviation is not None:
        lines += ["## Deviation of the tied fold", "", "Measured at export against the exact model "
                  "(KL(exact ‖ tied) per next-token position; agreement intervals are 95% Wilson):", "",
                  *[f"- {line}" for line in deviation.splitlines()], ""]
    if problems := llama_cpp_problems(config):
        lines += ["## Engine caveat", "", "Engines that derive Gemma 3's layer layout from its size rather than "
                  "from `layer_types` (llama.cpp's gemma3, vLLM versions that use `sliding_window_pattern`) compute "
                  "another model here: " + "; ".join(problems) + ".", ""]
    lines += ["## Data and licences", "", *data_lines, "", "## Use", "", *_loading(fmt, Path(out_dir), gguf_type), "",
              "Chat turns follow `chat_template.jinja` (Gemma's `<start_of_turn>user ... <end_of_turn>`). "
              "For research on exam questions only; not for clinical decisions.", "", "## Publish", "", "```sh",
              f"huggingface-cli upload YOUR_NAME/{dir_name} {out_dir} . --repo-type model", "```", ""]
    return "\n".join(lines)
