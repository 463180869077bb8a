"""Export formats on the tiny model: hf is exact, tied's deviation is what its card says, gguf reads back through
medko's reader and transformers' GGUF loader, files are readable by others, and the CLI writes all three."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import randomize, tiny_config
from engine.adapters import add_language_embeddings, add_lora, duplicate_edge_layers
from engine.data import MCQ
from engine.embedded_270m import gguf_to_hf
from engine.errors import MedkoError
from engine.export import HeldOut, export_run, format_deviation, tied_deviation, twin_from_weights, tied_weights
from engine.export_gguf import gguf_vocab
from engine.model import Gemma3
from engine.model_card import RunSummary
from engine.tokenizer import chat_prompt
from test_adapters import mixed_ids, perturb, rel_err

# Under `pytest -n 2 --dist loadgroup` this file's tests share one worker and its session fixtures.
pytestmark = pytest.mark.xdist_group("real-270m")

ROOT = Path(__file__).resolve().parents[1]
KO = ["정답은 C입니다", "답은 A", "정답：B 정답은 D입니다"]
EN = ["The answer is C.", "First-line drug: A", "ECG shows ST elevation"]
EXAM = [MCQ(f"t/{i}", "doctor", f"정답은{i}", {k: f"opt{k}" for k in "ABCDE"}, "A") for i in range(6)]


def run_model(tokenizer, layers: bool = False, shared_vector: bool = False, **config) -> Gemma3:
    """The tiny model with LoRA and language vectors (and duplicated edge layers), additions perturbed."""
    torch.manual_seed(0)
    model = randomize(Gemma3(tiny_config(**config))).eval()
    add_lora(model, "lora1", rank=4, alpha=8)
    add_language_embeddings(model, tokenizer)
    if layers:
        duplicate_edge_layers(model)
    perturb([p for n, p in model.named_parameters() if "lora_B" in n or "language" in n], seed=9, scale=0.3)
    if shared_vector:
        with torch.no_grad():
            model.language_embedding.english.copy_(model.language_embedding.korean)
    return model


@pytest.fixture(autouse=True)
def usual_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(directory: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [directory, *directory.rglob("*")]}


def test_hf_export_is_exact_readable_and_carries_a_card(tiny_dir, tiny_tokenizer, tmp_path):
    from jinja2 import Template
    from transformers import Gemma3ForCausalLM

    model = run_model(tiny_tokenizer, layers=True)
    summary = RunSummary("runs/x:s5", "google/gemma-3-270m",
                         [("s5", "s5 reasoning", {"before": {"ko_accuracy": 0.25}, "after": {"ko_accuracy": 0.5},
                                                  "phases": [{"steps": 2, "patterns": ["language_embedding.*"]}]})],
                         {"source": "hub", "counts": {"exam_dev.jsonl": 24}})
    out = export_run(model, tmp_path / "hf", tiny_dir / "tokenizer.json", "hf", summary=summary)
    assert modes(out) == {("dir", 0o755), ("file", 0o644)}
    hf = Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = mixed_ids(tiny_tokenizer)
    with torch.no_grad():
        assert rel_err(hf(ids).logits, model(ids).logits) <= 1e-5
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: google/gemma-3-270m\n") and "- ko\n- en\n" in card
    assert "non-commercial" in card and "sean0042/KorMedMCQA" in card and "datasets:\n- sean0042/KorMedMCQA" in card
    assert "0.250 (6/24) [" in card and "0.500 (12/24) [" in card  # from the meta, with n and an interval
    assert f"huggingface-cli upload YOUR_NAME/hf {out} . --repo-type model" in card
    template = Template((out / "chat_template.jinja").read_text())
    rendered = template.render(messages=[{"role": "user", "content": "고혈압이란"}], bos_token="<bos>",
                               add_generation_prompt=True)
    assert rendered == "<bos>" + chat_prompt("고혈압이란")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template_source(out)
    # medko ties its head: its own loader refuses the untied export instead of dropping the head silently.
    from engine.checkpoints import read_checkpoint
    with pytest.raises(MedkoError, match="has an lm_head that differs from its embed_tokens"):
        read_checkpoint(out)


def template_source(out: Path) -> str:
    return (out / "chat_template.jinja").read_text()


def test_permissions_follow_the_umask(tiny_dir, tiny_tokenizer, tmp_path):
    os.umask(0o027)
    out = export_run(run_model(tiny_tokenizer), tmp_path / "private", tiny_dir / "tokenizer.json", "hf")
    assert modes(out) == {("dir", 0o750), ("file", 0o640)}


def test_export_keeps_the_base_models_context_length(tiny_dir, tiny_tokenizer, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer.json").write_bytes((tiny_dir / "tokenizer.json").read_bytes())
    config = json.loads((tiny_dir / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32768}))  # as the 270M's
    out = export_run(run_model(tiny_tokenizer), tmp_path / "hf", base / "tokenizer.json", "hf")
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 32768


def test_tied_export_deviation_is_measured_and_written_down(tiny_dir, tiny_tokenizer, tmp_path, capsys):
    from transformers import Gemma3ForCausalLM

    model = run_model(tiny_tokenizer, layers=True)
    held = HeldOut(KO, EN, EXAM)
    out = export_run(model, tmp_path / "tied", tiny_dir / "tokenizer.json", "tied", held_out=held)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"]
    hf = Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    # recompute the deviation independently: transformers' tied model against medko's exact run model
    kl, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for text in KO:
            ids = torch.tensor([tiny_tokenizer.encode(text)])
            p = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            q = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
            kl += float((p.exp() * (p - q)).sum())
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            n += p.shape[0]
    written = json.loads((out / "tied_deviation.json").read_text())
    assert written["ko_text"]["positions"] == n and written["ko_text"]["argmax_agreement"] == agree / n
    assert written["ko_text"]["mean_kl"] == pytest.approx(kl / n, rel=1e-4) and kl > 0  # the fold is not exact
    assert written["ko_dev_exam"]["questions"] == len(EXAM)
    text = format_deviation(written)
    assert text in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert all(f"- {line}" in card for line in text.splitlines())
    from engine.checkpoints import read_checkpoint
    assert "lm_head.weight" not in read_checkpoint(out)  # the tied export loads in medko too


def test_a_vector_shared_by_all_tokens_folds_exactly(tiny_tokenizer):
    model = run_model(tiny_tokenizer, shared_vector=True)
    twin = twin_from_weights(model, tied_weights(model))
    deviation = tied_deviation(model, twin, tiny_tokenizer, HeldOut(KO, EN, EXAM))
    for key in ("ko_text", "en_text"):
        assert deviation[key]["mean_kl"] < 1e-9 and deviation[key]["argmax_agreement"] == 1.0
    assert deviation["ko_dev_exam"]["letter_agreement"] == 1.0


# llama.cpp reads no layer types and transformers' GGUF loader no rope scaling: the GGUF model has Gemma's
# default layout.
GGUF_CONFIG = {"layer_types": (), "global_rope_scaling": 1.0}
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 3e-2, "q8_0": 3e-2}


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_reads_back_through_medko_and_transformers(tiny_dir, tiny_tokenizer, tmp_path, gguf_type):
    from transformers import Gemma3ForCausalLM

    model = run_model(tiny_tokenizer, **GGUF_CONFIG)
    out = export_run(model, tmp_path / "gguf", tiny_dir / "tokenizer.json", "gguf", gguf_type)
    name = f"model-{gguf_type}.gguf"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "chat_template.jinja", name]
    assert (out / "Modelfile").read_text().startswith(f"FROM ./{name}\n")
    ids = mixed_ids(tiny_tokenizer)
    with torch.no_grad():
        want = model(ids).logits
        # medko's reader gives an HF directory; medko's own loader assumes a tied head, so transformers reads it
        gguf_to_hf(out / name, tmp_path / "back")
        back = Gemma3ForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32,
                                                 attn_implementation="eager").eval()
        assert rel_err(back(ids).logits, want) <= TOLERANCE[gguf_type]
        # transformers' GGUF loader takes query_pre_attn_scalar from its default (256, the 270M's and 4B's head
        # size), not from the head size as llama.cpp does; the tiny model's heads are 16 wide
        hf = Gemma3ForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32, query_pre_attn_scalar=16,
                                               attn_implementation="eager").eval()
        assert rel_err(hf(ids).logits, want) <= TOLERANCE[gguf_type]
    assert modes(out) == {("dir", 0o755), ("file", 0o644)}


def test_gguf_vocabulary_and_tokenizer_read_back(tiny_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    out = export_run(run_model(tiny_tokenizer, **GGUF_CONFIG), tmp_path / "gguf", tiny_dir / "tokenizer.json", "gguf")
    tokens, scores, types = gguf_vocab(tiny_dir / "tokenizer.json", 512)
    assert tokens[:6] == ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"] and types[:6] == [3] * 6
    assert tokens[-1] == "[PAD511]" and types[-1] == 5  # embedding rows past the vocabulary
    normal = [s for s, t in zip(scores, types) if t == 1]
    assert normal == sorted(normal, reverse=True)  # merge priority follows the file order
    gguf_to_hf(out / "model-f32.gguf", tmp_path / "back")
    from engine.tokenizer import Tokenizer

    back = Tokenizer(tmp_path / "back" / "tokenizer.json")
    hf_tok = AutoTokenizer.from_pretrained(out, gguf_file="model-f32.gguf")
    for text in ["정답은 C입니다", "Hello world", "<start_of_turn>user\nA<end_of_turn>\n"]:
        assert back.encode(text) == tiny_tokenizer.encode(text)
        assert hf_tok(text)["input_ids"] == tiny_tokenizer.encode(text)
    config = json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (out / "chat_template.jinja").read_text()


def test_gguf_refuses_what_llama_cpp_would_misread(tiny_dir, tiny_tokenizer, tmp_path):
    with pytest.raises(MedkoError, match="full-attention layers are .* every sixth layer"):
        export_run(run_model(tiny_tokenizer, layers=True), tmp_path / "g", tiny_dir / "tokenizer.json", "gguf")
    assert not (tmp_path / "g").exists()


def test_llama_cpp_problems_follow_its_loader():
    from dataclasses import replace

    from engine.export_gguf import llama_cpp_problems
    from engine.model import PRESETS

    assert all(not llama_cpp_problems(PRESETS[size]) for size in ("270m", "4b", "27b"))
    # two duplicated layers: the full-attention layers move, and a 64-layer 27B loses llama.cpp's 27B scale
    grown = replace(PRESETS["27b"], num_layers=64, layer_types=("sliding_attention", *PRESETS["27b"].layer_types,
                                                                "full_attention"))
    problems = llama_cpp_problems(grown)
    assert len(problems) == 2 and "query_pre_attn_scalar is 168" in problems[1]


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory) -> Path:
    """s0, s1 (gate passed) and s2 on the tiny model in Gemma's default layout (so llama.cpp reads it too):
    language vectors trained, so the head is untied."""
    sys.path.insert(0, str(ROOT / "stages"))
    import importlib

    import shutil

    base = tmp_path_factory.mktemp("base") / "model"
    shutil.copytree(tiny_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "layer_types": None, "rope_scaling": None}))
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    common = ["--model", str(base), "--run-dir", str(run_dir), "--max-steps", "1", "--max-len", "256"]
    for script, extra in (("s0_data", []), ("s1_gate", ["--gate", "0.0"]),
                          ("s2_embed", ["--gate", "0.0"])):
        assert importlib.import_module(script).main([*common, *extra]) == 0
    return run_dir


def test_cli_exports_every_format(tiny_run, tmp_path, capsys):
    import medko

    for fmt in ("hf", "tied"):
        assert medko.main(["export", str(tiny_run / "s2_embed"), "--out", str(tmp_path / fmt), "--format", fmt]) == 0
    assert "Korean dev exam: letter-prediction agreement" in capsys.readouterr().out
    card = (tmp_path / "tied" / "README.md").read_text()
    assert "s2 embed" in card and "language_embedding" in card and "Deviation of the tied fold" in card
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "medko.py", "export", str(tiny_run / "s2_embed"), "--out", str(tmp_path / "gguf"),
           "--format", "gguf", "--gguf-type", "q8_0"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "gguf" / "model-q8_0.gguf").is_file() and (tmp_path / "gguf" / "Modelfile").is_file()


@pytest.mark.slow
def test_270m_gguf_matches_llama_cpps_own_conversion(converted_270m, gguf_270m, tmp_path):
    """The base 270M exported as GGUF against the package's GGUF (written by llama.cpp's converter): the same
    gemma3 keys and values, tensor names, tokens and token types; scores in the same order."""
    import gguf
    import numpy as np

    from engine.checkpoints import load_model

    # f16: this compares names, metadata and vocabulary, not values (q8_0's values are tested on the tiny model)
    out = export_run(load_model(converted_270m), tmp_path / "gguf", converted_270m / "tokenizer.json", "gguf", "f16")
    ref, new = gguf.GGUFReader(gguf_270m), gguf.GGUFReader(out / "model-f16.gguf")
    for key in [k for k in ref.fields if k.startswith("gemma3.") or k.startswith("tokenizer.")]:
        if key != "tokenizer.ggml.scores":
            assert new.fields[key].contents() == ref.fields[key].contents(), key
    assert sorted(t.name for t in new.tensors) == sorted(t.name for t in ref.tensors)
    a, b = (np.array(r.fields["tokenizer.ggml.scores"].contents()) for r in (ref, new))
    normal = np.array(ref.fields["tokenizer.ggml.token_type"].contents()) == 1
    assert (a[~normal] == b[~normal]).all()
    assert (np.argsort(-a[normal], kind="stable") == np.argsort(-b[normal], kind="stable")).all()


def test_export_onto_a_full_disk_is_one_sentence(tiny_run, tmp_path, capsys, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    import medko
    import safetensors.torch

    out = tmp_path / "full" / "hf"
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 4096, 4096))
    assert medko.main(["export", str(tiny_run / "s2_embed"), "--out", str(out)]) == 1
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"medko: {out.parent} has 4,096 bytes free but the export needs about ")
    assert line.endswith("; free space on that disk or export to another --out (nothing was left behind)")
    assert not out.exists() and not list(out.parent.iterdir())

    # The check passed but the disk filled while writing: safetensors' own error, named the same way.
    monkeypatch.setattr(shutil, "disk_usage", real)

    def fills(*args, **kwargs):
        raise safetensors.SafetensorError(f"Error while serializing: {OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))}")

    monkeypatch.setattr(safetensors.torch, "save_file", fills)
    assert medko.main(["export", str(tiny_run / "s2_embed"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"medko: {out.parent} has ")
    assert "bytes free but the export needs about" in err and not list(out.parent.iterdir())
