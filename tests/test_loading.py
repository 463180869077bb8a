"""Checkpoint loading: key-name variants, skipped vision keys, strictness, shards, hub errors."""
import json
from pathlib import Path

import httpx2
import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoints import load_model, resolve_model_dir
from engine.errors import MedkoError
from engine.generate import generate, generate_ids
from engine.model import PRESETS, config_from_hf, config_to_hf
from conftest import make_tiny_checkpoint, tiny_tokenizer_json


def rewrite(src: Path, dst: Path, rename, extra: dict | None = None, config=None) -> Path:
    """A copy of the tiny checkpoint with renamed keys (and extra tensors) in `dst`."""
    from safetensors.torch import load_file

    dst.mkdir(parents=True)
    state = {rename(k): v for k, v in load_file(str(src / "model.safetensors")).items()}
    state.update(extra or {})
    save_file(state, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    tiny_tokenizer_json(dst / "tokenizer.json")
    return dst


def reference_logits(tiny_dir: Path) -> torch.Tensor:
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        return load_model(tiny_dir)(ids).logits


VARIANTS = {
    "text": lambda k: k,
    "multimodal_v4": lambda k: "language_model." + k,  # language_model.model.layers.N
    "multimodal_v5": lambda k: k.replace("model.", "model.language_model.", 1),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_key_name_variants_load_to_the_same_model(tiny_dir, tmp_path, variant):
    from safetensors.torch import load_file

    embed = load_file(str(tiny_dir / "model.safetensors"))["model.embed_tokens.weight"]
    vision = {"vision_tower.vision_model.embeddings.patch_embedding.weight": torch.zeros(2, 2),
              "multi_modal_projector.mm_input_projection_weight": torch.zeros(2),
              "lm_head.weight": embed.clone()}  # a tied head saved beside its embedding is the same weight
    nest = (lambda c: {"text_config": c, "model_type": "gemma3"}) if variant != "text" else None
    path = rewrite(tiny_dir, tmp_path / variant, VARIANTS[variant], vision, nest)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(load_model(path)(ids).logits, reference_logits(tiny_dir))
    # A head that differs from the embedding would be dropped by medko's tied model: refused by name.
    untied = rewrite(tiny_dir, tmp_path / f"{variant}_untied", VARIANTS[variant],
                     {**vision, "lm_head.weight": embed * 2}, nest)
    with pytest.raises(MedkoError, match="has an lm_head that differs from its embed_tokens"):
        load_model(untied)


def test_unexpected_key_is_refused_by_name(tiny_dir, tmp_path):
    path = rewrite(tiny_dir, tmp_path / "bad", lambda k: k, {"model.layers.0.mystery.weight": torch.zeros(2)})
    with pytest.raises(MedkoError, match=r"unexpected keys \['layers.0.mystery.weight'\]"):
        load_model(path)


def test_missing_key_is_refused_by_name(tiny_dir, tmp_path):
    path = tmp_path / "missing"
    rewrite(tiny_dir, path, lambda k: k)
    from safetensors.torch import load_file
    state = load_file(str(path / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(MedkoError, match=r"missing keys \['norm.weight'\]"):
        load_model(path)


def test_sharded_checkpoint_with_index(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "sharded"
    path.mkdir()
    state = load_file(str(tiny_dir / "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(path / file))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for name in ("config.json", "tokenizer.json"):
        (path / name).write_text((tiny_dir / name).read_text())
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(load_model(path)(ids).logits, reference_logits(tiny_dir))
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MedkoError, match="model-00002-of-00002.safetensors.*missing"):
        load_model(path)


def test_truncated_shard_is_refused(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "trunc")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MedkoError, match=r"model.safetensors is corrupt or truncated"):
        load_model(path)


def test_embedding_rows_beyond_the_tokenizer_are_never_generated(tmp_path, tiny_tokenizer):
    path = make_tiny_checkpoint(tmp_path / "rows")
    model = load_model(path)
    assert model.config.vocab_size > tiny_tokenizer.vocab_size
    with torch.no_grad():  # make the padding rows the most likely next token everywhere
        model.embed_tokens.weight[tiny_tokenizer.vocab_size:] *= 1000
    out = generate_ids(model, [tiny_tokenizer.encode("abc")], 10, set(), tiny_tokenizer.pad_id,
                          tiny_tokenizer.vocab_size)
    assert out[0] and max(out[0]) < tiny_tokenizer.vocab_size


def test_nested_multimodal_config_and_rope_parameters():
    nested = {"model_type": "gemma3", "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 1024,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "vocab_size": 262208}}
    assert config_from_hf(nested) == PRESETS["4b"]
    v5 = {**nested["text_config"], "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    del v5["rope_scaling"]
    assert config_from_hf(v5) == PRESETS["4b"]
    with pytest.raises(MedkoError, match="linear"):
        config_from_hf({**nested["text_config"], "rope_scaling": {"rope_type": "yarn", "factor": 2}})


def _http_error(cls):
    response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co"))
    return cls("denied", response=response)


@pytest.mark.parametrize("error, sentence", [
    ("gated", "is gated: accept its terms"),
    ("missing", "was not found or needs a token"),
    ("offline", "is not in the local cache"),
])
def test_hub_failures_end_in_one_sentence(monkeypatch, error, sentence):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    raised = {"gated": lambda: _http_error(GatedRepoError), "missing": lambda: _http_error(RepositoryNotFoundError),
              "offline": lambda: LocalEntryNotFoundError("offline")}[error]

    def fake(*args, **kwargs):
        assert "config.json" in kwargs["allow_patterns"] and "*.safetensors" in kwargs["allow_patterns"]
        raise raised()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(MedkoError, match=sentence) as info:
        resolve_model_dir("27b")
    assert "google/medgemma-27b-text-it" in str(info.value) and "\n" not in str(info.value)


def test_cli_reports_errors_in_one_line(capsys):
    import medko

    assert medko.main(["generate", "--model", "/no/such/dir", "--prompt", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["medko: --model /no/such/dir is not a directory; give a local HF-layout checkpoint"]


def test_cli_generate_prints_only_the_continuation(tiny_dir, tiny_tokenizer, capsys):
    import medko

    model = load_model(tiny_dir)
    expected = generate(model, tiny_tokenizer, ["abc"], max_new_tokens=5)[0]
    assert medko.main(["generate", "--model", str(tiny_dir), "--prompt", "abc", "--max-new-tokens", "5",
                       "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_quantize_on_cpu_says_it_needs_a_gpu(tiny_dir, capsys):
    import medko

    assert medko.main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--device", "cpu",
                       "--quantize", "4bit"]) == 1
    assert "4-bit base weights need a CUDA GPU; drop --quantize" in capsys.readouterr().err


@pytest.mark.parametrize("change, sentence", [
    (lambda cfg: "{not json", "is not valid JSON (Expecting property name enclosed in double quotes"),
    (lambda cfg: {k: v for k, v in cfg.items() if k != "hidden_size"}, "lacks ['hidden_size']"),
    (lambda cfg: {k: v for k, v in cfg.items() if k != "num_hidden_layers"}, "lacks ['num_hidden_layers']"),
    (lambda cfg: {**cfg, "hidden_size": "64"}, "hidden_size is '64'; it must be a positive integer"),
])
def test_a_bad_config_names_its_field_in_one_line(tiny_dir, tmp_path, change, sentence):
    import subprocess
    import sys

    model_dir = rewrite(tiny_dir, tmp_path / "model", lambda k: k)
    changed = change(json.loads((model_dir / "config.json").read_text()))
    (model_dir / "config.json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    out = subprocess.run([sys.executable, "medko.py", "generate", "--model", str(model_dir), "--prompt", "x"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1].startswith(f"medko: {model_dir / 'config.json'}")
    assert sentence in out.stderr.splitlines()[-1]


def test_defaults_taken_for_a_sparse_config_are_logged_by_name(caplog):
    sparse = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34}
    with caplog.at_level("INFO", logger="medko"):
        config = config_from_hf(sparse, "sparse/config.json")
    assert config.sliding_window == 4096 and config.head_dim == 256 and config.global_rope_theta == 1e6
    logged = caplog.text
    for field in ("sliding_window=4096", "head_dim=256", "rope_theta=1000000.0", "rope_local_base_freq=10000.0",
                  "vocab_size=262208", "layer_types"):
        assert field in logged, field
    caplog.clear()
    with caplog.at_level("INFO", logger="medko"):
        config_from_hf(json.loads(json.dumps(config_to_hf(PRESETS["tiny"]))))
    assert "leaves out" not in caplog.text
