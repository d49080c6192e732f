"""GSM8K-format examples (hub, local files or synthetic) and a resumable, sharded prompt stream.

`load_examples` returns `[{"question": str, "answer": str}, ...]`, every answer holding `####`,
whatever columns and answer format the source uses (`Columns`).

`PromptStream` yields this process's share of each global batch of prompts. Order: a permutation
of the examples drawn from `(seed, epoch)`, fresh every epoch; the last partial global batch of an
epoch is dropped. Its position, `{"epoch": e, "index": i}` (i = examples of epoch e's permutation
already consumed by all processes together), is all a checkpoint needs to resume exactly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from grpo.data import synthetic
from grpo.phases import reward

Example = dict[str, Any]  # "question" and "answer" (str), and any kept fields

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SYNTHETIC_SIZES = {"train": 2000, "test": 500}


ANSWER_FORMATS = ("gsm8k", "boxed", "final")


@dataclasses.dataclass(frozen=True)
class Columns:
    """Where a row keeps its problem and its reference answer, and what that answer holds.

    `question` and `answer` name columns; a dotted name reads a nested field
    (`reward_model.ground_truth`). A question held as a chat prompt of one user turn (verl's
    `prompt: [{"role": "user", "content": ...}]`) reads as that turn's content.
    `answer_format` is one of:
      - `gsm8k`: reasoning ending in a `#### <final answer>` line;
      - `boxed`: a worked solution whose last `\\boxed{...}` is the final answer (MATH);
      - `final`: the final answer alone (a string or a number).
    Every format becomes a GSM8K-format answer ending in `#### <final answer>`. `keep` names
    more fields each example carries under the same name, for custom reward functions (test
    cases, a difficulty level); their values must be JSON (processes exchange examples).
    """

    question: str = "question"
    answer: str = "answer"
    answer_format: str = "gsm8k"
    keep: tuple[str, ...] = ()

    def __post_init__(self):
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(
                f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, "
                f"got {self.answer_format!r}"
            )
        if not self.question or not self.answer:
            raise ValueError(f"question and answer column names must be set, got {self}")
        object.__setattr__(self, "keep", tuple(self.keep))  # gin hands over lists
        if {"question", "answer"} & set(self.keep) or len(set(self.keep)) != len(self.keep):
            raise ValueError(f"kept fields must be distinct, not question or answer: {self.keep}")


def load_examples(
    source: str,
    split: str,
    *,
    num_examples: int | None = None,
    config: str | None = "main",
    seed: int = 0,
    difficulty: int = 1,
    templates: Sequence[str] | None = None,
    cache_dir: str | None = None,
    columns: Columns = Columns(),
    row_filter: Mapping[str, Sequence[Any]] | None = None,
) -> list[Example]:
    """Loads `split` of `source` as validated `{"question", "answer"}` dicts.

    `source` is one of:
      - `"synthetic"`: generated problems (`seed`, `difficulty`, `templates`; `num_examples`
        defaults to 2000 train / 500 test);
      - a `.jsonl`, `.json` or `.parquet` file (holds one split; `split` is not used);
      - a directory with `{split}.jsonl`, `{split}.json`, `{split}.parquet` or
        `{split}-*.parquet` (the hub's shard naming);
      - otherwise a Hugging Face hub id such as `"openai/gsm8k"` with `config` (needs network).
    A path is recognised as local when it exists, has one of the suffixes above, or starts with
    `/`, `.` or `~`; a missing one raises FileNotFoundError. `num_examples` keeps the first n
    rows. `cache_dir` is the `datasets` cache (default: its own). `columns` says where a file's
    or the hub's rows keep the problem and the answer (see `Columns`). `row_filter` keeps only
    the rows whose fields (dotted names too) hold one of the listed values, before the cap:
    `{"level": ["Level 4", "Level 5"]}`.
    """
    if num_examples is not None and num_examples < 0:  # rows[:-n] would drop the last n
        raise ValueError(f"{split}: num_examples must be >= 0 (None: all), got {num_examples}")
    if source == "synthetic":
        if columns != Columns() or row_filter:
            raise ValueError(f"synthetic problems have no columns to map or filter: {columns}")
        n = _SYNTHETIC_SIZES.get(split, 0) if num_examples is None else num_examples
        return synthetic.generate_problems(
            n, seed=seed, split=split, difficulty=difficulty, templates=templates
        )
    path = Path(source).expanduser()
    if path.exists() or path.suffix in _FORMATS or source.startswith(("/", ".", "~")):
        file = _split_file(path, split)
        rows = _read_file(file, cache_dir)
        where = str(file)
    else:
        import datasets  # heavy; only needed on this path

        try:
            dataset = datasets.load_dataset(source, config, split=split, cache_dir=cache_dir)
        except (ConnectionError, FileNotFoundError) as err:  # offline, or no such dataset
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise FileNotFoundError(
                f"{source}: not a local file, and the Hugging Face Hub was unreachable or has "
                f"no such dataset ({first_line})"
            ) from err
        rows = dataset.to_list()
        where = f"{source}[{config}:{split}]"
    if row_filter:
        rows = _filtered(rows, row_filter, where)
    return validate_examples(rows[:num_examples], where, columns)


def _filtered(rows: list[dict], row_filter: Mapping[str, Sequence[Any]], where: str) -> list[dict]:
    kept = [
        row
        for row in rows
        if all(_field(row, name) in tuple(values) for name, values in row_filter.items())
    ]
    if not kept:
        raise ValueError(f"{where}: no row matches the row filter {dict(row_filter)}")
    logging.info("%s: %d of %d rows match the row filter", where, len(kept), len(rows))
    return kept


def validate_examples(
    rows: Sequence[dict], where: str, columns: Columns = Columns()
) -> list[Example]:
    """GSM8K-format `{"question", "answer"}` dicts from `rows`, read as `columns` says; a
    one-line ValueError naming the row when one lacks a usable question or answer."""
    if not rows:
        raise ValueError(f"{where}: no examples")
    examples = []
    for i, row in enumerate(rows):
        try:
            examples.append(
                {
                    "question": _question(row, columns),
                    "answer": _gsm8k_answer(row, columns),
                    **{name: _kept(row, name) for name in columns.keep},
                }
            )
        except ValueError as e:
            raise ValueError(f"{where}: row {i}: {e}") from None
    return examples


def _field(row: dict, name: str) -> object:
    value: object = row
    for key in name.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _kept(row: dict, name: str) -> object:
    value = _field(row, name)
    if value is None:
        raise ValueError(f"missing kept field {name!r}")
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise ValueError(f"kept field {name!r} is a {type(value).__name__}, not JSON") from None
    return value


def _question(row: dict, columns: Columns) -> str:
    question = _field(row, columns.question)
    if isinstance(question, list):  # a chat prompt, e.g. verl's [{"role": "user", ...}]
        question = _user_turn(question, columns.question)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"missing, empty or non-string {columns.question!r}")
    return question


def _user_turn(messages: list, name: str) -> object:
    """The content of a chat prompt that is one user turn; our chat template wraps it again."""
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles != ["user"]:
        raise ValueError(
            f"{name!r} is a chat prompt with turns {roles}; only one user turn is read (set "
            "TrainConfig.system_prompt for a system turn)"
        )
    return messages[0].get("content")


def _gsm8k_answer(row: dict, columns: Columns) -> str:
    value, name = _field(row, columns.answer), repr(columns.answer)
    if columns.answer_format == "final":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f"missing or non-scalar {name}")
        final = " ".join(str(value).split())
        if not final:
            raise ValueError(f"empty {name}")
        return f"#### {final}"
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"missing, empty or non-string {name}")
    if columns.answer_format == "boxed":
        final = reward.boxed_answer(value)
        if final is None or not final.strip():
            raise ValueError(f"{name} has no \\boxed{{...}} final answer")
        return f"{value}\n#### {' '.join(final.split())}"
    if "####" not in value:
        raise ValueError(f"{name} has no '#### <number>' final line")
    return value


def _split_file(path: Path, split: str) -> Path:
    if path.is_file():
        if path.suffix not in _FORMATS:
            raise ValueError(f"{path}: unsupported file type (use {', '.join(_FORMATS)})")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    candidates = [path / f"{split}{suffix}" for suffix in _FORMATS]
    candidates += sorted(path.glob(f"{split}-*.parquet"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no {split}.jsonl, {split}.json or {split}[-*].parquet")


def _read_file(file: Path, cache_dir: str | None) -> list[dict]:
    import datasets  # heavy; only needed on this path
    import pyarrow

    builder = _FORMATS[file.suffix]
    if not file.stat().st_size:  # `datasets` raises a bare StopIteration
        raise ValueError(f"{file}: the file is empty")
    try:
        dataset = datasets.load_dataset(
            builder, data_files=str(file), split="train", cache_dir=cache_dir
        )
    except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException) as e:
        cause = e.__cause__ or e
        message = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ValueError(f"{file}: cannot read as {builder}: {message}") from e
    return dataset.to_list()


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """How a prompt stream batches and shards. `batch_size` counts prompts per process."""

    batch_size: int
    seed: int = 0
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.batch_size < 1 or self.seed < 0:
            raise ValueError(f"need batch_size >= 1 and seed >= 0, got {self}")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {self}")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.process_count


def epoch_order(
    num_examples: int, seed: int, epoch: int, retired: Sequence[Sequence[int]] = ()
) -> np.ndarray:
    """The order of epoch `epoch`: a permutation seeded by the pair, so (s, e+1) != (s+1, e),
    less the examples retired in an earlier epoch (`retired`: [example, epoch] pairs)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    gone = [example for example, when in retired if when < epoch]
    return order[~np.isin(order, gone)] if gone else order


def check_position(position: dict, num_examples: int) -> tuple[int, int]:
    """Validates a saved `{"epoch", "index"}` position (with `"retired"`: [example, epoch]
    pairs, when a run retires solved prompts) and returns (epoch, index)."""
    epoch, index = position.get("epoch"), position.get("index")
    retired = position.get("retired", [])
    if not {"epoch", "index"} <= set(position) <= {"epoch", "index", "retired"} or not all(
        isinstance(v, int) and v >= 0 for v in (epoch, index)
    ):
        raise ValueError(f"bad stream position {position!r}: want {{'epoch': e, 'index': i}}")
    if not all(_is_retirement(pair) for pair in retired):
        raise ValueError(f"bad stream position {position!r}: want 'retired': [[example, epoch]]")
    if index > num_examples or any(example >= num_examples for example, _ in retired):
        raise ValueError(f"bad stream position {position!r}: only {num_examples} examples")
    return epoch, index


def _is_retirement(pair: Any) -> bool:
    """Whether `pair` is [example index, epoch it was retired in]."""
    return (
        isinstance(pair, list | tuple)
        and len(pair) == 2
        and all(isinstance(v, int) and v >= 0 for v in pair)
    )


def _unretired_order(
    num_examples: int, spec: StreamSpec, epoch: int, retired: Sequence[Sequence[int]]
) -> np.ndarray:
    """Epoch `epoch`'s order less its retired examples, or with all of them when the rest do
    not fill one global batch."""
    order = epoch_order(num_examples, spec.seed, epoch, retired)
    if len(order) < spec.global_batch_size:
        return epoch_order(num_examples, spec.seed, epoch)
    return order


def batch_indices(num_examples: int, spec: StreamSpec, position: dict) -> tuple[list[int], dict]:
    """The example indices of this process's slice of the global batch at `position`, and the
    position after it. An epoch whose unretired examples do not fill one global batch takes
    every example again."""
    if num_examples < spec.global_batch_size:
        raise ValueError(
            f"{num_examples} examples is fewer than one global batch ({spec.global_batch_size})"
        )
    epoch, index = check_position(position, num_examples)
    order = _unretired_order(num_examples, spec, epoch, position.get("retired", []))
    if index + spec.global_batch_size > len(order):  # drop the epoch's partial last batch
        epoch, index = epoch + 1, 0
        order = _unretired_order(num_examples, spec, epoch, position.get("retired", []))
        if len(order) == num_examples and position.get("retired"):
            logging.warning("epoch %d: too few unretired examples for a batch; taking all", epoch)
    start = index + spec.process_index * spec.batch_size
    after = {**position, "epoch": epoch, "index": index + spec.global_batch_size}
    return order[start : start + spec.batch_size].tolist(), after


class PromptStream(Iterator[list[Example]]):
    """Endless iterator over this process's prompt batches; `position` saves, `restore` resumes.

    `retire` takes examples out of every later epoch (e.g. prompts the policy always solves);
    the position carries them, so a resumed stream retires the same ones."""

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        position: dict | None = None,
    ):
        self.examples = examples
        self.spec = StreamSpec(batch_size, seed, process_index, process_count)
        self._position: dict = {"epoch": 0, "index": 0}
        self.last_indices: list[int] = []  # the example indices of the last batch
        if position is not None:
            self.restore(position)

    @property
    def position(self) -> dict:
        """Where the next batch starts; JSON-serialisable and the same on every process."""
        return json.loads(json.dumps(self._position))

    def restore(self, position: dict) -> None:
        check_position(position, len(self.examples))
        self._position = json.loads(json.dumps(position))

    @property
    def num_retired(self) -> int:
        """How many examples have been retired so far."""
        return len(self._position.get("retired", []))

    def retire(self, indices: Sequence[int]) -> None:
        """Leaves the examples at `indices` out of every epoch after the current one. Every
        process must retire the same indices, so that their positions stay equal."""
        retired = self._position.get("retired", [])
        known = {example for example, _ in retired}
        epoch = self._position["epoch"]
        new = [[i, epoch] for i in sorted(set(map(int, indices)) - known)]
        if new:
            self._position["retired"] = retired + new

    def __next__(self) -> list[Example]:
        self.last_indices, self._position = batch_indices(
            len(self.examples), self.spec, self._position
        )
        return [self.examples[i] for i in self.last_indices]
