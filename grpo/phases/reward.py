"""Reward phase: score completions on the host with plain Python.

A reward function is `fn(completion, example) -> float`, where `example` is a GSM8K-format
mapping with at least `question` and `answer` (reasoning ending in `#### N`); one marked with
`batched_reward` is `fn(completions, examples) -> rewards`, called once per batch. `score` runs
a weighted set of them over a batch. It never raises because of one completion: a function that
raises, returns a non-finite value or overruns its time limit scores 0 there and is counted (a
batched call that raises or overruns: every row of the batch).
Length shaping needs token counts, not text: `add_overlong_penalty` adds DAPO's soft overlong
punishment to a scored batch.

GSM8K correctness reads the model's final answer from explicit markers -- `<answer>...</answer>`,
`\\boxed{...}` (nested braces allowed) and `#### ...` to the end of the line -- and, when asked,
falls back to the last number in the text. When several explicit answers appear, the one that
starts LAST in the text wins (the model's final word; `<answer>\\boxed{7}</answer>` reads the
box). The winning marker decides alone: if it holds no number, the answer is wrong, even when a
number follows it. An unclosed `<answer>` is not an answer.

Inside the chosen answer the last number counts (`<answer>20 - 2 = 18</answer>` reads 18). A
number may carry a sign (`-`, `+`, U+2212), a `$`, thousands commas (also LaTeX `1{,}000` and
`1\\,000`), decimals, a percent sign (dropped: `25%` reads 25, as GSM8K writes percentages) and
a simple fraction (`3/4`, `\\frac{3}{4}`). A minus directly after a letter or digit is
subtraction, not a sign (`75-3` reads 3). Values compare numerically with a small tolerance.

MATH-style references (`\\frac{\\pi}{2}`, `2x+1`, `(1,2)`) need `match="math_verify"`: the
chosen answer and the reference are each read as one formula by the math-verify package and
compared symbolically (a plain-number reference still matches by the rule above first). Its own
time limits use SIGALRM, which works only on the main thread, so they are off; every check runs
under this module's time limit instead (`score`, `check_answers`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import importlib
import importlib.util
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from grpo import knobs

RewardFn = Callable[[str, Mapping[str, Any]], float]
# Marked with `batched_reward`: all of a process's completions and examples in one call.
BatchedRewardFn = Callable[[list[str], list[Mapping[str, Any]]], Sequence[float]]


def batched_reward(fn: BatchedRewardFn) -> BatchedRewardFn:
    """Marks `fn(completions, examples) -> rewards` to be called once per batch (a reward
    model, an LLM judge, a score relative to the group) instead of once per completion."""
    fn.batched = True
    return fn


def is_batched(fn: Callable[..., Any]) -> bool:
    return getattr(fn, "batched", False) is True


_logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- answer parsing

_MAGNITUDE = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
# Every optional space is a single `[ ]?`: unbounded `\s*` runs would make a scan over a long
# run of blanks quadratic, and CPython's `re` holds the GIL, so no timeout could interrupt it.
_NUMBER_RE = re.compile(
    rf"(?<![\w.])(?P<sign>[-+]?)(?:\$[ ]?)?(?P<sign2>[-+]?)(?P<num>{_MAGNITUDE})"
    rf"(?:[ ]?/[ ]?(?P<den>{_MAGNITUDE}))?",
    re.ASCII,
)
_LATEX_REWRITES = (
    (re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}"), r"\1/\2"),
    (re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\{,\}|\\,(?=\d{3})"), ","),
    (re.compile(r"\\([$%])"), r"\1"),
)
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_HASHES = "####"
_BOXED_RE = re.compile(r"\\boxed ?\{")
_BRACE_RE = re.compile(r"[{}]")
_REL_TOL = _ABS_TOL = 1e-6


def _normalise(text: str) -> str:
    text = text.replace("\u2212", "-")
    for pattern, replacement in _LATEX_REWRITES:
        text = pattern.sub(replacement, text)
    return text


def _last_number_match(text: str) -> re.Match[str] | None:
    tail = collections.deque(_NUMBER_RE.finditer(text), maxlen=1)
    return tail[0] if tail else None


def _match_value(match: re.Match[str]) -> float | None:
    value = float(match["num"].replace(",", ""))
    if match["den"] is not None:
        denominator = float(match["den"].replace(",", ""))
        if denominator == 0:
            return None
        value /= denominator
    if "-" in match["sign"] + match["sign2"]:
        value = -value
    return value if math.isfinite(value) else None


def parse_number(text: str) -> float | None:
    """The value of the last number in `text` (normalised as the module doc says), or None."""
    match = _last_number_match(_normalise(text))
    return None if match is None else _match_value(match)


def _last_answer_tag(text: str) -> tuple[int, str] | None:
    close = text.rfind(_ANSWER_CLOSE)
    start = text.rfind(_ANSWER_OPEN, 0, max(close, 0))
    if close == -1 or start == -1:
        return None
    return start, text[start + len(_ANSWER_OPEN) : close]


def _last_hashes(text: str) -> tuple[int, str] | None:
    start = text.rfind(_HASHES)
    if start == -1:
        return None
    body = start + len(_HASHES)
    end = text.find("\n", body)
    return start, text[body : end if end != -1 else len(text)]


def _last_boxed(text: str) -> tuple[int, str] | None:
    if "\\boxed" not in text:
        return None
    # One pass pairs every brace, so nested and unbalanced braces cost linear time.
    closing, open_stack = {}, []
    for brace in _BRACE_RE.finditer(text):
        if brace.group() == "{":
            open_stack.append(brace.start())
        elif open_stack:
            closing[open_stack.pop()] = brace.start()
    for box in reversed(list(_BOXED_RE.finditer(text))):
        open_at = box.end() - 1
        if open_at in closing:
            return box.start(), text[open_at + 1 : closing[open_at]]
    return None


def boxed_answer(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` in `text` (braces may nest), or None."""
    found = _last_boxed(text)
    return None if found is None else found[1]


def extract_answer(completion: str, *, last_number_fallback: bool = False) -> str | None:
    """The model's final answer text: the last explicit marker's content, else (if allowed) the
    last number in the completion, else None."""
    markers = (_last_answer_tag, _last_boxed, _last_hashes)
    explicit = [found for find in markers if (found := find(completion)) is not None]
    if explicit:
        return max(explicit)[1].strip()  # the marker that starts last
    if last_number_fallback:
        match = _last_number_match(_normalise(completion))
        return None if match is None else match.group().strip()
    return None


def answer_key(completion: str, *, last_number_fallback: bool = False) -> str | None:
    """A reply's final answer as a vote (majority voting): a number by its value, so `$18`,
    `18.0` and `18` vote alike, else the answer's text with its spaces collapsed; None when the
    reply has no answer."""
    answer = extract_answer(completion, last_number_fallback=last_number_fallback)
    if answer is None:
        return None
    if is_plain_number(answer):
        value = parse_number(answer)
        if value is not None:
            return f"{value:.12g}"
    return " ".join(answer.split())


def extract_reference_answer(answer_text: str) -> str:
    """The final answer of a GSM8K `answer` string: what follows its last `####`, as written."""
    _, hashes, final = answer_text.rpartition(_HASHES)
    final = final.strip()
    if not hashes or not final:
        raise ValueError(f"GSM8K answer has no final '#### N': ...{answer_text[-80:]!r}")
    return final


# How a reply's final answer is compared with the reference: as numbers (GSM8K), or as math
# (numbers, then symbolic equivalence through the math-verify package, for MATH-style answers).
ANSWER_MATCHES = ("numeric", "math_verify")


def check_answer_match(match: str) -> None:
    """ValueError unless `match` is an answer match this environment can run."""
    if match not in ANSWER_MATCHES:
        raise ValueError(f"answer match must be one of {', '.join(ANSWER_MATCHES)}, got {match!r}")
    if match == "math_verify" and importlib.util.find_spec("math_verify") is None:
        raise ValueError(
            "answer match 'math_verify' needs the math-verify package: pip install "
            "math-verify (or grpo[math])"
        )


def is_correct(
    completion: str,
    example: Mapping[str, Any],
    *,
    last_number_fallback: bool = False,
    match: str = "numeric",
) -> bool:
    """Whether the completion's final answer equals the example's reference answer: as numbers,
    or with `match="math_verify"` also as equivalent math (`\\frac{1}{2}` = 0.5, `2x+1` = 1+2x)."""
    reference = extract_reference_answer(example["answer"])
    predicted = extract_answer(completion, last_number_fallback=last_number_fallback)
    if match == "numeric":
        if not is_plain_number(reference):
            raise ValueError(f"reference answer is not a number: {reference!r}")
        return predicted is not None and _numbers_equal(predicted, reference)
    check_answer_match(match)
    if predicted is None:
        return False
    if is_plain_number(reference) and _numbers_equal(predicted, reference):  # GSM8K's rule
        return True
    return _math_verify_equal(predicted, reference)


def is_plain_number(text: str) -> bool:
    """Whether `text` is one number as GSM8K writes them (`-1,234.5`, `$18`, `3/4`, `25%`)."""
    number = _normalise(text).strip().removesuffix("%").rstrip()
    return _NUMBER_RE.fullmatch(number) is not None


NUMERIC_REWARDS = ("correctness", "correctness_last_number")  # need plain-number references


def check_numeric_references(examples: Sequence[Mapping[str, Any]], where: str) -> None:
    """One-line ValueError naming the first example whose reference answer is not a number."""
    for i, example in enumerate(examples):
        reference = extract_reference_answer(example["answer"])
        if not is_plain_number(reference):
            raise ValueError(
                f"{where} example {i}: reference answer {reference!r} is not a number; for "
                "MATH-style answers set TrainConfig.answer_match='math_verify' and use the "
                "'correctness_math_verify' reward"
            )


def _numbers_equal(predicted: str, reference: str) -> bool:
    value, target = parse_number(predicted), parse_number(reference.replace(",", ""))
    return (
        value is not None
        and target is not None
        and math.isclose(value, target, rel_tol=_REL_TOL, abs_tol=_ABS_TOL)
    )


def _math_verify_equal(predicted: str, reference: str) -> bool:
    import math_verify  # optional; check_answer_match said whether it is installed

    parse = functools.partial(math_verify.parse, parsing_timeout=None)
    # Both are read as one formula each (`$2x+1$`): prose around the math defeats the parser.
    gold, target = parse(_as_latex(reference)), parse(_as_latex(predicted))
    return math_verify.verify(gold, target, timeout_seconds=None)


class _TimeLimitsAreOurs(logging.Filter):
    """Drops math-verify's warning that its time limits are off: this module sets the limits."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_TimeLimitsAreOurs())


def _as_latex(text: str) -> str:
    """`text` inside `$...$` unless it already holds math delimiters."""
    return text if any(d in text for d in ("$", "\\(", "\\[")) else f"${text}$"


# --------------------------------------------------------------------------- reward functions

_TAGS = ("<think>", "</think>", _ANSWER_OPEN, _ANSWER_CLOSE)


def correctness(completion: str, example: Mapping[str, Any]) -> float:
    """1.0 when an explicit answer marker holds the reference answer, else 0.0."""
    return float(is_correct(completion, example))


def correctness_last_number(completion: str, example: Mapping[str, Any]) -> float:
    """Like `correctness`, but without markers the last number in the text is the answer."""
    return float(is_correct(completion, example, last_number_fallback=True))


def correctness_math_verify(completion: str, example: Mapping[str, Any]) -> float:
    """Like `correctness`, but answers also match as equivalent math (MATH-style references)."""
    return float(is_correct(completion, example, match="math_verify"))


def strict_format(completion: str, example: Mapping[str, Any]) -> float:
    """1.0 for exactly `<think>...</think>\\n<answer>...</answer>` (blanks allowed at the ends)."""
    text = completion.strip()
    # With each tag present once, these three checks pin the order of all four.
    matches = (
        all(text.count(tag) == 1 for tag in _TAGS)
        and text.startswith("<think>")
        and text.endswith(_ANSWER_CLOSE)
        and f"</think>\n{_ANSWER_OPEN}" in text
    )
    return float(matches)


def tag_count(completion: str, example: Mapping[str, Any]) -> float:
    """0.25 for each of `<think>`, `</think>`, `<answer>`, `</answer>` present exactly once."""
    return 0.25 * sum(completion.count(tag) == 1 for tag in _TAGS)


# The built-in reward functions by name (tests add theirs with monkeypatch.setitem). A name
# `module:function` imports the user's own instead (see `get_reward_fn`).
REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "correctness": correctness,
    "correctness_last_number": correctness_last_number,
    "correctness_math_verify": correctness_math_verify,
    "format": strict_format,
    "tag_count": tag_count,
}


# The built-in rewards that are an answer check, by `is_correct`'s (match, last_number_fallback):
# a run scoring one of them need not check the answers again for its accuracy.
ANSWER_CHECK_REWARDS = {
    ("numeric", False): "correctness",
    ("numeric", True): "correctness_last_number",
    ("math_verify", False): "correctness_math_verify",
}

OVERLONG = "overlong"  # the length penalty's name among the per-function rewards
LENGTH_REWARD = "length_reward"  # Kimi k1.5's length reward's
# A learned reward model's (grpo/phases/reward_model.py): scored on the mesh, not by a function.
# More than one: 'reward_model/<scope>' each, read by gin's <scope>/make_reward_model.
REWARD_MODEL = "reward_model"
OVERLONG_WEIGHT = 1.0


def reward_model_scope(name: str) -> str | None:
    """The gin scope of the reward model a `make_rewards.names` entry names: '' for
    'reward_model', 'helpful' for 'reward_model/helpful'; None for a function's name."""
    head, slash, scope = name.partition("/")
    if head != REWARD_MODEL:
        return None
    if slash and not scope.isidentifier():
        raise ValueError(f"RewardConfig: {name!r} needs a gin scope name after '/'")
    return scope


def get_reward_fn(name: str) -> RewardFn:
    """The registered reward function called `name`, or with `module:function` (e.g.
    `my_rewards:brevity`, the module importable on every host) that function; ValueError with
    the reason otherwise."""
    return knobs.named_function(name, REWARD_FUNCTIONS, "reward function")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """A weighted set of registered reward functions; the defaults are the reference run's."""

    names: tuple[str, ...] = ("correctness", "format", "tag_count")
    weights: tuple[float, ...] = (1.0, 0.5, 0.5)
    # DAPO's soft overlong punishment over the last `overlong_buffer` tokens of the budget
    # (0: off), added to the total with `overlong_weight`; see `overlong_penalty`.
    overlong_buffer: int = 0
    overlong_weight: float = OVERLONG_WEIGHT
    # Kimi k1.5's length reward within each group (see `length_reward`), added to the total
    # with this weight (0: off; the paper uses it after a warm-up phase).
    length_reward_weight: float = 0.0

    def __post_init__(self) -> None:
        knobs.check_fields(self, "RewardConfig")
        # gin hands over lists; tuples keep the config hashable.
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.names or len(self.names) != len(self.weights):
            raise ValueError(
                f"RewardConfig needs one weight per reward function and at least one function; "
                f"got names={self.names} weights={self.weights}"
            )
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"RewardConfig names repeat: {self.names}")
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"RewardConfig weights must be finite: {self.weights}")
        for name in self.names:
            if reward_model_scope(name) is None:
                get_reward_fn(name)
        if "correctness_math_verify" in self.names:
            check_answer_match("math_verify")
        if self.overlong_buffer < 0 or not math.isfinite(self.overlong_weight):
            raise ValueError(
                f"RewardConfig overlong_buffer must be >= 0 and overlong_weight finite; got "
                f"{self.overlong_buffer} and {self.overlong_weight}"
            )
        if not self.overlong_buffer and self.overlong_weight != OVERLONG_WEIGHT:
            raise ValueError("RewardConfig overlong_weight needs overlong_buffer > 0 (else unused)")
        if self.overlong_buffer and OVERLONG in self.names:
            raise ValueError(f"RewardConfig: {OVERLONG!r} names the length penalty, not a function")
        if not math.isfinite(self.length_reward_weight):
            raise ValueError(
                f"RewardConfig length_reward_weight must be finite, got {self.length_reward_weight}"
            )
        if self.length_reward_weight and LENGTH_REWARD in self.names:
            raise ValueError(f"RewardConfig: {LENGTH_REWARD!r} names the length reward")

    def term_weights(self) -> dict[str, float]:
        """The weight of each term of a reward total, by its name among the per-function
        rewards: the functions', then the overlong penalty's and the length reward's when on."""
        weights = dict(zip(self.names, self.weights, strict=True))
        if self.overlong_buffer:
            weights[OVERLONG] = self.overlong_weight
        if self.length_reward_weight:
            weights[LENGTH_REWARD] = self.length_reward_weight
        return weights


# --------------------------------------------------------------------------- time-limited calls

_POOL_SIZE = 4  # the GIL serialises pure-Python rewards; threads exist only to enforce limits
_MAX_THREADS = 32  # workers plus threads lost to calls that never returned
_POLL_S = 0.05


@dataclasses.dataclass(eq=False)
class _Call:
    fn: Callable[..., Any]  # returns the call's value: a reward, a batch's rewards, a flag
    args: tuple[Any, ...]
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    started_at: float | None = None
    finished: bool = False  # guarded by the pool's lock, like `abandoned`
    abandoned: bool = False


def _as_reward(value: Any) -> float:
    reward = float(value)
    if not math.isfinite(reward):
        raise ValueError(f"reward is not finite: {reward}")
    return reward


def _one_reward(fn: RewardFn) -> Callable[[str, Mapping[str, Any]], float]:
    return lambda completion, example: _as_reward(fn(completion, example))


def _batch_of_rewards(fn: BatchedRewardFn, size: int) -> Callable[..., np.ndarray]:
    def call(completions: list[str], examples: list[Mapping[str, Any]]) -> np.ndarray:
        values = np.asarray(fn(completions, examples), np.float64)
        if values.shape != (size,):
            raise ValueError(f"returned {values.shape} rewards for {size} completions")
        return values

    return call


class _DaemonPool:
    """A bounded pool of daemon threads that keeps working when calls never return.

    Python cannot kill a thread. A call past its limit is abandoned: its thread runs on, a
    replacement thread takes its place while fewer than `max_threads` exist, and the stuck
    thread exits if the call ever returns. Once every thread is stuck, calls are refused rather
    than waited on. Daemon threads never block interpreter exit (ThreadPoolExecutor's do).
    A call stuck inside one GIL-holding C operation (a catastrophic regex) stalls every thread
    until it returns; no thread pool can help there, so the regexes above are linear-time.
    """

    def __init__(self, size: int, max_threads: int):
        self._size, self._max_threads = size, max_threads
        self._queue: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._stuck = 0

    def live_workers(self) -> int:
        with self._lock:
            return self._threads - self._stuck

    def submit(self, calls: Sequence[_Call]) -> None:
        with self._lock:
            self._top_up()
        for call in calls:
            self._queue.put(call)

    def abandon(self, call: _Call) -> None:
        with self._lock:
            if call.finished:
                return
            call.abandoned = True
            self._stuck += 1
            self._top_up()

    def _top_up(self) -> None:  # caller holds the lock
        while self._threads - self._stuck < self._size and self._threads < self._max_threads:
            threading.Thread(target=self._work, name="reward-worker", daemon=True).start()
            self._threads += 1

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            if not call.future.set_running_or_notify_cancel():
                continue
            call.started_at = time.monotonic()
            try:
                outcome: Any = call.fn(*call.args)
            except Exception as e:  # a bad completion or reward function must not stop the run
                outcome = e
            with self._lock:
                call.finished = True
                lost = call.abandoned
                if lost:
                    self._stuck -= 1
                    self._threads -= 1
            if isinstance(outcome, Exception):
                call.future.set_exception(outcome)
            else:
                call.future.set_result(outcome)
            if lost:
                return


_POOL = _DaemonPool(_POOL_SIZE, _MAX_THREADS)


def _settle(
    call: _Call, now: float, timeout_s: float, pool: _DaemonPool
) -> tuple[float, str | None] | None:
    """(reward, failure reason or None) once the call is decided; None while it may still run."""
    if call.future.done():
        error = call.future.exception()
        if error is not None:
            return 0.0, f"{type(error).__name__}: {error}"
        return call.future.result(), None
    if call.started_at is not None and now - call.started_at > timeout_s:
        pool.abandon(call)
        return 0.0, f"timed out after {timeout_s:g} s"
    if call.started_at is None and pool.live_workers() == 0 and call.future.cancel():
        return 0.0, "not run: every reward worker is stuck on an earlier call"
    return None


def run_guarded(
    fn: Callable[..., Any], arg_tuples: Sequence[tuple[Any, ...]], timeout_s: float
) -> list[tuple[Any, str | None]]:
    """`fn(*args)` for each of `arg_tuples` on the reward workers, each under `timeout_s`:
    (its value, None), or (None, why) where it raised or overran. For host calls that must not
    stop or stall the run (the tools' too)."""
    outcomes = _run_with_timeouts([_Call(fn, args) for args in arg_tuples], timeout_s, _POOL)
    return [(None, reason) if reason else (value, None) for value, reason in outcomes]


def _run_with_timeouts(
    calls: Sequence[_Call], timeout_s: float, pool: _DaemonPool
) -> list[tuple[float, str | None]]:
    """Runs every call on the pool; each gets `timeout_s` from the moment a worker starts it."""
    pool.submit(calls)
    outcomes: list[tuple[float, str | None]] = [(0.0, None)] * len(calls)
    pending = set(range(len(calls)))
    while pending:
        now = time.monotonic()
        deadlines = [
            calls[i].started_at + timeout_s for i in pending if calls[i].started_at is not None
        ]
        wait_s = min([d - now for d in deadlines] + [_POLL_S])
        concurrent.futures.wait([calls[i].future for i in pending], timeout=max(wait_s, 0.0))
        now = time.monotonic()
        for i in list(pending):
            outcome = _settle(calls[i], now, timeout_s, pool)
            if outcome is not None:
                outcomes[i] = outcome
                pending.discard(i)
    return outcomes


# --------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class RewardResult:
    total: np.ndarray  # float32 [B]: the weighted sum
    per_function: dict[str, np.ndarray]  # name -> float32 [B], unweighted
    failures: dict[str, int]  # name -> completions where it raised or overran (scored 0)


def score(
    completions: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    *,
    rewards: RewardConfig,
    timeout_s: float = 5.0,
    scored: Mapping[str, np.ndarray] | None = None,
) -> RewardResult:
    """Scores completion i against examples[i] with every function in `rewards`; a name in
    `scored` (the reward model's) takes those values instead of a call."""
    scored = scored or {}
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    batch = len(completions)
    plans = [
        [] if name in scored else _reward_calls(get_reward_fn(name), completions, examples)
        for name in rewards.names
    ]
    outcomes = _run_with_timeouts([call for plan in plans for call in plan], timeout_s, _POOL)
    total_B = np.zeros(batch, np.float32)
    per_function, failures = {}, {}
    start = 0
    for name, weight, plan in zip(rewards.names, rewards.weights, plans, strict=True):
        chunk, start = outcomes[start : start + len(plan)], start + len(plan)
        if name in scored:  # a non-finite score fails its row, as a batched function's
            rows = _batch_rows((np.asarray(scored[name]).reshape(batch), None), batch)
        else:
            rows = chunk if len(plan) == batch else _batch_rows(chunk[0], batch)
        per_function[name] = np.array([reward for reward, _ in rows], np.float32)
        total_B += np.float32(weight) * per_function[name]
        failures[name] = _log_failures(f"reward {name!r}", rows, "scored 0")
    return RewardResult(total=total_B, per_function=per_function, failures=failures)


def _reward_calls(
    fn: RewardFn | BatchedRewardFn,
    completions: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
) -> list[_Call]:
    """One call per completion, or one for the whole batch when `fn` is batched."""
    if is_batched(fn):
        return [_Call(_batch_of_rewards(fn, len(completions)), (list(completions), list(examples)))]
    return [_Call(_one_reward(fn), pair) for pair in zip(completions, examples, strict=True)]


def _batch_rows(outcome: tuple[Any, str | None], batch: int) -> list[tuple[float, str | None]]:
    """A batched call's outcome as one (reward, failure) per row; a non-finite reward fails
    only its row, a failed call every row."""
    values, reason = outcome
    if reason is not None:
        return [(0.0, reason)] * batch
    return [
        (float(v), None) if math.isfinite(v) else (0.0, f"reward is not finite: {v}")
        for v in values
    ]


def check_answers(
    completions: Sequence[str],
    examples: Sequence[Mapping[str, Any]],
    *,
    match: str = "numeric",
    last_number_fallback: bool = False,
    timeout_s: float = 5.0,
) -> np.ndarray:
    """bool [B]: `is_correct` for completion i and examples[i]. Each check runs under the same
    time limit as a reward; one that raises or overruns counts as wrong and is logged."""
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    check = functools.partial(is_correct, match=match, last_number_fallback=last_number_fallback)
    calls = [_Call(check, pair) for pair in zip(completions, examples, strict=True)]
    outcomes = _run_with_timeouts(calls, timeout_s, _POOL)
    _log_failures("the answer check", outcomes, "counted wrong")
    return np.array([value > 0 for value, _ in outcomes], bool)


def _log_failures(what: str, outcomes: Sequence[tuple[float, str | None]], scored_as: str) -> int:
    """Logs how many calls failed and the first reason; returns the count."""
    reasons = [reason for _, reason in outcomes if reason is not None]
    if reasons:
        _logger.warning(
            "%s failed on %d of %d completions (%s); first: %s",
            what,
            len(reasons),
            len(outcomes),
            scored_as,
            reasons[0],
        )
    return len(reasons)


def overlong_penalty(lengths_B: np.ndarray, *, max_length: int, buffer: int) -> np.ndarray:
    """DAPO's soft overlong punishment, float32 [B]: 0 up to `max_length - buffer` tokens, then
    falling linearly to -1 at `max_length` (the token budget, so a truncated completion gets -1).
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in [1, {max_length}] tokens, got {buffer}")
    start = max_length - buffer
    return np.clip((start - np.asarray(lengths_B)) / buffer, -1.0, 0.0).astype(np.float32)


def add_overlong_penalty(
    result: RewardResult, lengths_B: np.ndarray, *, rewards: RewardConfig, max_length: int
) -> RewardResult:
    """`result` with the weighted overlong penalty in its total and, unweighted, among its
    per-function rewards; unchanged when `rewards.overlong_buffer` is 0."""
    if not rewards.overlong_buffer:
        return result
    penalty_B = overlong_penalty(lengths_B, max_length=max_length, buffer=rewards.overlong_buffer)
    return _with_term(result, OVERLONG, penalty_B, rewards.overlong_weight)


def length_reward(lengths_B: np.ndarray, correct_B: np.ndarray, *, group_size: int) -> np.ndarray:
    """Kimi k1.5's length reward, float32 [B]. Within each group of `group_size` replies,
    lambda = 0.5 - (len - min len) / (max len - min len) (0 when the lengths are all equal): a
    right reply gets lambda, a wrong one min(0, lambda), so short right answers gain and long
    wrong ones lose."""
    lengths_GxN = np.asarray(lengths_B, np.float64).reshape(-1, group_size)
    shortest = lengths_GxN.min(axis=1, keepdims=True)
    spread = lengths_GxN.max(axis=1, keepdims=True) - shortest
    lam = np.where(spread > 0, 0.5 - (lengths_GxN - shortest) / np.maximum(spread, 1), 0.0)
    correct_GxN = np.asarray(correct_B, bool).reshape(-1, group_size)
    return np.where(correct_GxN, lam, np.minimum(lam, 0.0)).reshape(-1).astype(np.float32)


def add_length_reward(
    result: RewardResult,
    lengths_B: np.ndarray,
    correct_B: np.ndarray,
    *,
    rewards: RewardConfig,
    group_size: int,
) -> RewardResult:
    """`result` with the weighted length reward in its total and, unweighted, among its
    per-function rewards; unchanged when `rewards.length_reward_weight` is 0."""
    if not rewards.length_reward_weight:
        return result
    reward_B = length_reward(lengths_B, correct_B, group_size=group_size)
    return _with_term(result, LENGTH_REWARD, reward_B, rewards.length_reward_weight)


def _with_term(result: RewardResult, name: str, values_B: np.ndarray, weight: float):
    return dataclasses.replace(
        result,
        total=result.total + np.float32(weight) * values_B,
        per_function={**result.per_function, name: values_B},
    )
