"""Export of a run's model for serving engines: `hf` (exact, untied head once language vectors exist), `tied`
(one embedding matrix, as vLLM's Gemma 3 requires, with the fold's deviation measured) and `gguf` (llama.cpp and
Ollama, written by engine.export_gguf), each with a model card (engine.model_card). Files get ordinary
permissions and appear whole or not at all.

Imports engine.errors, engine.files, engine.model, engine.adapters, engine.data, engine.evaluate,
engine.tokenizer, engine.export_gguf and engine.model_card.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from engine.adapters import adapter_specs, dense_weight, lora_modules, merge_lora
from engine.data import LETTERS, MCQ
from engine.errors import MedkoError, log
from engine.evaluate import letter_scores, mcq_prompt
from engine.export_gguf import GGUF_TYPES, gguf_file_name, llama_cpp_problems, write_gguf
from engine.files import atomic_write
from engine.model import Gemma3, config_to_hf, model_device
from engine.model_card import RunSummary, chat_template, model_card, ollama_modelfile
from engine.stats import wilson
from engine.tokenizer import Tokenizer

FORMATS = ("hf", "tied", "gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_weights(model: Gemma3) -> tuple[dict[str, torch.Tensor], bool]:
    """Plain Gemma 3 weights under transformers' names, and whether input and output embeddings stay tied.

    Active adapters are merged, inactive ones (the teacher) dropped; language embeddings are folded into an
    untied input embedding while lm_head keeps the original one.
    """
    state = {k: dense_weight(v) for k, v in model.state_dict(keep_vars=True).items()}
    specs = adapter_specs(model)
    for name in sorted({a for m in lora_modules(model) for a in m.active}):
        state = merge_lora(state, name, specs[name].scaling)
    state = {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}
    state = {k: v for k, v in state.items() if not k.startswith("language_embedding.")}
    out = {f"model.{k}": v.contiguous() for k, v in state.items()}
    lang = model.language_embedding
    if lang is None:
        return out, True
    embed = state["embed_tokens.weight"]
    # Gemma multiplies the input embedding by sqrt(hidden) rounded to the weight dtype; divide by the same.
    scale = torch.tensor(model.config.hidden_size ** 0.5, dtype=embed.dtype).float()
    with torch.no_grad():
        added = lang(torch.arange(embed.shape[0], device=embed.device)).float()
    out["model.embed_tokens.weight"] = ((embed.float() * scale + added) / scale).to(embed.dtype).contiguous()
    out["lm_head.weight"] = embed.contiguous()
    return out, False


def tied_weights(model: Gemma3) -> dict[str, torch.Tensor]:
    """export_weights with the head dropped: the folded input embedding serves as the output embedding too.

    No exact tied form exists once the language vectors differ. The input row must stay s*E[t] + L[t] (the only
    changes of residual basis that commute with Gemma's per-coordinate RMSNorm weights are signed permutations,
    which move input and head together, and s = sqrt(hidden) is fixed by every engine), so the tied head adds
    h.L[t]/s to token t's logit. A vector shared by all tokens shifts every logit alike and cancels in the softmax;
    the Korean-English difference (and any per-token delta) does not, and that is what the export measures.
    """
    state, _ = export_weights(model)
    state.pop("lm_head.weight", None)
    return state


def twin_from_weights(model: Gemma3, state: dict[str, torch.Tensor]) -> Gemma3:
    """A plain medko Gemma3 holding exported weights (tied head), to measure an export against the run model."""
    twin = Gemma3(model.config).to(device=model_device(model), dtype=model.embed_tokens.weight.dtype)
    twin.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    return twin.eval()


@dataclass
class HeldOut:
    """What the tied fold is measured on: held-out texts the run never trained on and the Korean dev exam."""

    ko_texts: Sequence[str]
    en_texts: Sequence[str]
    exam: Sequence[MCQ]
    max_len: int = 512  # tokens per text


@torch.no_grad()
def _text_deviation(exact: Gemma3, tied: Gemma3, tokenizer: Tokenizer, texts: Sequence[str], max_len: int,
                    chunk: int = 128) -> dict[str, Any]:
    """Mean KL(exact || tied) of the next-token distributions and argmax agreement, over every position."""
    kl_sum, agree, n = 0.0, 0, 0
    device = model_device(exact)
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text)[:max_len]], device=device)
        if ids.shape[1] < 2:
            continue
        h_exact = exact(ids, return_logits=False).hidden[0, :-1]
        h_tied = tied(ids, return_logits=False).hidden[0, :-1]
        for start in range(0, h_exact.shape[0], chunk):  # [chunk x vocab] logits at a time
            p = torch.log_softmax(exact.logits(h_exact[start:start + chunk]).double(), -1)
            q = torch.log_softmax(tied.logits(h_tied[start:start + chunk]).double(), -1)
            kl_sum += float((p.exp() * (p - q)).sum())
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            n += p.shape[0]
    low, high = wilson(agree, n)
    return {"texts": len(texts), "positions": n, "mean_kl": kl_sum / max(n, 1),
            "argmax_agreement": agree / max(n, 1), "agreement_interval": [low, high]}


def _letters(scores: torch.Tensor, rows: Sequence[MCQ]) -> list[str]:
    """The predicted letter among each question's own options."""
    allowed = torch.tensor([[letter in row.options for letter in LETTERS] for row in rows])
    return [LETTERS[i] for i in scores.masked_fill(~allowed, float("-inf")).argmax(-1).tolist()]


def tied_deviation(exact: Gemma3, tied: Gemma3, tokenizer: Tokenizer, held_out: HeldOut) -> dict[str, Any]:
    """How far the tied export is from the exact model: per text set mean KL and next-token argmax agreement;
    on the Korean dev exam the agreement of the predicted letters (logits mode, the harness prompt)."""
    out = {"ko_text": _text_deviation(exact, tied, tokenizer, held_out.ko_texts, held_out.max_len),
           "en_text": _text_deviation(exact, tied, tokenizer, held_out.en_texts, held_out.max_len)}
    rows = list(held_out.exam)
    prompts = [mcq_prompt(row, "ko") for row in rows]
    a = _letters(letter_scores(exact, tokenizer, prompts), rows) if rows else []
    b = _letters(letter_scores(tied, tokenizer, prompts), rows) if rows else []
    same = sum(x == y for x, y in zip(a, b))
    low, high = wilson(same, len(rows))
    out["ko_dev_exam"] = {"questions": len(rows), "letter_agreement": same / max(len(rows), 1),
                          "agreement_interval": [low, high]}
    return out


def format_deviation(deviation: dict[str, Any]) -> str:
    """The measured deviation as a few lines for the terminal and the model card."""
    lines = []
    for key, title in (("ko_text", "Korean held-out text"), ("en_text", "English held-out text")):
        d = deviation[key]
        lo, hi = d["agreement_interval"]
        lines.append(f"{title}: mean KL {d['mean_kl']:.3g} nats/token, next-token argmax agreement "
                     f"{d['argmax_agreement']:.4f} [{lo:.4f}, {hi:.4f}] over {d['positions']} positions "
                     f"({d['texts']} texts)")
    d = deviation["ko_dev_exam"]
    lo, hi = d["agreement_interval"]
    lines.append(f"Korean dev exam: letter-prediction agreement {d['letter_agreement']:.4f} [{lo:.4f}, {hi:.4f}] "
                 f"over {d['questions']} questions")
    return "\n".join(lines)


def ordinary_permissions(root: Path) -> None:
    """Directories 0777 and files 0666 under the user's umask (0755/0644 with the usual 022): mkdtemp makes
    the directory 0700 and some writers make files 0600, which would hide an export from other users."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _copy_tokenizer(tokenizer_path: Path, out: Path, template: str) -> None:
    shutil.copyfile(tokenizer_path, out / "tokenizer.json")
    for name in _TOKENIZER_FILES[1:]:
        if (tokenizer_path.parent / name).is_file():
            shutil.copyfile(tokenizer_path.parent / name, out / name)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {"tokenizer_class": "GemmaTokenizer"}
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").write_text(template)


def export_run(model: Gemma3, out_dir: str | Path, tokenizer_path: str | Path, fmt: str = "hf",
               gguf_type: str = "f32", summary: RunSummary | None = None, held_out: HeldOut | None = None) -> Path:
    """Writes the model in one format with its model card, into a temporary directory renamed into place.

    hf: config.json, model.safetensors and the tokenizer, exact. tied: the same with tied embeddings; held_out is
    required and the deviation goes to stdout, tied_deviation.json and the card. gguf: one GGUF and an Ollama
    Modelfile. A disk without room for it is refused before writing, and a disk that fills while writing is named
    in the same sentence: bytes needed, bytes free, directory.
    """
    out_dir, tokenizer_path = Path(out_dir), Path(tokenizer_path)
    if fmt not in FORMATS:
        raise MedkoError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if gguf_type not in GGUF_TYPES:
        raise MedkoError(f"unknown GGUF type {gguf_type!r}; use one of {', '.join(GGUF_TYPES)}")
    if out_dir.exists():
        raise MedkoError(f"{out_dir} already exists; remove it or export to a new directory")
    if not tokenizer_path.is_file():
        raise MedkoError(f"{tokenizer_path} is missing; pass the base model's tokenizer.json")
    if fmt == "tied" and held_out is None:
        raise MedkoError("the tied export measures its deviation on held-out text and the dev exam; pass held_out")
    if fmt == "gguf" and (problems := llama_cpp_problems(model.config)):
        raise MedkoError("llama.cpp's gemma3 would compute another model: " + "; ".join(problems)
                         + "; export --format hf or tied instead")
    tokenizer = Tokenizer(tokenizer_path)
    template = chat_template(tokenizer_path)
    deviation = None
    if fmt == "tied":
        state, tied = tied_weights(model), True
        deviation = tied_deviation(model, twin_from_weights(model, state), tokenizer, held_out)
        print(format_deviation(deviation))
    else:
        state, tied = export_weights(model)
    summary = summary or RunSummary(name=str(out_dir.name), base_model="", stages=[], test=None)
    # The context length is the base model's (32768 for the 270M), not medko's config default.
    base_config = tokenizer_path.parent / "config.json"
    context = json.loads(base_config.read_text()).get("max_position_embeddings", 131072) \
        if base_config.is_file() else 131072
    needed = export_bytes(state, fmt, gguf_type)
    room = out_dir.resolve().parent
    room.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(room).free
    if free < needed:
        raise MedkoError(no_room(room, needed, free))
    try:
        _write_export(out_dir, state, model, fmt, gguf_type, tokenizer_path, template, context, tied, summary,
                      deviation)
    except Exception as err:  # safetensors raises its own SafetensorError for a full disk, not an OSError
        if getattr(err, "errno", None) != errno.ENOSPC and "No space left on device" not in str(err):
            raise
        raise MedkoError(no_room(room, needed, shutil.disk_usage(room).free)) from None
    log.info("exported %s as %s (%d tensors, embeddings %s)", out_dir, fmt, len(state), "tied" if tied else "untied")
    return out_dir


# Bytes per value of each GGUF type (q8_0: 32 int8 values and one f16 scale per block); hf keeps the weights' dtype.
_GGUF_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
EXPORT_SLACK = 16 << 20  # tokenizer, config, card and filesystem blocks beyond the weights


def export_bytes(state: dict[str, torch.Tensor], fmt: str, gguf_type: str) -> int:
    """About how many bytes an export writes: its weights in their stored type, and EXPORT_SLACK."""
    if fmt == "gguf":
        return int(sum(t.numel() for t in state.values()) * _GGUF_BYTES[gguf_type]) + EXPORT_SLACK
    return sum(t.numel() * t.element_size() for t in state.values()) + EXPORT_SLACK


def no_room(directory: Path, needed: int, free: int) -> str:
    return (f"{directory} has {free:,} bytes free but the export needs about {needed:,}; free space on that disk or "
            f"export to another --out (nothing was left behind)")


def _write_export(out_dir: Path, state: dict[str, torch.Tensor], model: Gemma3, fmt: str, gguf_type: str,
                  tokenizer_path: Path, template: str, context: int, tied: bool, summary: RunSummary,
                  deviation: dict[str, Any] | None) -> None:
    """The export's files, written into a temporary directory renamed onto out_dir when all are written."""
    from safetensors.torch import save_file

    with atomic_write(out_dir, directory=True) as tmp:
        if fmt == "gguf":
            write_gguf(state, model.config, tokenizer_path, template, tmp / gguf_file_name(gguf_type), gguf_type,
                       name=summary.name, context_length=context)
            (tmp / "Modelfile").write_text(ollama_modelfile(gguf_file_name(gguf_type)))
            (tmp / "chat_template.jinja").write_text(template)
        else:
            hf_config = config_to_hf(model.config)
            hf_config["tie_word_embeddings"], hf_config["max_position_embeddings"] = tied, context
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
            _copy_tokenizer(tokenizer_path, tmp, template)
        if deviation is not None:
            (tmp / "tied_deviation.json").write_text(json.dumps(deviation, indent=2) + "\n")
        card = model_card(summary, fmt, model.config, deviation and format_deviation(deviation), gguf_type, out_dir)
        (tmp / "README.md").write_text(card)
        ordinary_permissions(tmp)
