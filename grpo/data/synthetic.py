"""Generated GSM8K-format word problems, for tests and the offline demo.

Each example is `{"question": str, "answer": str}`; the answer is a short worked solution in
GSM8K's style (calculator annotations `<<3+4=7>>`) ending in `#### N` with an integer N. No text
comes from the real GSM8K dataset.

The train/test split is a function of the question text alone (a SHA-256 bucket), so no question
can ever appear in both splits, whatever the seeds. Generation is deterministic from
`(seed, split, difficulty)` and does not depend on Python's per-process hash salt.

`difficulty` (>= 1) doubles the number range per level (up to 10, 20, 40, ...) and, from 2 on,
adds one more step to the multi-step stories.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable, Sequence

SPLITS = ("train", "test")
TEST_PERCENT = 20  # share of the question space that belongs to the test split

_PEOPLE = (
    ("Mia", "she", "herself"),
    ("Liam", "he", "himself"),
    ("Ava", "she", "herself"),
    ("Noah", "he", "himself"),
    ("Zoe", "she", "herself"),
    ("Omar", "he", "himself"),
    ("Lena", "she", "herself"),
    ("Ravi", "he", "himself"),
    ("Ines", "she", "herself"),
    ("Tomas", "he", "himself"),
    ("Yuki", "she", "herself"),
    ("Kofi", "he", "himself"),
)
_THINGS = ("apples", "marbles", "stickers", "pencils", "cookies", "shells", "cards", "beads")
_GOODS = ("notebooks", "pens", "sandwiches", "juice boxes", "muffins", "erasers", "comics")
_TREATS = ("a game", "a kite", "a book", "a scarf", "a puzzle", "a ball")


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    steps: tuple[str, ...]  # solution sentences, each with a `<<expr=value>>` annotation
    value: int  # the final answer

    def to_example(self) -> dict[str, str]:
        return {"question": self.question, "answer": "\n".join(self.steps) + f"\n#### {self.value}"}


def _calc(a: int, op: str, b: int) -> tuple[str, int]:
    """`a op b`, written as GSM8K writes a calculator step, and its integer value."""
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op == "*":
        value = a * b
    elif op == "/" and a % b == 0:
        value = a // b
    else:
        raise ValueError(f"unsupported or inexact step: {a} {op} {b}")
    return f"{a} {op} {b} = <<{a}{op}{b}={value}>>{value}", value


def _max_number(difficulty: int) -> int:
    return 10 * 2 ** (difficulty - 1)


def _two_people(rng: random.Random) -> tuple[tuple[str, str, str], str]:
    person = rng.choice(_PEOPLE)
    friend = rng.choice([p for p in _PEOPLE if p != person])
    return person, friend[0]


def _addition(rng: random.Random, difficulty: int) -> Problem:
    hi = _max_number(difficulty)
    (name, she, _), _ = _two_people(rng)
    things = rng.choice(_THINGS)
    a, b = rng.randint(2, hi), rng.randint(2, hi)
    step, value = _calc(a, "+", b)
    question = (
        f"{name} has {a} {things}. {she.capitalize()} finds {b} more {things}. "
        f"How many {things} does {name} have now?"
    )
    return Problem(question, (f"{name} has {step} {things} now.",), value)


def _subtraction(rng: random.Random, difficulty: int) -> Problem:
    hi = _max_number(difficulty)
    (name, _, _), friend = _two_people(rng)
    things = rng.choice(_THINGS)
    a = rng.randint(4, hi + 2)
    b = rng.randint(1, a - 2)
    step, value = _calc(a, "-", b)
    question = (
        f"{name} had {a} {things} and gave {b} of them to {friend}. "
        f"How many {things} does {name} have left?"
    )
    return Problem(question, (f"{name} has {step} {things} left.",), value)


def _multiplication(rng: random.Random, difficulty: int) -> Problem:
    hi = _max_number(difficulty)
    (name, _, _), _ = _two_people(rng)
    things = rng.choice(_THINGS)
    boxes, per_box = rng.randint(2, max(5, hi // 2)), rng.randint(2, hi)
    step, value = _calc(boxes, "*", per_box)
    question = (
        f"{name} buys {boxes} boxes of {things}. Each box holds {per_box} {things}. "
        f"How many {things} does {name} buy?"
    )
    return Problem(question, (f"{name} buys {step} {things}.",), value)


def _shopping(rng: random.Random, difficulty: int) -> Problem:
    """Two purchases and a total; from difficulty 2 on, the change from a payment too."""
    hi = _max_number(difficulty)
    (name, she, _), _ = _two_people(rng)
    first, second = rng.sample(_GOODS, 2)
    n1, n2 = rng.randint(2, 5), rng.randint(2, 5)
    p1, p2 = rng.randint(1, hi), rng.randint(1, hi)
    step1, cost1 = _calc(n1, "*", p1)
    step2, cost2 = _calc(n2, "*", p2)
    step3, total = _calc(cost1, "+", cost2)
    question = f"{name} buys {n1} {first} for ${p1} each and {n2} {second} for ${p2} each."
    steps = [
        f"The {first} cost {step1} dollars.",
        f"The {second} cost {step2} dollars.",
        f"In total {name} spends {step3} dollars.",
    ]
    if difficulty < 2:
        return Problem(question + f" How many dollars does {name} spend?", tuple(steps), total)
    paid = (total // 10 + 1) * 10 + 10 * rng.randint(0, 2)
    step4, change = _calc(paid, "-", total)
    question += f" {she.capitalize()} pays with ${paid}. How many dollars of change does {she} get?"
    steps.append(f"{name} gets {step4} dollars of change.")
    return Problem(question, tuple(steps), change)


def _sharing(rng: random.Random, difficulty: int) -> Problem:
    """Two harvests shared equally; from difficulty 2 on, some are kept back first."""
    hi = _max_number(difficulty)
    (name, she, self_), _ = _two_people(rng)
    things = rng.choice(_THINGS)
    friends, each = rng.randint(2, 5), rng.randint(2, hi)
    kept = rng.randint(1, hi) if difficulty >= 2 else 0
    total = friends * each + kept
    morning = rng.randint(2, total - 2)
    afternoon = total - morning
    step, shared = _calc(morning, "+", afternoon)
    steps = [f"{name} picks {step} {things} in all."]
    question = f"{name} picks {morning} {things} in the morning and {afternoon} in the afternoon."
    if kept:
        question += f" {she.capitalize()} keeps {kept} for {self_}."
        step, shared = _calc(shared, "-", kept)
        steps.append(f"That leaves {step} {things} to share.")
    question += (
        f" {she.capitalize()} shares {'the rest' if kept else 'them'} equally among {friends}"
        f" friends. How many {things} does each friend get?"
    )
    step, value = _calc(shared, "/", friends)
    steps.append(f"Each friend gets {step} {things}.")
    return Problem(question, tuple(steps), value)


def _savings(rng: random.Random, difficulty: int) -> Problem:
    """Weekly savings minus a purchase; from difficulty 2 on, plus a gift first."""
    hi = _max_number(difficulty)
    (name, she, _), friend = _two_people(rng)
    weekly, weeks = rng.randint(2, hi), rng.randint(2, 6)
    step, money = _calc(weekly, "*", weeks)
    question = f"{name} saves ${weekly} every week for {weeks} weeks."
    steps = [f"{name} saves {step} dollars."]
    if difficulty >= 2:
        gift = rng.randint(1, hi)
        step, money = _calc(money, "+", gift)
        question += f" {friend} gives {name} ${gift} more."
        steps.append(f"With the gift {name} has {step} dollars.")
    treat = rng.choice(_TREATS)
    price = rng.randint(1, money - 1)
    step, value = _calc(money, "-", price)
    question += f" Then {she} spends ${price} on {treat}. How many dollars does {name} have left?"
    steps.append(f"{name} has {step} dollars left.")
    return Problem(question, tuple(steps), value)


TEMPLATES: dict[str, Callable[[random.Random, int], Problem]] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "shopping": _shopping,
    "sharing": _sharing,
    "savings": _savings,
}


def split_of(question: str) -> str:
    """The split a question belongs to: a stable hash bucket of its text."""
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def generate_problems(
    n: int,
    *,
    seed: int,
    split: str,
    difficulty: int = 1,
    templates: Sequence[str] | None = None,
) -> list[dict[str, str]]:
    """`n` distinct problems of `split`, deterministic from `(seed, split, difficulty)`.

    `templates` limits the kinds of problem (names from TEMPLATES; default: all of them).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, got {difficulty}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # A string seed is hashed with SHA-512 by `random`, so it is stable across processes.
    rng = random.Random(f"grpo-synthetic/{seed}/{split}/{difficulty}")
    unknown = sorted(set(templates or ()) - set(TEMPLATES))
    if unknown:
        raise ValueError(f"unknown problem templates {unknown}; valid: {sorted(TEMPLATES)}")
    makers = [TEMPLATES[name] for name in (templates or TEMPLATES)]
    seen: set[str] = set()
    examples: list[dict[str, str]] = []
    attempts = 0
    while len(examples) < n:  # rejection sampling: wrong split or duplicate -> draw again
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {split} problems at {difficulty=}")
        problem = rng.choice(makers)(rng, difficulty)
        if problem.question not in seen and split_of(problem.question) == split:
            seen.add(problem.question)
            examples.append(problem.to_example())
    return examples
