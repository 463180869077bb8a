"""GGUF -> HF conversion of the embedded 270m default: names, norms, tokenizer, cache."""
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine.linear
from engine.checkpoints import load_model
from engine.data import load_texts
from engine.errors import MedkoError
from engine.embedded_270m import HF_FILES, default_270m_dir, ensure_converted, gguf_name_to_hf, gguf_to_hf, gguf_tokenizer, manifest_problem, write_gguf_safetensors
from engine.generate import generate_ids
from engine.model import PRESETS
from engine.tokenizer import Tokenizer

# Under `pytest -n 2 --dist loadgroup` this file's tests share one worker and its session fixtures.
pytestmark = pytest.mark.xdist_group("real-270m")



HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 64, 128, 2, 1, 32, 2

# (token, llama.cpp type): 1 normal, 3 control, 4 user-defined, 6 byte
TINY_VOCAB = (
    [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<mask>", 3), ("[multimodal]", 4)]
    + [("<start_of_turn>", 3), ("<end_of_turn>", 3), ("\n", 4), ("\n\n", 4), ("  ", 4), ("   ", 4)]
    + [(f"<0x{b:02X}>", 6) for b in range(256)]
    + [(t, 1) for t in ["▁", "h", "e", "l", "o", "w", "r", "d", "안", "녕", "ll", "he", "▁w", "llo", "hello"]]
    + [(t, 1) for t in ["▁hello", "or", "▁wor", "ld", "▁world", "안녕", "▁안녕"]]
)

TRICKY = [
    "",
    "Hello, world!",
    "  leading spaces and trailing   ",
    "multiple    spaces  between\twords\t\ttabs",
    "line1\nline2\n\n\nline5\r\nwindows",
    "환자는 급성 심근경색으로 응급실에 내원하였다.",
    "당뇨병 환자의 HbA1c 목표치는 7% 미만이다. 다음 중 옳은 것은? ① 아스피린 ② 헤파린",
    "MRI 검사에서 T2 강조영상 hyperintensity 소견, 혈압 140/90 mmHg, 맥박 88회/분",
    "1234567890 3.14159 1,000,000 2024-05-01 0.5mg",
    "<start_of_turn>user\n질문입니다<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos><pad> <unk><mask><unused0>[multimodal]<start_of_image>",
    "😀👍🏽🇰🇷 rare CJK 𠀀𪚥龘 zero\u200bwidth ﬁ é e\u0301",
    "▁ literal block, <table><tr><td>x</td></tr></table>",
    "def f(x):\n    return x**2  # comment\n",
]


def write_tiny_gguf(path: Path, extra: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """A 2-layer Gemma 3 GGUF in llama.cpp's conventions; returns the HF-convention weights."""
    rng = np.random.default_rng(0)
    shapes = {
        "attn_q": (HEADS * HEAD_DIM, HIDDEN),
        "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_output": (HIDDEN, HEADS * HEAD_DIM),
        "attn_q_norm": (HEAD_DIM,),
        "attn_k_norm": (HEAD_DIM,),
        "attn_norm": (HIDDEN,),
        "post_attention_norm": (HIDDEN,),
        "ffn_norm": (HIDDEN,),
        "post_ffw_norm": (HIDDEN,),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }
    tensors = {"token_embd.weight": (len(TINY_VOCAB), HIDDEN), "output_norm.weight": (HIDDEN,)}
    tensors |= {f"blk.{i}.{name}.weight": shape for i in range(LAYERS) for name, shape in shapes.items()}
    tensors |= {name: (HIDDEN,) for name in extra}
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_block_count(LAYERS)
    writer.add_context_length(1024)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([t for t, _ in TINY_VOCAB])
    writer.add_token_scores([0.0 if kind != 1 else -float(i) for i, (_, kind) in enumerate(TINY_VOCAB)])
    writer.add_token_types([kind for _, kind in TINY_VOCAB])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    hf = {}
    for name, shape in tensors.items():
        if name in drop:
            continue
        weight = rng.normal(0, 0.3, shape).astype(np.float32)
        if name.endswith("norm.weight"):
            writer.add_tensor(name, weight + 1)  # llama.cpp's 1 + w
        elif name == "blk.0.attn_q.weight":
            # one quantized tensor, so the block layout is exercised too
            packed = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            weight = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, weight)
        if name not in extra:
            hf[gguf_name_to_hf(name)] = weight
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_gguf(path)


# ---------------------------------------------------------------- fast: tiny GGUF


def test_name_mapping():
    assert gguf_name_to_hf("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_name_to_hf("output_norm.weight") == "model.norm.weight"
    assert gguf_name_to_hf("blk.11.attn_output.weight") == "model.layers.11.self_attn.o_proj.weight"
    assert gguf_name_to_hf("blk.0.ffn_norm.weight") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert gguf_name_to_hf("blk.3.post_ffw_norm.weight") == "model.layers.3.post_feedforward_layernorm.weight"
    for name in ["blk.0.attn_qkv.weight", "rope_freqs.weight", "blk.x.attn_q.weight", "blk.0.attn_q.bias"]:
        with pytest.raises(MedkoError, match=name.replace(".", r"\.")):
            gguf_name_to_hf(name)


def test_tiny_conversion_undoes_llama_cpp_conventions(tiny_gguf, tmp_path):
    path, expected = tiny_gguf
    out = tmp_path / "hf"
    gguf_to_hf(path, out)
    state = load_file(out / "model.safetensors")
    assert state.keys() == expected.keys()
    for name, weight in expected.items():
        assert state[name].dtype == torch.float32
        assert tuple(state[name].shape) == weight.shape, name
        # norms come back as w (stored 1 + w); everything else unchanged, in torch layout
        torch.testing.assert_close(state[name], torch.from_numpy(weight), rtol=0, atol=1e-6, msg=name)
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (HEADS * HEAD_DIM, HIDDEN)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert config["vocab_size"] == len(TINY_VOCAB) and config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 1e6 and config["rope_local_base_freq"] == 1e4
    assert config["query_pre_attn_scalar"] == HEAD_DIM and config["sliding_window"] == 16
    assert config["layer_types"] == ["sliding_attention", "sliding_attention"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is True and tok_config["bos_token"] == "<bos>"


def test_chunked_dequantization_is_identical(tiny_gguf, tmp_path):
    reader = gguf.GGUFReader(tiny_gguf[0])
    write_gguf_safetensors(reader, tmp_path / "whole.safetensors")
    write_gguf_safetensors(reader, tmp_path / "chunked.safetensors", rows_per_chunk=3)
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "chunked.safetensors").read_bytes()


def test_unknown_or_missing_tensor_is_an_error(tmp_path):
    write_tiny_gguf(tmp_path / "extra.gguf", extra=("blk.0.attn_sinks.weight",))
    with pytest.raises(MedkoError, match=r"blk\.0\.attn_sinks\.weight"):
        gguf_to_hf(tmp_path / "extra.gguf", tmp_path / "a")
    write_tiny_gguf(tmp_path / "short.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(MedkoError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        gguf_to_hf(tmp_path / "short.gguf", tmp_path / "b")


def test_tiny_tokenizer(tiny_gguf, tmp_path):
    tok = gguf_tokenizer(gguf.GGUFReader(tiny_gguf[0]))
    vocab = {t: i for i, (t, _) in enumerate(TINY_VOCAB)}
    assert tok.encode("hello world").ids == [vocab["<bos>"], vocab["hello"], vocab["▁world"]]
    assert tok.encode("hello", add_special_tokens=False).ids == [vocab["hello"]]
    turn = tok.encode("<start_of_turn>안녕\n\n<end_of_turn>", add_special_tokens=False)
    assert turn.ids == [vocab["<start_of_turn>"], vocab["안녕"], vocab["\n\n"], vocab["<end_of_turn>"]]
    assert tok.encode("   ", add_special_tokens=False).ids == [vocab["   "]]  # llama.cpp spelled it "   "
    smile = tok.encode("😀", add_special_tokens=False).ids
    assert smile == [vocab[f"<0x{b:02X}>"] for b in "😀".encode()]
    for text in ["hello  world\n\n안녕 😀 xyz", "<bos>he<eos>"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_tiny_matches_transformers_gguf_loader(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = tiny_gguf
    gguf_to_hf(path, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state = load_file(tmp_path / "hf" / "model.safetensors")
    assert state.keys() == ref.keys()
    for name, weight in ref.items():
        torch.testing.assert_close(state[name], weight, rtol=0, atol=1e-6, msg=name)
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = HFTokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    for text in TRICKY:
        assert tok.encode(text).ids == hf_tok(text).input_ids, text


def test_default_dir_follows_medko_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDKO_CACHE", str(tmp_path))
    assert default_270m_dir() == tmp_path / "gemma3-270m"
    monkeypatch.delenv("MEDKO_CACHE")
    assert default_270m_dir() == Path.home() / ".cache" / "medko" / "gemma3-270m"


def test_cache_is_built_once_and_rebuilt_when_damaged(tmp_path, caplog):
    builds = []

    def write_gguf(path: Path) -> None:
        builds.append(path)
        write_tiny_gguf(path)

    target = tmp_path / "cache" / "tiny"
    assert ensure_converted(target, write_gguf, "tiny") == target
    assert sorted(p.name for p in target.iterdir()) == sorted([*HF_FILES, "manifest.json"])
    assert [p.name for p in target.parent.iterdir()] == ["tiny"]  # work dir and GGUF are gone
    ensure_converted(target, write_gguf, "tiny")
    assert len(builds) == 1
    good = (target / "model.safetensors").read_bytes()

    def damage_and_rebuild(damage, reason: str) -> None:
        damage()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="medko"):
            ensure_converted(target, write_gguf, "tiny")
        assert reason in caplog.text
        assert (target / "model.safetensors").read_bytes() == good
        assert manifest_problem(target, "tiny", full_hash=True) is None

    weights = target / "model.safetensors"
    damage_and_rebuild(lambda: os.truncate(weights, weights.stat().st_size // 2), "bytes, the manifest says")

    damage_and_rebuild(lambda: flip_byte(weights, 1000), "does not match its sha256")
    damage_and_rebuild(lambda: (target / "manifest.json").write_text('{"files": '), "unreadable manifest")
    damage_and_rebuild(lambda: (target / "tokenizer.json").unlink(), "tokenizer.json is missing")
    assert len(builds) == 5
    assert manifest_problem(target, "another source") is not None

    # a flipped byte with the mtime put back (bit rot) passes the quick check, not the full one
    stat = weights.stat()
    flip_byte(weights, 1000)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert manifest_problem(target, "tiny") is None
    assert "sha256" in manifest_problem(target, "tiny", full_hash=True)


# ---------------------------------------------------------------- slow: the real 270m


@pytest.mark.slow
def test_270m_tokenizer_matches_transformers_gguf_tokenizer(converted_270m, gguf_270m):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(gguf_270m.parent, gguf_file=gguf_270m.name)
    tok = HFTokenizer.from_file(str(converted_270m / "tokenizer.json"))
    ours, theirs = json.loads(tok.to_str()), json.loads(hf.backend_tokenizer.to_str())
    assert ours["model"]["vocab"] == theirs["model"]["vocab"]
    assert ours["model"]["merges"] == theirs["model"]["merges"]
    assert ours["added_tokens"] == theirs["added_tokens"]
    for part in ["normalizer", "decoder", "post_processor"]:
        assert ours[part] == theirs[part], part
    for text in TRICKY:
        ids = tok.encode(text).ids
        assert ids == hf(text).input_ids, text
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
        # Gemma spells a space "▁", so a literal "▁" comes back as a space (transformers alike)
        restored = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
        assert restored == text.replace("▁", " "), text
    specials = tok.encode("<start_of_turn><end_of_turn><bos><eos><pad>", add_special_tokens=False)
    assert specials.ids == [105, 106, 2, 1, 0]


@pytest.mark.slow
def test_270m_damaged_cache_is_detected(converted_270m, tmp_path):
    """The rebuild itself is tested on the tiny model; here the checks must see damage at 1 GB."""
    source = json.loads((converted_270m / "manifest.json").read_text())["source"]
    clone = tmp_path / "gemma3-270m"
    # plain copies carry new mtimes, so every file gets hashed
    shutil.copytree(converted_270m, clone, copy_function=shutil.copyfile)
    assert manifest_problem(clone, source) is None
    weights = clone / "model.safetensors"
    flip_byte(weights, weights.stat().st_size // 2)
    assert "sha256" in manifest_problem(clone, source)
    os.truncate(weights, weights.stat().st_size - 4096)
    assert "bytes, the manifest says" in manifest_problem(clone, source)


def mixed_long_prompt(min_tokens: int, tokenizer: Tokenizer) -> str:
    """Korean and English medical passages from the bundled data, alternated past min_tokens."""
    root = Path(__file__).resolve().parents[1] / "data"
    ko = [t for t in load_texts(root / "ko_medical_text.jsonl")]
    en = [t for t in load_texts(root / "en_medical_text.jsonl")]
    parts: list[str] = []
    for k, e in zip(ko, en):
        parts += [k, e]
        if len(tokenizer.encode("\n".join(parts))) > min_tokens:
            break
    return "\n".join(parts) + "\n요약하면,"


@pytest.mark.slow
def test_270m_weights_and_greedy_continuations_match_transformers(converted_270m, gguf_270m):
    """The conversion against transformers' own GGUF loader (weights bit for bit, and our config.json describes the
    same model), then medko's greedy decoding (KV cache, sliding window) against transformers' on the real 270M.
    One test, because transformers' dequantisation of the GGUF is most of its cost."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(gguf_270m.parent, gguf_file=gguf_270m.name, dtype=torch.float32)
    ref = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    with safe_open(converted_270m / "model.safetensors", "pt") as f:
        assert set(f.keys()) == ref.keys()
        for name, weight in ref.items():
            torch.testing.assert_close(f.get_tensor(name), weight, rtol=0, atol=1e-6, msg=name)
    assert ref["model.embed_tokens.weight"].shape == (262144, 640)
    del ref

    tokenizer = Tokenizer(converted_270m / "tokenizer.json")
    prompts = ["The first-line treatment for uncomplicated hypertension in adults is",
               "당뇨병 환자에서 저혈당이 생기면 가장 먼저 해야 할 처치는",
               mixed_long_prompt(600, tokenizer)]
    rows = [tokenizer.encode(p) for p in prompts]
    assert len(rows[2]) > 600 > PRESETS["270m"].sliding_window
    theirs = []
    ids = torch.randint(0, 262144, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        for row in rows:
            out = hf.generate(torch.tensor([row]), max_new_tokens=24, do_sample=False,
                              eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
            tokens = [t for t in out[0, len(row):].tolist() if t != tokenizer.pad_id]
            theirs.append(tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_id else tokens)
    del hf  # one 1 GB model in memory at a time

    # our config.json describes the same model: same logits from the converted directory
    ours = AutoModelForCausalLM.from_pretrained(converted_270m, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, rtol=0, atol=1e-4)
    del ours

    model = load_model(converted_270m)
    # Two at a time: the third row joins the batch when one of the first two finishes.
    # With prompt-lookup drafts (the default): the long prompt's repeated phrases are drafted, so fewer forward
    # passes than tokens, and the tokens are still transformers' one-at-a-time greedy ones.
    passes = [0]
    model.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    mine = generate_ids(model, rows, 24, {tokenizer.eos_id}, tokenizer.pad_id, tokenizer.vocab_size, batch_size=2)
    assert passes[0] < sum(map(len, mine)), passes
    for row, a, b in zip(rows, mine, theirs):
        assert a == b, (tokenizer.decode(a), tokenizer.decode(b))
        logging.getLogger("medko").info("greedy %d-token prompt -> %r", len(row), tokenizer.decode(a))


@pytest.mark.slow
def test_270m_logits_match_transformers_with_and_without_onednn(converted_270m, monkeypatch):
    """Full-sequence logits past the sliding window: oneDNN's matmul (the CPU default) and F.linear's."""
    from transformers import AutoModelForCausalLM

    tokenizer = Tokenizer(converted_270m / "tokenizer.json")
    ids = torch.tensor([tokenizer.encode(mixed_long_prompt(600, tokenizer))])
    model = load_model(converted_270m)
    hf = AutoModelForCausalLM.from_pretrained(converted_270m, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        theirs = hf(ids, use_cache=False).logits
        errors = {}
        for onednn in (True, False):
            monkeypatch.setattr(engine.linear, "_ONEDNN_LINEAR", onednn)
            mine = model(ids).logits
            errors[onednn] = ((mine - theirs).abs().max() / theirs.abs().max()).item()
            assert torch.equal(mine.argmax(-1), theirs.argmax(-1))
    assert errors[True] <= 1e-4 and errors[False] <= 1e-6, errors
    logging.getLogger("medko").info("270m logits vs transformers over %d tokens: %s", ids.shape[1], errors)

