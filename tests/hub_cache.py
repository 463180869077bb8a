"""A Hugging Face hub cache laid out as huggingface-hub writes it, for every default source and MedGemma 4B.

`build_hub_cache(root)` writes, under root, what `snapshot_download` finds offline: per repository
`{datasets,models}--OWNER--NAME/refs/main` (the commit), `snapshots/COMMIT/...` (links into `blobs/`) and the
cached tree listing `trees/COMMIT.json` (huggingface-hub >= 1.x checks a snapshot against it). File names and
column types follow the real repositories; the rows come from the bundled sample data, and the model is the
tiny random Gemma 3 in MedGemma 4B's multimodal layout. Point HF_HUB_CACHE at root and set HF_HUB_OFFLINE=1.

`build_hub_cache(root, volume=1.0)` writes every source at its real row count times `volume` (REAL_ROWS), each row
a sample row grown to a realistic length (REAL_CHARS) and made unique by its number, so that reading, overlap
detection, held-out sets, translation bookkeeping and the report meet real volumes (bench/volumes.py); the default
stays small for the tests.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SUBSETS = ("doctor", "nurse", "pharm", "dentist")
REPO_ROWS = {"train": 3, "dev": 2, "test": 2, "fewshot": 3}  # rows per subset and split, kept small for speed
# Real row counts: KorMedMCQA per split over its four subsets (fewshot stays 5 a subset), MedQA's train and test,
# Asan-AMC-Healthinfo, and the reasoning set (about one row per train question; its size is not verified).
REAL_ROWS = {"train": 3400, "dev": 1060, "test": 3009, "medqa_train": 10178, "medqa_test": 1273, "asan": 19200,
             "reasoning": 3400}
REAL_CHARS = {"question": 160, "option": 12, "medqa": 750, "asan": 1200, "reasoning": 900}  # typical lengths


def _grow(text: str, chars: int, i: int) -> str:
    """`text` repeated to about `chars` characters, numbered so that no two grown rows are alike."""
    body = (text + " ") * (chars // max(1, len(text)) + 1)
    return f"{i}. {body[:chars].strip()}"


def _count(real: int, volume: float | None, small: int) -> int:
    return small if volume is None else max(1, round(real * volume))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Repo:
    """One cached repository: files are written as blobs and linked from the snapshot, as the hub library does."""

    def __init__(self, cache: Path, kind: str, repo_id: str):
        self.folder = cache / f"{kind}s--{repo_id.replace('/', '--')}"
        self.commit = hashlib.sha1(repo_id.encode()).hexdigest()
        self.snapshot = self.folder / "snapshots" / self.commit
        self.listing: dict[str, dict] = {}
        (self.folder / "refs").mkdir(parents=True, exist_ok=True)
        (self.folder / "refs" / "main").write_text(self.commit)
        (self.folder / "blobs").mkdir(exist_ok=True)

    def add(self, name: str, data: bytes, listed_only: bool = False) -> None:
        """A file of the repository; listed_only keeps it in the tree listing but not on disk (not downloaded)."""
        blob_id = hashlib.sha1(data).hexdigest()
        self.listing[name] = {"size": len(data), "blob_id": blob_id}
        if listed_only:
            return
        blob = self.folder / "blobs" / blob_id
        blob.write_bytes(data)
        link = self.snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))

    def close(self) -> None:
        trees = self.folder / "trees"
        trees.mkdir(exist_ok=True)
        (trees / f"{self.commit}.json").write_text(json.dumps({"format_version": 1, "files": self.listing}))


def _parquet(rows: list[dict], schema) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue()


def _jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def kormedmcqa(cache: Path, volume: float | None = None) -> None:
    """sean0042/KorMedMCQA: {subset}/{split}-00000-of-00001-<hex>.parquet, int64 answer and exam sitting, cot
    empty except in fewshot; the legacy data/*.csv beside it."""
    import pyarrow as pa

    repo = Repo(cache, "dataset", "sean0042/KorMedMCQA")
    schema = pa.schema([("subject", pa.string()), ("year", pa.int64()), ("period", pa.int64()),
                        ("q_number", pa.int64()), ("question", pa.string()), *[(c, pa.string()) for c in "ABCDE"],
                        ("answer", pa.int64()), ("cot", pa.string())])
    for subset in SUBSETS:
        for split, n in REPO_ROWS.items():
            sample = _jsonl(DATA / "kormedmcqa" / subset / f"{split}.jsonl")
            if volume is not None and split != "fewshot":
                count = _count(REAL_ROWS[split] / len(SUBSETS), volume, n)
                sample = [{**r, "q_number": i + 1, "question": _grow(r["question"], REAL_CHARS["question"], i),
                           **{c: _grow(r[c], REAL_CHARS["option"], i) for c in "ABCDE"}}
                          for i, r in ((i, sample[i % len(sample)]) for i in range(count))]
            rows = []
            for i, r in enumerate(sample[:n] if volume is None or split == "fewshot" else sample):
                rows.append({"subject": subset, "year": r.get("year", 2020), "period": r.get("period", 1),
                             "q_number": r.get("q_number", i + 1), "question": r["question"],
                             **{c: r[c] for c in "ABCDE"}, "answer": int(r["answer"]),
                             "cot": (r.get("cot") or "풀이를 생각해 본다.") if split == "fewshot" else ""})
            tag = hashlib.sha1(f"{subset}{split}".encode()).hexdigest()[:8]
            repo.add(f"{subset}/{split}-00000-of-00001-{tag}.parquet", _parquet(rows, schema))
        repo.add(f"data/{subset}-train.csv", b"question,A,B,C,D,E,answer\nlegacy,a,b,c,d,e,1\n")
    repo.add("README.md", b"---\nlicense: cc-by-nc-2.0\n---\n")
    repo.close()


def medqa(cache: Path, volume: float | None = None) -> None:
    """GBaker/MedQA-USMLE-4-options: phrases_no_exclude_{train,test}.jsonl, options a dict, answer the text and
    answer_idx the letter."""
    repo = Repo(cache, "dataset", "GBaker/MedQA-USMLE-4-options")
    rows = _jsonl(DATA / "medqa_en.jsonl")
    if volume is not None:
        train, test = (_count(REAL_ROWS[f"medqa_{s}"], volume, 1) for s in ("train", "test"))
        rows = [{**r, "question": _grow(r["question"], REAL_CHARS["medqa"], i)}
                for i, r in ((i, rows[i % len(rows)]) for i in range(train + test))]
        parts = (("train", rows[:train]), ("test", rows[train:]))
    else:
        parts = (("train", rows[:12]), ("test", rows[12:16]))
    for split, part in parts:
        records = [{"question": r["question"], "answer": r["options"][r["answer_idx"]], "options": r["options"],
                    "meta_info": "step1", "answer_idx": r["answer_idx"], "metamap_phrases": ["a", "b"]}
                   for r in part]
        repo.add(f"phrases_no_exclude_{split}.jsonl", _jsonl_bytes(records))
    repo.add("README.md", b"---\nlicense: mit\n---\n")
    repo.close()


def asan(cache: Path, volume: float | None = None) -> None:
    """ChuGyouk/Asan-AMC-Healthinfo: one data file whose name has no split; instruction/input/output rows."""
    repo = Repo(cache, "dataset", "ChuGyouk/Asan-AMC-Healthinfo")
    rows = _jsonl(DATA / "ko_medical_text.jsonl")
    rows = rows[:20] if volume is None else [{**r, "text": _grow(r["text"], REAL_CHARS["asan"], i)} for i, r in (
        (i, rows[i % len(rows)]) for i in range(_count(REAL_ROWS["asan"], volume, 20)))]
    records = [{"instruction": f"{r.get('title', '건강')}에 대해 설명해 주세요.", "input": "", "output": r["text"]}
               for r in rows]
    repo.add("Asan-AMC-Healthinfo.jsonl", _jsonl_bytes(records))
    repo.add("README.md", b"---\nlicense: apache-2.0\n---\n")
    repo.close()


def reasoning(cache: Path, volume: float | None = None) -> None:
    """ChuGyouk/medical-reasoning-train-kormedmcqa: question, A-E, int64 answer, thinking and response."""
    import pyarrow as pa

    repo = Repo(cache, "dataset", "ChuGyouk/medical-reasoning-train-kormedmcqa")
    schema = pa.schema([("question", pa.string()), *[(c, pa.string()) for c in "ABCDE"], ("answer", pa.int64()),
                        ("thinking", pa.string()), ("response", pa.string())])
    rows = [{"question": r["question"], **{c: r[c] for c in "ABCDE"}, "answer": int(r["answer"]),
             "thinking": r["reasoning"], "response": f"정답은 {'ABCDE'[int(r['answer']) - 1]}입니다."}
            for r in _reasoning_rows(volume)]
    repo.add("data/train-00000-of-00001-5e1f7c2a.parquet", _parquet(rows, schema))
    repo.add("README.md", b"---\nlicense: apache-2.0\n---\n")
    repo.close()


def _reasoning_rows(volume: float | None) -> list[dict]:
    rows = _jsonl(DATA / "reasoning_ko.jsonl")
    if volume is None:
        return rows[:8]
    return [{**r, "question": _grow(r["question"], REAL_CHARS["question"], i),
             "reasoning": _grow(r["reasoning"], REAL_CHARS["reasoning"], i)}
            for i, r in ((i, rows[i % len(rows)]) for i in range(_count(REAL_ROWS["reasoning"], volume, 8)))]


def medgemma_4b(cache: Path, drop_shard: bool = False, repo_id: str = "google/medgemma-4b-it") -> None:
    """google/medgemma-4b-it at tiny width: multimodal config.json (text_config, vision_config), two safetensors
    shards with an index, language_model.model.* text keys beside vision_tower and multi_modal_projector keys.
    drop_shard leaves the second shard listed but not downloaded (an interrupted download)."""
    from safetensors.torch import save

    from conftest import export_state_dict, randomize, tiny_config, tiny_tokenizer_json
    from engine.model import Gemma3, config_to_hf

    repo = Repo(cache, "model", repo_id)
    torch.manual_seed(0)
    model = randomize(Gemma3(tiny_config()))
    text_config = {**config_to_hf(model.config), "model_type": "gemma3_text"}
    text_config.pop("architectures")
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": text_config, "boi_token_index": 255999, "eoi_token_index": 256000,
              "image_token_index": 262144, "mm_tokens_per_image": 256, "torch_dtype": "bfloat16",
              "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16, "image_size": 32,
                                "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                                "patch_size": 16, "vision_use_head": False}}
    repo.add("config.json", json.dumps(config, indent=2).encode())
    text = {f"language_model.{k}": v.contiguous() for k, v in export_state_dict(model).items()}
    vision = {"vision_tower.vision_model.embeddings.patch_embedding.weight": torch.zeros(16, 3, 16, 16),
              "vision_tower.vision_model.post_layernorm.weight": torch.ones(16),
              "multi_modal_projector.mm_input_projection_weight": torch.zeros(16, model.config.hidden_size),
              "multi_modal_projector.mm_soft_emb_norm.weight": torch.zeros(16)}
    names = sorted(text)
    shards = {"model-00001-of-00002.safetensors": {k: text[k] for k in names[:len(names) // 2]},
              "model-00002-of-00002.safetensors": {**{k: text[k] for k in names[len(names) // 2:]}, **vision}}
    weight_map = {k: shard for shard, tensors in shards.items() for k in tensors}
    for i, (shard, tensors) in enumerate(shards.items()):
        repo.add(shard, save(tensors), listed_only=drop_shard and i == 1)
    repo.add("model.safetensors.index.json", json.dumps({"metadata": {"total_size": 0},
                                                         "weight_map": weight_map}).encode())
    tok = tiny_tokenizer_json(cache / ".tokenizer" / "tokenizer.json")
    repo.add("tokenizer.json", tok.read_bytes())
    repo.add("tokenizer_config.json", json.dumps({"add_bos_token": True, "model_max_length": 131072}).encode())
    repo.add("special_tokens_map.json", json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}).encode())
    repo.add("generation_config.json", json.dumps({"bos_token_id": 2, "eos_token_id": [1, 106]}).encode())
    repo.add("preprocessor_config.json", b"{}")  # the image processor: not fetched (allow-patterns)
    repo.add("README.md", b"---\nlicense: other\n---\n")
    repo.close()


def medgemma_27b(cache: Path) -> None:
    """google/medgemma-27b-text-it at tiny width: a text-only config and model.* keys in two shards (another seed,
    so the gate's two candidates differ)."""
    from safetensors.torch import save

    from conftest import export_state_dict, randomize, tiny_config, tiny_tokenizer_json
    from engine.model import Gemma3, config_to_hf

    repo = Repo(cache, "model", "google/medgemma-27b-text-it")
    torch.manual_seed(1)
    model = randomize(Gemma3(tiny_config()), seed=1)
    repo.add("config.json", json.dumps(config_to_hf(model.config), indent=2).encode())
    state = {k: v.contiguous() for k, v in export_state_dict(model).items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        repo.add(shard, save({k: state[k] for k in keys}))
    repo.add("model.safetensors.index.json", json.dumps({"metadata": {"total_size": 0}, "weight_map": {
        k: shard for shard, keys in shards.items() for k in keys}}).encode())
    repo.add("tokenizer.json", tiny_tokenizer_json(cache / ".tokenizer" / "tokenizer.json").read_bytes())
    repo.add("tokenizer_config.json", json.dumps({"add_bos_token": True}).encode())
    repo.close()


def build_hub_cache(root: Path, volume: float | None = None) -> Path:
    """Every default source, MedGemma 4B and 27B in a hub cache under root; returns root (HF_HUB_CACHE). volume:
    the sources at their real row counts times it (REAL_ROWS), else a few rows each."""
    root.mkdir(parents=True, exist_ok=True)
    for write in (kormedmcqa, medqa, asan, reasoning):
        write(root, volume)
    medgemma_4b(root)
    medgemma_27b(root)
    return root


def model_from_dir(cache: Path, repo_id: str, directory: Path) -> None:
    """repo_id's snapshot replaced by the files of a local HF-layout checkpoint (bench/gpu_cost.sh: random weights
    of a real shape), so the hub path loads it as it would the real model."""
    import shutil

    shutil.rmtree(cache / f"models--{repo_id.replace('/', '--')}", ignore_errors=True)
    repo = Repo(cache, "model", repo_id)
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            repo.add(path.name, path.read_bytes())
    repo.close()
