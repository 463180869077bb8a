"""The real path rehearsed on CPU: every default hub source and MedGemma 4B in a hub cache laid out as
huggingface-hub writes it (tests/hub_cache.py), read offline through snapshot_download, and run.sh --size 4b end
to end on it; and each stop that rehearsal found."""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import shared_logic as sl
from engine.checkpoints import load_base, read_checkpoint
from engine.data import SOURCES, Source, load_kormedmcqa, load_reasoning, load_texts, parse_field_map
from engine.errors import MedkoError

# Under `pytest -n 2 --dist loadgroup` this file's tests share one worker and its session fixtures.
pytestmark = pytest.mark.xdist_group("hub-rehearsal")

ROOT = Path(__file__).resolve().parents[1]


def s0_options(run_dir: Path, *args: str) -> sl.StageOptions:
    return sl.parse_stage_options("s0", ["--size", "4b", "--run-dir", str(run_dir), *args], None)


def test_hub_sources_load_with_their_real_schemas(offline_hub, tmp_path):
    source, rows, _ = sl.read_sources(s0_options(tmp_path), tmp_path)
    assert source == "hub"
    assert {len(rows["exam"][s]) for s in ("train", "dev", "test")} == {12, 8}  # 4 subsets, parquet per split
    medqa = rows["en_mcq"].rows[0]
    assert medqa.answer in "ABCD" and len(medqa.options) == 4  # answer_idx, not the text
    assert len(rows["ko_text"]) == 20  # Asan-AMC-Healthinfo.jsonl: one file, no split in its name; outputs
    reasoning = list(rows["reasoning"].rows)
    assert len(reasoning) == 8 and all(r.reasoning for r in reasoning)  # thinking, by default
    dev = load_kormedmcqa(split="dev")  # the spools keep what s0 writes; the loaders give the source's other fields
    assert dev[0].meta["year"] and isinstance(dev[0].meta["q_number"], int)
    assert "response" in load_reasoning(SOURCES["reasoning"])[0].meta


def test_field_map_renames_a_source_column(offline_hub, tmp_path):
    _, rows, _ = sl.read_sources(s0_options(tmp_path, "--map", "reasoning.reasoning=response"), tmp_path)
    assert rows["reasoning"].rows[0].reasoning.startswith("정답은")
    assert parse_field_map("medqa.answer=answer_idx, ko_text.text=body") == {"medqa": {"answer": "answer_idx"},
                                                                             "ko_text": {"text": "body"}}
    for bad in ("nosuch.text=x", "reasoning.thought=x", "reasoning.reasoning"):
        with pytest.raises(MedkoError, match="--map"):
            parse_field_map(bad)


def test_a_source_with_zero_rows_names_its_file_and_columns(offline_hub, tmp_path):
    empty = tmp_path / "reasoning.jsonl"
    empty.write_text(json.dumps({"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "answer": 1,
                                 "thought": "x"}) + "\n")
    spools = tmp_path / "spools"
    spools.mkdir()
    with pytest.raises(MedkoError) as err:
        sl.read_sources(s0_options(tmp_path, "--reasoning", str(empty), "--skip-bad"), spools)
    message = str(err.value)
    assert "reasoning source" in message and str(empty) in message and "thought" in message


def test_ko_text_reads_instruction_rows(tmp_path):
    path = tmp_path / "asan.jsonl"
    path.write_text(json.dumps({"instruction": "고혈압이란?", "input": "", "output": "혈압이 높은 상태"},
                               ensure_ascii=False) + "\n")
    assert load_texts(path) == ["혈압이 높은 상태"]
    assert load_texts(Source(str(path), {"output": "instruction"})) == ["고혈압이란?"]


def test_partly_downloaded_model_names_the_missing_shard(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    from hub_cache import medgemma_4b

    cache = tmp_path / "cache"
    cache.mkdir()
    medgemma_4b(cache, drop_shard=True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(MedkoError) as err:
        load_base("4b", device="cpu")
    assert "partly downloaded" in str(err.value) and "model-00002-of-00002.safetensors" in str(err.value)
    assert "not in the local cache" not in str(err.value)


def test_medgemma_4b_layout_loads_its_text_model(offline_hub):
    model, tokenizer, path = load_base("4b", device="cpu")
    assert "models--google--medgemma-4b-it/snapshots/" in str(path)
    assert model.config.num_layers == 2 and tokenizer.bos_id == 2


def test_one_weight_under_two_key_layouts_is_refused(tiny_dir, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (model_dir / name).write_bytes((tiny_dir / name).read_bytes())
    state = load_file(str(tiny_dir / "model.safetensors"))
    norm = "model.norm.weight"
    state["language_model." + norm] = state[norm] + 1  # the same weight again, in the multimodal layout
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(MedkoError, match="holds norm.weight twice"):
        read_checkpoint(model_dir)


def test_run_sh_size_4b_end_to_end_through_the_hub_cache(rehearsed_run):
    s0 = json.loads((rehearsed_run / "s0_data" / "meta.json").read_text())
    assert s0["source"] == "hub" and s0["counts"]["reasoning.jsonl"] == 8
    s1 = json.loads((rehearsed_run / "s1_gate" / "meta.json").read_text())
    assert s1["base"]["size"] in ("4b", "27b")
    assert (rehearsed_run / "report.md").is_file() and (rehearsed_run / "test_report.json").is_file()
