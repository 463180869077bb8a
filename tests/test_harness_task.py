"""medko's generate mode against the kormedmcqa task of the installed lm-evaluation-harness (a test-only
dependency): the same prompt, stop strings, token budget and, for --extraction harness, the same filter."""
import sys
from pathlib import Path

import lm_eval
import pytest
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.utils import apply_template

from engine.data import MCQ
from engine.evaluate import GENERATE_TOKENS, HARNESS_PATTERNS, STOP_STRINGS, extract_answer, mcq_prompt

TASK_DIR = Path(lm_eval.__file__).parent / "tasks" / "kormedmcqa"
DOC = {"question": "  다음 중 옳은 것은?\n", "A": "가", "B": "나", "C": "다", "D": "라", "E": "마", "answer": 3}
ROW = MCQ("doctor/test/0", "doctor", DOC["question"], {k: DOC[k] for k in "ABCDE"}, "C")


@pytest.fixture(scope="module")
def task() -> dict:
    return load_yaml(TASK_DIR / "_template_yaml")


def test_task_is_version_3(task):
    assert task["metadata"]["version"] == 3.0 and task["output_type"] == "generate_until"


def test_prompt_and_shots_are_the_tasks(task):
    assert mcq_prompt(ROW) == apply_template(task["doc_to_text"], DOC)
    shot = apply_template(task["fewshot_config"]["doc_to_text"], DOC)
    assert mcq_prompt(ROW, fewshot=[ROW]) == shot + mcq_prompt(ROW)


def test_stop_strings_and_budget_are_the_tasks(task):
    kwargs = task["generation_kwargs"]
    assert tuple(kwargs["until"]) == STOP_STRINGS
    assert kwargs["max_gen_toks"] == GENERATE_TOKENS and kwargs["do_sample"] is False


def test_harness_extraction_is_the_tasks_filter(task):
    choice_filter = task["filter_list"][0]["filter"][0]["function"]
    task_patterns = sys.modules[choice_filter.__module__].CHOICE_PATTERNS
    assert [(p.pattern, p.flags) for p in HARNESS_PATTERNS] == [(p.pattern, p.flags) for p in task_patterns]
    outputs = ["정답： C", "정답:c", "정답은 B 입니다", "a. 아니고 d. 맞다", "E", "비타민 a", "답 없음", ""]
    applied = choice_filter().apply([[o] for o in outputs], [DOC] * len(outputs))
    assert [extract_answer(o, "harness") or "" for o in outputs] == [r[0] for r in applied]
