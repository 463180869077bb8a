"""What test_distributed.py runs under torchrun, and in one process for the reference: the tiny model trained
with a stage's loss (CE on Korean text, the per-layer English loss against the teacher view), straight,
interrupted and resumed, replicated and with FSDP2; the evaluator, generation and held-out measures; then, given
stage options, s2 stopped inside its third update as Ctrl-C would stop it (one launch: each costs imports).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT_DIR [S2 ARGS]
"""
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
from conftest import randomize, tiny_config, tiny_tokenizer_json  # noqa: E402
from engine import distributed  # noqa: E402
from engine.adapters import add_language_embeddings, add_lora  # noqa: E402
from engine.data import load_kormedmcqa, load_texts  # noqa: E402
from engine.errors import MedkoError  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402
from engine.measures import losses_and_drift, text_losses  # noqa: E402
from engine.model import Gemma3  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402
from engine.train_checkpoints import trainable_state  # noqa: E402

GLOBAL_BATCH = 4  # examples per micro-batch over all processes: 2 per process under torchrun, 4 in one
STEPS, STOP_AT = 3, 3  # the interrupted runs stop inside update 3, after the checkpoint of step 2
MODES = ("replicated", "fsdp")


def tokenizer(out: Path) -> Tokenizer:
    path = out / f"tokenizer-{distributed.rank()}.json"
    return Tokenizer(tiny_tokenizer_json(path))


def model_with_additions(tok: Tokenizer) -> Gemma3:
    """The tiny model as s3 trains it: language embeddings and lora1 (B set off zero, so A trains from step 1)."""
    torch.manual_seed(0)
    model = randomize(Gemma3(tiny_config()))
    add_language_embeddings(model, tok)
    add_lora(model, "lora1", rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "language_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    return model


def texts(name: str, n: int) -> list[str]:
    return list(load_texts(ROOT / "data" / name))[:n]


def stopping(stop_at: int | None):
    """engine.trainer.accumulate_gradients raising KeyboardInterrupt at its stop_at-th call, as Ctrl-C would."""
    real, calls = engine.trainer.accumulate_gradients, [0]

    def stops(*args, **kwargs):
        calls[0] += 1
        if calls[0] == stop_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    return real, stops


def train_run(out: Path, tok: Tokenizer, stop_at: int | None = None, resume: bool = False,
              batch: int = GLOBAL_BATCH) -> None:
    """STEPS updates of s3's loss on a global micro-batch of GLOBAL_BATCH examples; stop_at interrupts that
    update."""
    config = engine.trainer.TrainConfig(max_steps=STEPS, batch_size=batch, lr=1e-3,
                                        warmup_steps=1, max_len=96, log_every=1, save_every=2, device="cpu")
    korean = engine.examples.text_examples(tok, texts("ko_medical_text.jsonl", 24), config.max_len)
    english = engine.examples.text_examples(tok, texts("en_medical_text.jsonl", 24), config.max_len)
    model = model_with_additions(tok)
    engine.trainer.set_trainable(model, sl.LANGUAGE_PATTERNS + sl.LORA_PATTERNS)
    real, engine.trainer.accumulate_gradients = stopping(stop_at)
    try:
        engine.trainer.train(model, sl.stage_loss("mse", 1.0), sl.mixed_batches(korean, english, config), config,
                             out, resume=resume)
    except KeyboardInterrupt:
        pass
    finally:
        engine.trainer.accumulate_gradients = real
    state = trainable_state(model)  # whole on rank 0
    if distributed.is_main():
        torch.save(state, out / "trainable.pt")


def evaluation(tok: Tokenizer) -> dict:
    """Predictions of both evaluator modes, generations and held-out measures on the tiny model."""
    model = model_with_additions(tok).eval()
    rows = load_kormedmcqa(["doctor", "nurse"], "dev", ROOT / "data" / "kormedmcqa")[:30]
    logits = evaluate(model, tok, rows, "logits", "ko", progress=False)
    generated = evaluate(model, tok, rows[:10], "generate", "ko", max_new_tokens=4, progress=False)
    held_out = texts("en_medical_text_heldout.jsonl", 9)
    losses, drifts = losses_and_drift(model, tok, held_out, 96)
    return {"logits": [(p["id"], p["pred"]) for p in logits.predictions],
            "generate": [(p["id"], p["output"]) for p in generated.predictions],
            "text_losses": text_losses(model, tok, held_out, 96), "losses": losses, "drifts": drifts}


def refuse_on_rank_0() -> None:
    raise MedkoError("rank 0 refuses; every rank stops with this sentence")


def relayed_error(out: Path) -> None:
    """What each rank raises when a write on rank 0 fails (distributed.on_main)."""
    try:
        distributed.on_main(refuse_on_rank_0)
    except MedkoError as err:
        (out / f"error-{distributed.rank()}.json").write_text(json.dumps([type(err).__name__, str(err)]))


def main(out: Path, stage_args: list[str]) -> int:
    distributed.init()
    torch.set_num_threads(1)
    tok = tokenizer(out)
    relayed_error(out)
    result = evaluation(tok)
    if distributed.is_main():
        (out / "evaluation.json").write_text(json.dumps(result))
    for mode in MODES:
        os.environ["MEDKO_FSDP"] = "1" if mode == "fsdp" else "0"
        train_run(out / mode / "straight", tok)
        train_run(out / mode / "resumed", tok, stop_at=STOP_AT)
        train_run(out / mode / "resumed", tok, resume=True)
    os.environ["MEDKO_FSDP"] = "0"
    if not stage_args:
        distributed.shutdown()
        return 0
    sys.path.insert(0, str(ROOT / "stages"))
    import s2_embed

    engine.trainer.accumulate_gradients = stopping(STOP_AT)[1]
    return s2_embed.main(stage_args)  # 130 after the interrupt, the process group shut down


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
