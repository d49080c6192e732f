"""Loading GSM8K-format files and the resumable, sharded prompt stream."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpo.data.gsm8k import Columns, PromptStream, load_examples
from grpo.data.synthetic import generate_problems

ROWS = generate_problems(12, seed=0, split="train")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def load(tmp_path):
    """load_examples with a private datasets cache."""
    return lambda source, split="train", **kw: load_examples(
        str(source), split, cache_dir=str(tmp_path / "cache"), **kw
    )


@pytest.mark.parametrize(
    "name, write",
    [
        ("data.jsonl", _write_jsonl),
        ("data.json", _write_json),
        ("data.parquet", _write_parquet),
    ],
)
def test_file_round_trip(load, tmp_path, name, write):
    extra = [{**row, "id": i} for i, row in enumerate(ROWS)]  # extra columns are dropped
    path = tmp_path / name
    write(path, extra)
    assert load(path) == ROWS
    assert load(path, num_examples=5) == ROWS[:5]
    with pytest.raises(ValueError, match="num_examples must be >= 0"):
        load(path, num_examples=-1)  # not every row but the last


def test_directory_picks_each_split(load, tmp_path):
    test_rows = generate_problems(6, seed=0, split="test")
    _write_jsonl(tmp_path / "train.jsonl", ROWS)
    _write_parquet(tmp_path / "test-00000-of-00001.parquet", test_rows)  # the hub's shard name
    assert load(tmp_path, "train") == ROWS
    assert load(tmp_path, "test") == test_rows


def test_synthetic_source():
    assert load_examples("synthetic", "test", num_examples=7, seed=3, difficulty=2) == (
        generate_problems(7, seed=3, split="test", difficulty=2)
    )
    assert len(load_examples("synthetic", "train")) == 2000


@pytest.mark.parametrize(
    "bad_row, problem",
    [
        ({"question": "How many?"}, "row 2: missing, empty or non-string 'answer'"),
        ({"question": "How many?", "answer": "It is 4."}, "row 2: 'answer' has no '####"),
        ({"question": "", "answer": "#### 4"}, "row 2: missing, empty or non-string 'question'"),
    ],
)
def test_bad_row_names_file_and_row(load, tmp_path, bad_row, problem):
    path = _write_jsonl(tmp_path / "bad.jsonl", ROWS[:2] + [bad_row] + ROWS[2:4])
    with pytest.raises(ValueError) as error:
        load(path)
    assert str(error.value).startswith(f"{path}: {problem}")
    assert "\n" not in str(error.value)


# MATH-style rows (made up here): a worked solution ending in a box, nested braces inside it.
MATH_ROWS = [
    {"problem": "Halve 1.", "solution": "Half of 1 is $\\boxed{\\frac{1}{2}}$.", "level": 1},
    {"problem": "Root?", "solution": "So $x = \\boxed{\\frac{1}{\\sqrt{2}}}$.", "level": 2},
]


def test_boxed_solutions_become_gsm8k_answers(load, tmp_path):
    path = _write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    examples = load(path, columns=Columns("problem", "solution", "boxed"))
    assert examples == [
        {"question": "Halve 1.", "answer": MATH_ROWS[0]["solution"] + "\n#### \\frac{1}{2}"},
        {"question": "Root?", "answer": MATH_ROWS[1]["solution"] + "\n#### \\frac{1}{\\sqrt{2}}"},
    ]


def test_final_answers_from_a_nested_field(load, tmp_path):
    # verl-style rows: the reference under reward_model.ground_truth, a number or a string.
    rows = [
        {"prompt": "Sum?", "reward_model": {"ground_truth": 204, "style": "rule"}},
        {"prompt": "Set?", "reward_model": {"ground_truth": " \\{1,\n2\\} ", "style": "rule"}},
    ]
    path = _write_jsonl(tmp_path / "rl.jsonl", rows)
    examples = load(path, columns=Columns("prompt", "reward_model.ground_truth", "final"))
    assert examples == [
        {"question": "Sum?", "answer": "#### 204"},
        {"question": "Set?", "answer": "#### \\{1, 2\\}"},  # one line, so #### reads it all
    ]


def test_a_chat_prompt_of_one_user_turn_is_the_question(load, tmp_path):
    # verl's preprocessed parquet keeps the prompt as chat messages.
    rows = [{"prompt": [{"role": "user", "content": "Sum?"}], "reward_model": {"ground_truth": 4}}]
    path = _write_parquet(tmp_path / "rl.parquet", rows)
    examples = load(path, columns=Columns("prompt", "reward_model.ground_truth", "final"))
    assert examples == [{"question": "Sum?", "answer": "#### 4"}]


@pytest.mark.parametrize(
    "prompt, problem",
    [
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
            "'prompt' is a chat prompt with turns ['system', 'user']; only one user turn is read",
        ),
        ([{"role": "user", "content": ""}], "missing, empty or non-string 'prompt'"),
        (["q"], "'prompt' is a chat prompt with turns [None]"),
    ],
)
def test_other_chat_prompts_are_refused_naming_the_row(load, tmp_path, prompt, problem):
    rows = [{"prompt": [{"role": "user", "content": "Sum?"}], "a": 4}, {"prompt": prompt, "a": 4}]
    path = _write_jsonl(tmp_path / "rl.jsonl", rows)
    with pytest.raises(ValueError, match=re.escape(f"row 1: {problem}")):
        load(path, columns=Columns("prompt", "a", "final"))


@pytest.mark.parametrize(
    "columns, bad_row, problem",
    [
        (
            Columns("problem", "solution", "boxed"),
            {"problem": "p", "solution": "No box."},
            "'solution' has no \\boxed{...} final answer",
        ),
        (
            Columns("problem", "solution", "boxed"),
            {"problem": "p", "solution": "\\boxed{ }"},
            "'solution' has no \\boxed{...} final answer",
        ),
        (
            Columns("problem", "solution", "boxed"),
            {"solution": "\\boxed{1}"},
            "missing, empty or non-string 'problem'",
        ),
        (Columns("q", "a.b", "final"), {"q": "p", "a": {"b": None}}, "missing or non-scalar 'a.b'"),
        (Columns("q", "a.b", "final"), {"q": "p", "a": {"b": True}}, "missing or non-scalar 'a.b'"),
        (Columns("q", "a.b", "final"), {"q": "p", "a": {"b": "  "}}, "empty 'a.b'"),
    ],
)
def test_bad_row_in_other_columns_names_the_row(load, tmp_path, columns, bad_row, problem):
    path = tmp_path / "bad.json"
    _write_json(
        path,
        [MATH_ROWS[0] if columns.answer_format == "boxed" else {"q": "p", "a": {"b": 1}}, bad_row],
    )
    with pytest.raises(ValueError) as error:
        load(path, columns=columns)
    assert str(error.value) == f"{path}: row 1: {problem}"


def test_columns_refuse_an_unknown_answer_format():
    with pytest.raises(ValueError, match="answer_format must be one of gsm8k, boxed, final"):
        Columns(answer_format="latex")


def test_unreadable_file_is_one_line_error(load, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl: cannot read as json") as error:
        load(path)
    assert "\n" not in str(error.value)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the file is empty"):
        load(tmp_path / "empty.jsonl")


def test_a_hub_dataset_out_of_reach_is_one_line_error(load, monkeypatch):
    import datasets

    # The answer an offline machine gets, at once (asking the Hub here retries for ~25 s).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="no-such-dataset: not a local file, ") as error:
        load("grpo-tests/no-such-dataset")
    assert "\n" not in str(error.value)


def test_missing_paths(load, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such file or directory$"):
        load(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"no test\.jsonl"):
        load(tmp_path, "test")  # a directory without that split
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt: unsupported file type"):
        load(tmp_path / "notes.txt")


# ---- PromptStream ----

EXAMPLES = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(10)]


def _questions(batch):
    return [e["question"] for e in batch]


def _take(stream, n):
    return [_questions(next(stream)) for _ in range(n)]


def test_restore_continues_exactly():
    # 10 examples, global batch 3: 3 batches per epoch (one example dropped), so 8 batches span
    # three epochs and the restore point (after 4) sits inside the second epoch.
    uninterrupted = _take(PromptStream(EXAMPLES, batch_size=3, seed=5), 8)
    first = PromptStream(EXAMPLES, batch_size=3, seed=5)
    head = _take(first, 4)
    saved = json.loads(json.dumps(first.position))
    assert saved == {"epoch": 1, "index": 3}
    resumed = PromptStream(EXAMPLES, batch_size=3, seed=5, position=saved)
    assert head + _take(resumed, 4) == uninterrupted

    other = PromptStream(EXAMPLES, batch_size=3, seed=5)
    other.restore(saved)
    assert _take(other, 4) == uninterrupted[4:]


def test_processes_split_the_global_batch_disjointly():
    whole = PromptStream(EXAMPLES, batch_size=4, seed=1)
    shards = [
        PromptStream(EXAMPLES, batch_size=2, seed=1, process_index=p, process_count=2)
        for p in (0, 1)
    ]
    for _ in range(6):  # three epochs of two global batches
        global_batch = _questions(next(whole))
        parts = [_questions(next(s)) for s in shards]
        assert parts[0] + parts[1] == global_batch
        assert not set(parts[0]) & set(parts[1])
        assert shards[0].position == shards[1].position == whole.position


def test_each_epoch_is_a_fresh_permutation():
    examples = EXAMPLES[:8]  # divisible by the batch: every epoch covers all examples
    batches = _take(PromptStream(examples, batch_size=4, seed=2), 6)
    epochs = [batches[i] + batches[i + 1] for i in (0, 2, 4)]
    for order in epochs:
        assert sorted(order) == sorted(e["question"] for e in examples)
    assert len({tuple(order) for order in epochs}) == 3
    other_seed = _take(PromptStream(examples, batch_size=4, seed=3), 2)
    assert other_seed[0] + other_seed[1] != epochs[0]


def test_retired_examples_leave_the_later_epochs_only():
    # 10 examples, batch 3: 3 batches an epoch. Retiring 4 examples in epoch 0 leaves 6 (two
    # batches) for epoch 1; the rest of epoch 0 still holds them.
    stream = PromptStream(EXAMPLES, batch_size=3, seed=5)
    plain = _take(PromptStream(EXAMPLES, batch_size=3, seed=5), 3)
    first = _questions(next(stream))
    assert first == plain[0] and len(stream.last_indices) == 3
    assert [f"q{i}" for i in stream.last_indices] == first
    retired = stream.last_indices + [plain[2][0].removeprefix("q")]
    stream.retire([int(i) for i in retired] + stream.last_indices[:1])  # repeats count once
    assert stream.num_retired == 4
    assert _take(stream, 2) == plain[1:]
    epoch_1 = _take(stream, 2)
    assert stream.position["epoch"] == 1 and stream.position["index"] == 6
    gone = {f"q{i}" for i in retired}
    assert len(set(epoch_1[0] + epoch_1[1])) == 6 and not gone & set(epoch_1[0] + epoch_1[1])
    # The position carries the retired examples: a restored stream goes on alike.
    saved = json.loads(json.dumps(stream.position))
    resumed = PromptStream(EXAMPLES, batch_size=3, seed=5, position=saved)
    assert _take(resumed, 4) == _take(stream, 4)


def test_too_few_unretired_examples_take_every_example_again():
    stream = PromptStream(EXAMPLES, batch_size=3, seed=5)
    next(stream)
    stream.retire(range(8))  # 2 left: fewer than a batch
    _take(stream, 2)
    epoch_1 = _take(stream, 3)
    assert stream.position["epoch"] == 1
    assert len({q for batch in epoch_1 for q in batch}) == 9  # a whole epoch, as without


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=6, process_count=2), "fewer than one global batch"),
        (dict(batch_size=2, position={"epoch": 0, "index": 0, "retired": [[10, 0]]}), "only 10"),
        (dict(batch_size=2, position={"epoch": 0, "index": 0, "retired": [3]}), "want 'retired'"),
        (dict(batch_size=2, position={"epoch": 0, "index": 0, "done": []}), "bad stream position"),
        (dict(batch_size=2, process_index=2, process_count=2), "process_index < process_count"),
        (dict(batch_size=2, position={"epoch": 0}), "bad stream position"),
        (dict(batch_size=2, position={"epoch": 0, "index": 11}), "only 10 examples"),
    ],
)
def test_bad_stream_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        next(PromptStream(EXAMPLES, **kwargs))


def test_kept_fields_ride_along_for_the_rewards(load, tmp_path):
    rows = [
        {**row, "level": i, "meta": {"tests": ["assert f(1) == 2"]}}
        for i, row in enumerate(MATH_ROWS)
    ]
    path = _write_jsonl(tmp_path / "math.jsonl", rows)
    examples = load(
        path, columns=Columns("problem", "solution", "boxed", keep=("level", "meta.tests"))
    )
    tests = ["assert f(1) == 2"]
    assert [(e["level"], e["meta.tests"]) for e in examples] == [(0, tests), (1, tests)]
    assert set(examples[0]) == {"question", "answer", "level", "meta.tests"}
    with pytest.raises(ValueError, match="row 0: missing kept field 'grade'"):
        load(path, columns=Columns("problem", "solution", "boxed", keep=("grade",)))
    with pytest.raises(ValueError, match="kept fields must be distinct, not question or answer"):
        Columns(keep=("answer",))
    with pytest.raises(ValueError, match="synthetic problems have no columns to map"):
        load_examples("synthetic", "train", columns=Columns(keep=("level",)))


def test_row_filter_keeps_matching_rows_before_the_cap(load, tmp_path):
    rows = [
        {**row, "info": {"level": f"Level {i % 3}"}} for i, row in enumerate(ROWS)
    ]  # levels 0, 1, 2, 0, 1, 2, ...
    path = _write_jsonl(tmp_path / "levels.jsonl", rows)
    hard = {"info.level": ["Level 1", "Level 2"]}
    expected = [{"question": r["question"], "answer": r["answer"]} for r in ROWS]
    expected = [e for i, e in enumerate(expected) if i % 3]
    assert load(path, row_filter=hard) == expected
    assert load(path, row_filter=hard, num_examples=3) == expected[:3]  # the cap counts kept rows
    with pytest.raises(ValueError, match="no row matches the row filter"):
        load(path, row_filter={"info.level": ["Level 9"]})
    with pytest.raises(ValueError, match="synthetic problems have no columns to map or filter"):
        load_examples("synthetic", "train", row_filter=hard)
