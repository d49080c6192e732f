"""Generated word problems: deterministic, split-disjoint, and their worked answers add up."""

import ast
import operator
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.data import synthetic
from grpo.data.synthetic import TEMPLATES, generate_problems, split_of

_STEP = re.compile(r"<<([^=>]+)=(-?\d+)>>(-?\d+)")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(expression: str) -> tuple[int, list[int]]:
    """Value and operands of a two-operand calculator step, computed independently of the code."""
    node = ast.parse(expression, mode="eval").body
    assert isinstance(node, ast.BinOp), expression
    a, b = node.left.value, node.right.value
    if isinstance(node.op, ast.Div):
        assert a % b == 0, f"inexact division {expression}"
        return a // b, [a, b]
    return _OPS[type(node.op)](a, b), [a, b]


def _check_solution(example: dict) -> None:
    question, answer = example["question"], example["answer"]
    *lines, final = answer.split("\n")
    assert re.fullmatch(r"#### \d+", final), answer
    known = {int(n) for n in re.findall(r"\d+", question)}
    result = None
    for line in lines:
        (expression, annotated, shown), *rest = _STEP.findall(line)
        assert not rest, line
        result, operands = _evaluate(expression)
        assert int(annotated) == result == int(shown), line
        assert result >= 0, line
        assert set(operands) <= known, f"operand not from the question or an earlier step: {line}"
        known.add(result)
    assert int(final.removeprefix("#### ")) == result, answer


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_worked_answers_are_correct_arithmetic(difficulty):
    for example in generate_problems(300, seed=3, split="train", difficulty=difficulty):
        _check_solution(example)


class _ScriptedRng:
    """Stands in for random.Random: randint returns the scripted values, choices take the first."""

    def __init__(self, *values):
        self.values = list(values)

    def randint(self, lo, hi):
        value = self.values.pop(0)
        assert lo <= value <= hi, (lo, value, hi)
        return value

    def choice(self, seq):
        return seq[0]

    def sample(self, seq, k):
        return list(seq[:k])


def test_shopping_hand_computed():
    # 3 notebooks at $4 + 2 pens at $5 = 22; pays (22 // 10 + 1) * 10 + 10 * 1 = 40; change 18.
    problem = TEMPLATES["shopping"](_ScriptedRng(3, 2, 4, 5, 1), 2)
    assert problem.question == (
        "Mia buys 3 notebooks for $4 each and 2 pens for $5 each. She pays with $40. "
        "How many dollars of change does she get?"
    )
    assert problem.value == 18
    assert problem.to_example()["answer"].endswith("\n#### 18")


def test_sharing_hand_computed():
    # 3 friends x 4 each + 2 kept = 14 picked: 5 in the morning, 9 in the afternoon.
    problem = TEMPLATES["sharing"](_ScriptedRng(3, 4, 2, 5), 2)
    assert "picks 5 apples in the morning and 9 in the afternoon" in problem.question
    assert "keeps 2 for herself" in problem.question
    assert problem.value == 4
    assert len(problem.steps) == 3


def test_deterministic_and_seed_dependent():
    first = generate_problems(50, seed=7, split="train")
    assert first == generate_problems(50, seed=7, split="train")
    assert first != generate_problems(50, seed=8, split="train")
    assert first[:10] == generate_problems(10, seed=7, split="train")


def test_same_problems_in_a_fresh_process_with_another_hash_seed():
    code = (
        "from grpo.data.synthetic import generate_problems as g;"
        "print(repr(g(20, seed=5, split='test', difficulty=2)))"
    )
    root = str(Path(__file__).resolve().parents[2])  # grpo may not be installed
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": root}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == repr(generate_problems(20, seed=5, split="test", difficulty=2))


def test_train_and_test_are_disjoint():
    train = {e["question"] for s in (0, 1) for e in generate_problems(400, seed=s, split="train")}
    test = {e["question"] for s in (0, 1) for e in generate_problems(400, seed=s, split="test")}
    assert len(test) > 400  # the two seeds give mostly different problems
    assert not train & test
    assert {split_of(q) for q in train} == {"train"}
    assert {split_of(q) for q in test} == {"test"}


def test_no_duplicates_within_a_split():
    questions = [e["question"] for e in generate_problems(1000, seed=0, split="test")]
    assert len(set(questions)) == len(questions)


def test_difficulty_widens_numbers_and_adds_steps():
    def stats(difficulty):
        examples = generate_problems(300, seed=0, split="train", difficulty=difficulty)
        biggest = [max(int(n) for n in re.findall(r"\d+", e["question"])) for e in examples]
        steps = sum(e["answer"].count("<<") for e in examples) / len(examples)
        return max(biggest), sum(biggest) / len(biggest), steps

    easy_max, easy_mean, easy_steps = stats(1)
    _, hard_mean, hard_steps = stats(3)
    assert easy_max <= 5 * synthetic._max_number(1)  # the largest: 5 friends x 10 each, shared
    assert hard_mean > 2 * easy_mean
    assert hard_steps > easy_steps


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(split="validation"), "split must be one of"),
        (dict(split="train", difficulty=0), "difficulty must be >= 1"),
        (dict(split="train", n=-1), "n must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_problems(**{"n": 3, "seed": 0, **kwargs})


def test_templates_limit_the_kinds_of_problem():
    only_addition = synthetic.generate_problems(20, seed=0, split="train", templates=["addition"])
    for example in only_addition:
        steps = re.findall(r"<<([^=]+)=", example["answer"])
        assert len(steps) == 1 and "+" in steps[0], example["answer"]
    with pytest.raises(ValueError, match="unknown problem templates \\['division'\\]"):
        synthetic.generate_problems(1, seed=0, split="train", templates=["division"])
