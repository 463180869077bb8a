"""Cloze (OLMES CF) scoring against transformers' full forward passes: the same log-probabilities and the same
acc_norm predictions, on the tiny model and (slow) on the real 270M over the bundled dev exam."""
import pytest
import torch

from engine.checkpoints import load_model
from engine.cloze import cloze_logprobs, cloze_predictions, cloze_prompt, encode_question
from engine.data import MCQ, load_kormedmcqa
from engine.errors import MedkoError
from engine.evaluate import evaluate
from engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir)


def mcq(i: str, question: str, options: list[str], answer: str = "A", lang: str = "en") -> MCQ:
    return MCQ(i, "doctor", question, dict(zip("ABCDE", options)), answer, lang=lang)


ROWS = [
    mcq("q0", "Which is it?", ["aspirin", "warfarin", "heparin", "digoxin", "none"], "B"),
    mcq("q1", "A much longer question that runs well past the sliding window of the tiny model, twice over, and on?",
        ["a", "a much longer option text", "b b", "c", "dd"], "E"),
    mcq("q2", "  Four options only?\n", ["x y z", " w ", "v", "uu"], "D"),
    mcq("q3", "정답은 무엇인가?", ["정답", "답", "정", "입니다", "은"], "C", lang="ko"),
]


def reference_logprobs(hf, tokenizer: Tokenizer, row: MCQ, lang: str) -> list[float]:
    """lm-eval's loglikelihood, by hand: for each option, one full forward of context + continuation tokens and the
    continuation's summed log-softmax."""
    enc = encode_question(tokenizer, row, lang)
    out = []
    for cont in enc.options:
        ids = torch.tensor([enc.context + cont])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids[:, :-1]).logits.float(), -1)[0]
        positions = range(len(enc.context) - 1, ids.shape[1] - 1)
        out.append(sum(logp[p, ids[0, p + 1]].item() for p in positions))
    return out


def test_prompt_and_tokens_follow_lm_evals_encode_pair(tiny_tokenizer):
    row = ROWS[2]
    assert cloze_prompt(row, "en") == "Question: Four options only?\nAnswer:"
    assert cloze_prompt(ROWS[3], "ko") == "질문: 정답은 무엇인가?\n정답:"
    enc = encode_question(tiny_tokenizer, row, "en")
    assert enc.context[0] == tiny_tokenizer.bos_id and enc.chars == [5, 1, 1, 2]
    for text, cont in zip(["x y z", "w", "v", "uu"], enc.options):
        whole = tiny_tokenizer.encode(f"{cloze_prompt(row, 'en')} {text}")
        assert whole[:len(enc.context)] == enc.context and whole[len(enc.context):] == cont


@pytest.mark.parametrize("batch_size", [1, 3])
def test_logprobs_equal_transformers_full_forward(model, tiny_tokenizer, batch_size):
    from conftest import hf_twin

    hf = hf_twin(model)
    en, ko = ROWS[:3], ROWS[3:]
    ours = cloze_logprobs(model, tiny_tokenizer, en, "en", batch_size) + cloze_logprobs(model, tiny_tokenizer, ko, "ko")
    for row, scores in zip(en + ko, ours):
        expected = reference_logprobs(hf, tiny_tokenizer, row, row.lang)
        assert [s for s, _ in scores] == pytest.approx(expected, abs=2e-4)
        assert [n for _, n in scores] == [len(c) for c in encode_question(tiny_tokenizer, row, row.lang).options]


def test_prediction_is_acc_norm_per_character_and_ties_go_first():
    row = mcq("t", "q", ["abcd", "ab", "abcdefgh", "a", "xyz"])
    # per character: -1, -1.5, -0.5, -4, -0.5 -> C (first of the two best)
    scores = [(-4.0, 2), (-3.0, 1), (-4.0, 3), (-4.0, 1), (-1.5, 1)]
    (pred,) = cloze_predictions([row], [scores])
    assert pred["pred"] == "C" and pred["per_char"] == [-1.0, -1.5, -0.5, -4.0, -0.5]
    assert pred["sum"] == [-4.0, -3.0, -4.0, -4.0, -1.5] and pred["per_token"] == pytest.approx([-2.0, -3.0, -4 / 3, -4.0, -1.5], abs=1e-6)


def test_cloze_mode_reports_scores_and_refuses_chat(model, tiny_tokenizer):
    report = evaluate(model, tiny_tokenizer, ROWS[:3], "cloze", "en", progress=False)
    assert report.mode == "cloze" and report.n == 3 and report.format_compliance is None
    for entry in report.predictions:
        assert set(entry["scores"]) == {"sum", "per_char", "per_token"} and entry["pred"] in "ABCDE"
    with pytest.raises(MedkoError, match="drop --chat"):
        evaluate(model, tiny_tokenizer, ROWS[:1], "cloze", "en", chat=True, progress=False)


@pytest.mark.slow
def test_270m_cloze_predictions_equal_transformers_on_the_bundled_dev(converted_270m):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    data = Path(__file__).resolve().parents[1] / "data"
    ours = load_model(converted_270m)
    tokenizer = Tokenizer(converted_270m / "tokenizer.json")
    hf = AutoModelForCausalLM.from_pretrained(converted_270m, torch_dtype=torch.float32,
                                              attn_implementation="eager").eval()
    for lang, source in (("en", "kormedmcqa_en"), ("ko", "kormedmcqa")):
        rows = list(load_kormedmcqa(["doctor", "nurse", "pharm", "dentist"], "dev", data / source, lang))
        report = evaluate(ours, tokenizer, rows, "cloze", lang, progress=False)
        expected = []
        for row in rows:
            enc = encode_question(tokenizer, row, lang)
            ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(enc.context + c) for c in enc.options], True,
                                                  tokenizer.pad_id)
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(enc.context) + len(c)) for c in enc.options], True)
            with torch.no_grad():  # the head on the continuation's positions only: [5 x T x vocab] costs minutes
                hidden = hf.model(ids, attention_mask=mask.long()).last_hidden_state
                sums = []
                for j, c in enumerate(enc.options):
                    positions = torch.arange(len(enc.context) - 1, len(enc.context) + len(c) - 1)
                    logp = torch.log_softmax(hf.lm_head(hidden[j, positions]).float(), -1)
                    sums.append(logp[torch.arange(len(c)), ids[j, positions + 1]].sum().item())
            expected.append(cloze_predictions([row], [[(s, 1) for s in sums]])[0]["pred"])
        ours_preds = [e["pred"] for e in report.predictions]
        assert ours_preds == expected, lang
