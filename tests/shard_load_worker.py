"""What test_shard_load.py and bench/fsdp_load.py run under torchrun with FSDP2 (MEDKO_FSDP=1), and in one process
for the reference: a random Gemma 3 whose base dominates is loaded from safetensors (each rank its own rows), given
s3's additions (language vectors, lora1) and trained with s3's loss, the teacher pass included; each rank's peak
resident memory above the runtime is measured during the load and the first step. Then s4's duplicated layers are
added to a fresh load and trained one step, their adapter file written by rank 0 and read back into a third load.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/shard_load_worker.py MODEL_DIR OUT_DIR
"""
import gc
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import engine.examples  # noqa: E402
import engine.trainer  # noqa: E402
import shared_logic as sl  # noqa: E402
from conftest import tiny_tokenizer_json  # noqa: E402
from engine import distributed  # noqa: E402
from engine.adapters import (add_language_embeddings, add_lora, additions_state_dict, apply_surgery,  # noqa: E402
                             duplicate_edge_layers, load_additions_file)
from engine.checkpoints import load_model  # noqa: E402
from engine.data import load_texts  # noqa: E402
from engine.measures import text_losses  # noqa: E402
from engine.model import Gemma3, ModelConfig, config_to_hf  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402
from engine.train_checkpoints import trainable_state  # noqa: E402

MIB = 2 ** 20
# One example of 4 tokens per rank (one process takes the two-process test's two): the step's own memory (activations
# of three passes, Korean, English and the teacher's, through every layer; gradients; AdamW's states) is then ~0.27
# of a layer (measured: 0.13 at 1 token, 0.42 at 8), inside the bounds' 10%, so that the peak measures the weights a
# rank holds.
GLOBAL_BATCH, MAX_LEN, STEPS = max(2, int(os.environ.get("WORLD_SIZE", "1"))), 4, 2


def big_config(layers: int = 8) -> ModelConfig:
    """A Gemma 3 whose decoder layers outweigh its embedding 233 to 1 (the tiny tokenizer's 512 rows): 8 layers
    of 58 MiB in float32."""
    return ModelConfig(vocab_size=512, hidden_size=1024, intermediate_size=4096, num_layers=layers, num_heads=8,
                       num_kv_heads=2, head_dim=128, query_pre_attn_scalar=128, sliding_window=16)


def write_model(directory: Path, layers: int = 8) -> Path:
    """config.json, tokenizer.json and random float32 weights in two safetensors shards with their index, one
    layer's tensors in memory at a time."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = big_config(layers)
    (directory / "config.json").write_text(json.dumps(config_to_hf(config)))
    tiny_tokenizer_json(directory / "tokenizer.json")
    with torch.device("meta"):
        names = list(Gemma3(config).state_dict())
    shards: dict[str, list[str]] = {"model-00001-of-00002.safetensors": [], "model-00002-of-00002.safetensors": []}
    for name in names:
        shards[list(shards)[int(name.startswith("layers.") and int(name.split(".")[1]) >= layers // 2)]].append(name)
    weight_map = {}
    for number, (file, part) in enumerate(shards.items()):
        with torch.device("meta"):
            shapes = {n: t.shape for n, t in Gemma3(config).state_dict().items() if n in part}
        state = {}
        for seed, name in enumerate(part):
            gen = torch.Generator().manual_seed(1000 * number + seed)
            state[f"model.{name}"] = torch.randn(shapes[name], generator=gen) * (0.3 if "norm" in name else 0.05)
            weight_map[f"model.{name}"] = file
        save_file(state, str(directory / file))
        del state
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def resident() -> tuple[int, int]:
    """(now, peak) resident bytes of this process since the last reset_peak()."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) starts again from the current RSS


def texts(name: str, n: int) -> list[str]:
    return list(load_texts(ROOT / "data" / name))[:n]


def loaded(model_dir: Path, tok: Tokenizer) -> Gemma3:
    """The base with s3's additions, lora1's B set off zero so that its A trains from the first step."""
    torch.manual_seed(0)
    model = load_model(model_dir, "cpu")
    add_language_embeddings(model, tok)
    add_lora(model, "lora1", rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    return model


def train(model: Gemma3, tok: Tokenizer, out: Path, steps: int, patterns: list[str]) -> None:
    config = engine.trainer.TrainConfig(max_steps=steps, batch_size=GLOBAL_BATCH, lr=1e-3, warmup_steps=1,
                                        max_len=MAX_LEN, log_every=1, save_every=1, device="cpu")
    korean = engine.examples.text_examples(tok, texts("ko_medical_text.jsonl", 8), MAX_LEN)
    english = engine.examples.text_examples(tok, texts("en_medical_text.jsonl", 8), MAX_LEN)
    engine.trainer.set_trainable(model, patterns)
    engine.trainer.train(model, sl.stage_loss("mse", 1.0), sl.mixed_batches(korean, english, config), config, out)


def measured_run(model_dir: Path, tok: Tokenizer, out: Path) -> dict:
    """The load and STEPS updates of s3's loss; each rank's peak above its runtime, at load and through the first
    update (read as the first checkpoint starts, before it gathers the trainable state)."""
    now, _ = resident()
    reset_peak()
    model = distributed.materialize(loaded(model_dir, tok))
    figures = {"runtime": now, "load": resident()[1] - now}
    real_save = engine.trainer.save_checkpoint

    def first_save(*args, **kwargs):
        figures.setdefault("step", resident()[1] - now)
        return real_save(*args, **kwargs)
    engine.trainer.save_checkpoint = first_save
    try:
        train(model, tok, out, STEPS, sl.LANGUAGE_PATTERNS + sl.LORA_PATTERNS)
    finally:
        engine.trainer.save_checkpoint = real_save
    state = trainable_state(model)
    if distributed.is_main():
        torch.save(state, out / "trainable.pt")
    return figures


def duplicated_run(model_dir: Path, tok: Tokenizer, out: Path) -> None:
    """s4's surgery on a fresh load, one update, the additions written by rank 0 and read into a third load, whose
    held-out losses must equal the trained model's; each rank's peak through the update's checkpoint, whose
    trainable state (two whole layers and their AdamW moments) rank 0 alone gathers."""
    model = loaded(model_dir, tok)
    duplicate_edge_layers(model)
    real_save, saves = engine.trainer.save_checkpoint, []

    def measured_save(*args, **kwargs):  # each rank's peak above what it held as the checkpoint starts
        now, _ = resident()
        reset_peak()
        try:
            return real_save(*args, **kwargs)
        finally:
            saves.append(resident()[1] - now)
    engine.trainer.save_checkpoint = measured_save
    try:
        train(model, tok, out, 1, sl.added_layer_patterns(model) + sl.LANGUAGE_PATTERNS + sl.LORA_PATTERNS)
    finally:
        engine.trainer.save_checkpoint = real_save
    whole = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    figures = distributed.gather([{"rank": distributed.rank(), "save": max(saves), "trainable": whole}])
    if distributed.is_main():
        (out / "save.json").write_text(json.dumps(figures))
    additions = {k: distributed.full_tensor(v).contiguous() for k, v in additions_state_dict(model).items()}
    if distributed.is_main():
        from safetensors.torch import save_file

        save_file(additions, str(out / "adapter.safetensors"))
    heldout = texts("en_medical_text_heldout.jsonl", 4)
    trained = text_losses(model.eval(), tok, heldout, MAX_LEN)
    distributed.on_main(lambda: None)  # the file is written before any rank reads it
    again = load_model(model_dir, "cpu")
    apply_surgery(again, model.surgery, tok)
    load_additions_file(again, out / "adapter.safetensors", "the worker's adapter file")
    reloaded = text_losses(again, tok, heldout, MAX_LEN)
    if distributed.is_main():
        (out / "reloaded.json").write_text(json.dumps({"trained": trained, "reloaded": reloaded}))


def main(model_dir: Path, out: Path) -> int:
    distributed.init()
    torch.set_num_threads(1)
    tok = Tokenizer(tiny_tokenizer_json(out / f"tokenizer-{distributed.rank()}.json"))
    # The runtime: imports, the process group, and a step of a 2-layer model of the same widths (threads,
    # oneDNN's kernels, gloo's buffers), so that what is measured after it is what the loader and the step hold.
    warm = out / "warm"
    distributed.on_main(write_model, warm / "model", 2)
    train(loaded(warm / "model", tok), tok, warm / "run", 1, sl.LORA_PATTERNS)
    gc.collect()
    figures = measured_run(model_dir, tok, out / "straight")
    figures["rank"], figures["world"] = distributed.rank(), distributed.world()
    parts = distributed.gather([figures])
    if distributed.is_main():
        (out / "figures.json").write_text(json.dumps(parts))
    duplicated_run(model_dir, tok, out / "duplicated")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
