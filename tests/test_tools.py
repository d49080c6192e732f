"""Tools a completion calls mid-reply (grpo.tools): the calculator, the call syntax, guarded
calls, the sampler's tool rounds (scripted, and on the tiny model), and a training run."""

import json
import os
import re
import time

import jax
import numpy as np
import pytest

from grpo import sampling, sharding, tools
from grpo.models import transformer as tf
from grpo.phases.rollout import NOT_KEPT
from grpo.tools import ToolCall as Call
from grpo.types import Rollout
from tests.forced_calls import first_rounds_call
from tests.test_train import REPO, _experiment, _train_in_process, length_reward  # noqa: F401

TOOLS = "make_tools.names=('calculator',)"
CHATML_TOOLS = os.path.join(REPO, "gin/templates/chatml_tools.jinja")
# The calculator in Qwen's format, for the tiny runs' SmolLM2 tokenizer: its own ChatML template
# has no tools, so the shipped ChatML-with-tools template replaces it.
HERMES = (
    TOOLS,
    "make_tools.call_format='hermes'",
    f"TrainConfig.chat_template_path='{CHATML_TOOLS}'",
    "TrainConfig.prompt_buckets=(384,)",  # the tools' schemas make the prompt ~300 tokens
)
# What follows the assistant's <|im_end|> after its calls, up to its next turn.
CHATML_TOOL_TURN = (
    "\n<|im_start|>user\n<tool_response>\n{output}\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
)
CHATML_BETWEEN_RESULTS = "\n</tool_response>\n<tool_response>\n"


@pytest.mark.parametrize(
    "expression, value",
    [
        ("2+3*4", "14"),
        ("(3 - 5) * 2", "-4"),
        ("7/2", "3.5"),
        ("10/4*2", "5"),  # a whole float prints as an integer
        ("1,234 + 6", "1240"),  # digit-group commas
        ("$12 x 3", "36"),
        ("6 × 7 ÷ 2", "21"),
        ("2^10", "1024"),
        ("17 // 5 + 17 % 5", "5"),
        ("0.1 + 0.2", "0.3"),  # 10 significant digits
        ("-2 ** 2", "-4"),
    ],
)
def test_calculator_values(expression, value):
    assert tools.calculator(expression) == value


@pytest.mark.parametrize(
    "expression, message",
    [
        ("1/0", "division by zero"),
        ("2**1000", "exponent 1000 beyond +-64"),
        ("9**60", "result out of range"),
        ("__import__('os')", "unsupported in an arithmetic expression"),
        ("x + 1", "not an arithmetic expression"),  # `x` multiplies: '* + 1'
        ("12,5", "unsupported"),  # a tuple, not a number
        ("1" * 201, "longer than 200 characters"),
    ],
)
def test_calculator_refuses(expression, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tools.calculator(expression)


def test_find_calls_reads_the_first_closed_call():
    config = tools.ToolConfig(names=("calculator", "tests.test_tools:echo"))
    assert config.round_stops == ("</calculator>", "</echo>")
    assert config.find_calls("so <calculator>2+3</calculator>") == [Call("calculator", "2+3")]
    assert config.find_calls("<echo>a</echo><calculator>1</calculator>") == [
        Call("tests.test_tools:echo", "a")
    ]
    assert config.find_calls("<calculator>1</calculator>> then") == [Call("calculator", "1")]
    assert config.find_calls("no call <calculator>2") == []
    assert config.find_calls("2+3</calculator>") == [
        Call("calculator", None, "</calculator> without <calculator>")
    ]


def _hermes(name, arguments):
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def test_find_calls_reads_every_hermes_json_call_of_the_turn():
    config = tools.ToolConfig(names=("calculator", "tests.test_tools:power"), call_format="hermes")
    assert config.round_stops == ()  # a round ends with the assistant's turn
    assert config.find_calls(
        "Let me compute. " + _hermes("calculator", '{"expression": "2+3"}')
    ) == [Call("calculator", {"expression": "2+3"})]
    # The arguments as a JSON string (some models write them so), and a module:function tool by
    # its function's name; several calls in one turn, in order, with text between them.
    assert config.find_calls(
        _hermes("power", '"{\\"base\\": 2, \\"exponent\\": 5}"')
        + "\nand "
        + _hermes("calculator", '{"expression": "1"}')
    ) == [
        Call("tests.test_tools:power", {"base": 2, "exponent": 5}),
        Call("calculator", {"expression": "1"}),
    ]
    assert config.find_calls("The answer is 5.") == []
    malformed = {
        '<tool_call>{"name": "calculator", </tool_call>': "the call is not JSON",
        '"name": "calculator"}</tool_call>': "</tool_call> without <tool_call>",
        "<tool_call>[1, 2]</tool_call>": 'a call is {"name": <tool>, "arguments": {...}}',
        _hermes("calculator", "[1]"): 'a call is {"name": <tool>',
        _hermes("abacus", "{}"): "no tool named 'abacus' (there are: calculator, power)",
        '<tool_call>{"name": "calculator"': "<tool_call> without </tool_call>",
    }
    for text, problem in malformed.items():
        (call,) = config.find_calls(text)
        assert call.argument is None and call.problem.startswith(problem), (text, call)
    # A malformed call beside good ones is answered with its error, in its place.
    good = _hermes("calculator", '{"expression": "2"}')
    calls = config.find_calls(good + _hermes("abacus", "{}") + good + "<tool_call>{")
    assert [c.problem is None for c in calls] == [True, False, True, False]


def power(base: int, exponent: int) -> int:
    """Raises a number to a power.

    Args:
        base: The number.
        exponent: The power.
    """
    return base**exponent


def test_hermes_tools_are_described_by_their_signatures_and_docstrings():
    config = tools.ToolConfig(names=("calculator", "tests.test_tools:power"), call_format="hermes")
    calculator, power_schema = (schema["function"] for schema in config.schemas)
    assert calculator["name"] == "calculator"
    assert calculator["description"].startswith("Evaluates an arithmetic expression")
    assert calculator["parameters"]["required"] == ["expression"]
    assert power_schema["name"] == "power"
    assert power_schema["parameters"]["properties"] == {
        "base": {"type": "integer", "description": "The number."},
        "exponent": {"type": "integer", "description": "The power."},
    }
    assert config.prompt_tools == config.schemas
    assert tools.ToolConfig(names=("calculator",)).prompt_tools is None  # tags: the system prompt
    with pytest.raises(
        ValueError, match="describes tool 'tests.test_tools:echo' by its type hints"
    ):
        tools.ToolConfig(names=("tests.test_tools:echo",), call_format="hermes")


def echo(argument):
    return argument.upper()


def sleepy(argument):
    time.sleep(5)
    return argument


def broken(argument):
    raise RuntimeError("no service")


def test_run_answers_each_call_and_reports_failures_without_raising():
    config = tools.ToolConfig(
        names=(
            "calculator",
            "tests.test_tools:echo",
            "tests.test_tools:sleepy",
            "tests.test_tools:broken",
        ),
        timeout_s=0.5,  # ample for the calls that succeed; sleepy takes 5 s
        max_output_chars=3,
        result_template="[{output}]",
    )
    results = config.run(
        [
            Call("calculator", "6*7"),
            Call("tests.test_tools:echo", "abcdef"),  # cut to 3 characters
            Call("tests.test_tools:sleepy", "x"),
            Call("tests.test_tools:broken", "x"),
            Call("calculator", None, "malformed"),
            Call("calculator", "1/0"),
        ]
    )
    assert results[:2] == [("42", False), ("ABC", False)]
    assert [failed for _, failed in results[2:]] == [True] * 4
    assert all(text.startswith("err") for text, _ in results[2:])
    assert config.answer(["42"]) == "[42]"
    hermes = tools.ToolConfig(
        names=("tests.test_tools:power",),
        call_format="hermes",
        result_template="<{output}>",
        result_separator="|",
    )
    results = hermes.run(
        [Call("tests.test_tools:power", {"base": 3, "exponent": 4}), Call("x", None, "bad JSON")]
    )
    assert results == [("81", False), ("error: bad JSON", True)]
    # One turn's outputs come back together, in one tool turn.
    assert hermes.answer([output for output, _ in results]) == "<81|error: bad JSON>"
    ((text, failed),) = hermes.run([Call("tests.test_tools:power", {"base": 3})])  # too few
    assert failed and text.startswith("error: TypeError: power() missing 1 required")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(names=("abacus",)), "unknown tool 'abacus'; valid: calculator, or module:function"),
        (dict(names=("nowhere:tool",)), "cannot import tool 'nowhere:tool'"),
        (dict(max_calls=2), "make_tools.max_calls needs tools: bind make_tools.names"),
        (dict(names=("calculator",), max_calls=0), "max_calls must be >= 1"),
        (dict(names=("calculator",), result_template="<r></r>"), "must contain {output}"),
        (dict(names=("calculator", "calculator")), "give one tag twice"),
        (dict(names=("calculator",), call_format="xml"), "call_format must be one of"),
        (
            dict(names=("calculator",), result_separator="\n"),
            "make_tools.result_separator joins the outputs of a turn's calls: it needs "
            "make_tools.call_format='hermes'",
        ),
    ],
)
def test_tool_config_refuses(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tools.ToolConfig(**kwargs)


@pytest.mark.usefixtures("length_reward")
def test_a_misbound_tool_knob_fails_before_the_model_loads():
    with pytest.raises(ValueError, match="make_tools.timeout_s needs tools"):
        _experiment("make_tools.timeout_s=1.0", read_params=False)


@pytest.mark.usefixtures("length_reward")
def test_hermes_tools_reach_the_prompt_and_answer_in_the_chat_templates_tool_turn():
    exp = _experiment(*HERMES, read_params=False)
    with open(CHATML_TOOLS) as f:
        assert exp.tokenizer.chat_template == f.read()  # what an export writes, too
    # The result turn is read off the template: what follows the end of a turn that calls, up
    # to the assistant's next words; and what it puts between two results.
    assert exp.tools.result_template == CHATML_TOOL_TURN
    assert exp.tools.result_separator == CHATML_BETWEEN_RESULTS
    tokens, mask = sampling.prompts_for(exp, exp.train_examples[:1], 1)
    prompt = exp.tokenizer.decode(tokens[0][mask[0]])
    assert exp.train.system_prompt is None  # tiny.gin's: the tools' system turn alone
    assert prompt.startswith("<|im_start|>system\nYou may call these functions")
    assert '<tools>\n{"type": "function", "function": {"name": "calculator"' in prompt
    assert prompt.endswith(
        exp.train_examples[0]["question"] + "<|im_end|>\n<|im_start|>assistant\n"
    )
    bound = _experiment(*HERMES, "make_tools.result_template='[{output}]'", read_params=False)
    assert bound.tools.result_template == "[{output}]"
    assert bound.tools.result_separator == CHATML_BETWEEN_RESULTS


class _Template:
    """A tokenizer whose chat template renders what `render(messages)` gives (tools or not)."""

    chat_template = "(a template)"

    def __init__(self, render):
        self.render = render

    def apply_chat_template(self, messages, tools=None, **kwargs):
        return ("(tools) " if tools else "") + self.render(messages)


def _calls_then_results(messages, between="\n"):
    calls = "".join("<tool_call>{}</tool_call>" for m in messages if m.get("tool_calls"))
    results = between.join(m["content"] for m in messages if m["role"] == "tool")
    return f"{calls}<end>[{results}]" if results else ""


@pytest.mark.parametrize(
    "render, message",
    [
        (
            lambda messages: _calls_then_results(messages).replace("<end>", ""),
            "renders no tool turn after a </tool_call> and an end-of-turn token (<end>)",
        ),
        (
            lambda messages: _calls_then_results(messages).replace("[", "(" * len(messages)),
            "the chat template's tool turn for two calls is not its turn for one",
        ),
    ],
)
def test_a_tool_turn_the_template_does_not_render_plainly_asks_for_the_knobs(render, message):
    config = tools.ToolConfig(names=("calculator",), call_format="hermes")
    read = config.for_chat_template(_Template(_calls_then_results), end_tokens=("<end>",))
    assert (read.result_template, read.result_separator) == ("[{output}]", "\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        config.for_chat_template(_Template(render), end_tokens=("<end>",))
    bound = tools.ToolConfig(
        names=("calculator",), call_format="hermes", result_template="{output}", result_separator=""
    )
    assert bound.for_chat_template(_Template(render), end_tokens=("<end>",)) == bound


@pytest.mark.usefixtures("length_reward")
@pytest.mark.parametrize(
    "bindings, message",
    [
        (HERMES[:2], "needs a chat template that renders tools, and this tokenizer's does not"),
        (
            (*HERMES[:2], "TrainConfig.use_chat_template=False", "TrainConfig.system_prompt=None"),
            "make_tools.call_format='hermes' needs TrainConfig.use_chat_template",
        ),
        (
            ("TrainConfig.chat_template_path='/no/such.jinja'",),
            "TrainConfig.chat_template_path: [Errno 2] No such file or directory",
        ),
    ],
)
def test_hermes_tools_need_a_chat_template_that_renders_them(bindings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _experiment(*bindings, read_params=False)


# ------------------------------------------------------------------ the sampler's tool rounds

BUDGET = 64


class _ScriptedRounds:
    """Stands in for `generate_in_rounds`: round r gives row i the tokens `rounds[r][i]`
    (None: not sampled), log-prob -0.5 each, and records what it was asked; its context is
    the round's number."""

    def __init__(self, exp, rounds):
        self.exp, self.rounds, self.calls, self.keys, self.contexts = exp, rounds, [], [], []

    def __call__(
        self,
        params,
        tokens,
        mask,
        key,
        *,
        model,
        sampling,
        num_samples,
        mesh,
        budget_B=None,
        context=None,
    ):
        rows, width = np.asarray(tokens).shape[0] * num_samples, sampling.max_new_tokens
        budget = np.full(rows, width) if budget_B is None else np.asarray(budget_B)
        self.calls.append((np.asarray(tokens), np.asarray(mask), budget))
        self.keys.append(jax.random.key_data(key).tolist())
        self.contexts.append(context)
        script = self.rounds[len(self.calls) - 1]
        completion = np.zeros((rows, width), np.int32)
        lengths = np.zeros(rows, np.int32)
        for i, ids in enumerate(script):
            ids = ids or []
            assert len(ids) <= budget[i], f"row {i} scripted past its budget"
            completion[i, : len(ids)], lengths[i] = ids, len(ids)
        local = Rollout(
            prompt_tokens_BxP=np.repeat(np.asarray(tokens), num_samples, axis=0),
            prompt_mask_BxP=np.repeat(np.asarray(mask), num_samples, axis=0),
            completion_tokens_BxC=completion,
            completion_mask_BxC=np.arange(width)[None, :] < lengths[:, None],
            logps_BxC=np.where(np.arange(width)[None, :] < lengths[:, None], -0.5, 0.0),
            lengths_B=lengths,
            truncated_B=np.zeros(rows, bool),
        )
        return sharding.shard_batch(self.exp.mesh, local), len(self.calls)


@pytest.mark.usefixtures("length_reward")
def test_tool_rounds_append_results_and_sample_on_only_where_a_call_was_answered(monkeypatch):
    exp = _experiment(
        TOOLS,
        "make_tools.max_calls=2",
        f"make_sampling.max_new_tokens={BUDGET}",
        read_params=False,
    )
    enc = lambda text: exp.tokenizer.encode(text, add_special_tokens=False)
    result = lambda output: enc(f"<result>{output}</result>")
    filler = enc(" a")
    near_full = filler * (BUDGET - 2 - len(enc("<calculator>1+1</calculator>")))
    rounds = [
        [
            enc("First <calculator>2+3</calculator>"),  # two calls, then an answer
            enc("It is 7."),  # no call
            enc("<calculator>1/0</calculator>"),  # the tool fails
            enc("2+3</calculator>"),  # no opening tag
            near_full + enc("<calculator>1+1</calculator>"),  # the result does not fit
            enc("<calculator>1</calculator>"),
            enc("Done."),
            enc("Done."),
        ],
        [
            enc(" so <calculator>5*2</calculator>"),
            None,
            enc(" oops"),
            enc(" ok"),
            None,
            enc(" <calculator>3</calculator>"),
            None,
            None,
        ],
        [enc(" = 10."), None, None, None, None, enc(" <calculator>4</calculator>"), None, None],
    ]
    scripted = _ScriptedRounds(exp, rounds)
    monkeypatch.setattr(sampling, "generate_in_rounds", scripted)
    examples = exp.train_examples[:2]
    out = sampling.sample(exp, None, examples, jax.random.key(0), exp.sampling, 4)

    assert len(scripted.calls) == 3  # row 5 asks a third time: max_calls=2 ends it there
    # Each round draws with a key of its own, none of them a dynamic-sampling round's.
    step_key = jax.random.key(0)
    rounds_of_dynamic_sampling = [jax.random.fold_in(step_key, i) for i in range(1, 4)]
    taken = [jax.random.key_data(k).tolist() for k in rounds_of_dynamic_sampling]
    assert len({str(k) for k in scripted.keys}) == 3 and not any(k in taken for k in scripted.keys)
    model_parts = {
        0: [rounds[0][0], rounds[1][0], rounds[2][0]],
        2: [rounds[0][2], rounds[1][2]],
        3: [rounds[0][3], rounds[1][3]],
        5: [rounds[0][5], rounds[1][5], rounds[2][5]],
    }
    tool_parts = {
        0: [result("5"), result("10")],
        2: [result("error: ValueError: division by zero")],
        3: [result("error: </calculator> without <calculator>")],
        4: [result("2")],
        5: [result("1"), result("3")],
    }
    rollout = jax.tree.map(np.asarray, out.rollout)
    for row in range(8):
        parts, by_tool = [], []
        models, results = model_parts.get(row, [rounds[0][row]]), tool_parts.get(row, [])
        for i, part in enumerate(models):
            parts.append(part)
            by_tool += [False] * len(part)
            if i < len(results):
                parts.append(results[i])
                by_tool += [True] * len(results[i])
        expected = [t for part in parts for t in part][:BUDGET]
        n = len(expected)
        assert rollout.lengths_B[row] == n, row
        np.testing.assert_array_equal(rollout.completion_tokens_BxC[row, :n], expected)
        np.testing.assert_array_equal(rollout.tool_mask_BxC[row, :n], by_tool[:n])
        assert (
            not rollout.tool_mask_BxC[row, n:].any()
            and not rollout.completion_mask_BxC[row, n:].any()
        )
        np.testing.assert_array_equal(rollout.logps_BxC[row, :n], np.where(by_tool[:n], 0.0, -0.5))
        assert out.texts[row] == exp.tokenizer.decode(expected, skip_special_tokens=True)
    np.testing.assert_array_equal(out.tool_calls, [2, 0, 1, 1, 1, 2, 0, 0])
    np.testing.assert_array_equal(out.tool_errors, [0, 0, 1, 1, 0, 0, 0, 0])
    # Only row 4 is truncated: its result was cut at the budget.
    np.testing.assert_array_equal(rollout.truncated_B, np.arange(8) == 4)
    assert rollout.lengths_B[4] == BUDGET and rollout.tool_mask_BxC[4, -2:].all()
    assert "<result>error: ValueError: division by zero</result>" in out.texts[2]

    # Round 1 read each answered row's context from round 0 and computed its last token and the
    # result, with the budget left; the others sampled nothing.
    tokens, mask, budget = scripted.calls[1]
    assert scripted.contexts == [None, 1, 2]  # each round on the context of the one before
    so_far = {0: 0, 2: 2, 3: 3, 5: 5}
    # The results (and last tokens), left-padded to the power of two (>= 16) that holds them.
    assert 16 < max(1 + len(tool_parts[row][0]) for row in so_far) <= tokens.shape[1] == 32
    for row in range(8):
        if row in so_far:
            window = [rounds[0][row][-1], *tool_parts[row][0]]
            done = len(rounds[0][row]) + len(tool_parts[row][0])
            assert mask[row].sum() == len(window) and budget[row] == BUDGET - done
            np.testing.assert_array_equal(tokens[row, -len(window) :], window)
        else:
            assert mask[row].sum() == 1 and budget[row] == 0


@pytest.mark.usefixtures("length_reward")
def test_a_hermes_turn_calls_several_tools_and_gets_their_results_in_one_turn(monkeypatch):
    exp = _experiment(
        *HERMES, "make_tools.max_calls=3", "make_sampling.max_new_tokens=256", read_params=False
    )
    enc = lambda text: exp.tokenizer.encode(text, add_special_tokens=False)
    calc = lambda expression: _hermes("calculator", f'{{"expression": "{expression}"}}')
    end = "<|im_end|>"
    turn = lambda *outputs: enc(
        CHATML_TOOL_TURN.format(output=CHATML_BETWEEN_RESULTS.join(outputs))
    )
    rounds = [
        [
            enc(f"Two sums. {calc('2+3')}\n{calc('4*5')}{end}"),  # both run, one tool turn
            enc(calc("1/0") + _hermes("abacus", "{}") + end),  # both fail, both answered
            enc(calc("1")),  # no end-of-turn token (a stop string ended it): no call runs
            enc(calc("1") + calc("2") + calc("3") + end),  # max_calls=3: all three run
        ],
        [enc(f" So 25.{end}"), enc(f" ok{end}"), None, enc(calc("4") + end)],  # row 3: a 4th
    ]
    scripted = _ScriptedRounds(exp, rounds)
    monkeypatch.setattr(sampling, "generate_in_rounds", scripted)
    out = sampling.sample(exp, None, exp.train_examples[:1], jax.random.key(0), exp.sampling, 4)

    assert len(scripted.calls) == 2  # row 3's fourth call ends it instead of a third round
    no_such = "error: no tool named 'abacus' (there are: calculator)"
    results = {
        0: turn("5", "20"),
        1: turn("error: ValueError: division by zero", no_such),
        3: turn("1", "2", "3"),
    }
    rollout = jax.tree.map(np.asarray, out.rollout)
    for row in range(4):
        parts = [rounds[0][row]] + ([results[row], rounds[1][row]] if row in results else [])
        expected = [t for part in parts for t in part]
        by_tool = [i == 1 for i, part in enumerate(parts) for _ in part]
        n = rollout.lengths_B[row]
        assert n == len(expected), row
        np.testing.assert_array_equal(rollout.completion_tokens_BxC[row, :n], expected)
        np.testing.assert_array_equal(rollout.tool_mask_BxC[row, :n], by_tool)
    # The policy's own end-of-turn token stays its own (trained on); the tool turn follows it.
    im_end = exp.tokenizer.convert_tokens_to_ids(end)
    assert rollout.completion_tokens_BxC[0, len(rounds[0][0]) - 1] == im_end
    assert not rollout.tool_mask_BxC[0, len(rounds[0][0]) - 1]
    np.testing.assert_array_equal(out.tool_calls, [2, 2, 0, 3])
    np.testing.assert_array_equal(out.tool_errors, [0, 2, 0, 0])
    assert not rollout.truncated_B.any()
    assert "<tool_response>\n5\n</tool_response>\n<tool_response>\n20\n" in out.texts[0]
    _, _, budget = scripted.calls[1]
    np.testing.assert_array_equal(budget > 0, [True, True, False, True])


def _force_first_call(monkeypatch, tokenizer, call="<calculator>2+3</calculator>"):
    """Makes every row's first sampling round write `call` (the random tiny model never calls
    a tool); later rounds are the real sampler's."""
    ids = tokenizer.encode(call, add_special_tokens=False)
    forced = first_rounds_call(sampling.generate_in_rounds, ids)
    monkeypatch.setattr(sampling, "generate_in_rounds", forced)


@pytest.mark.usefixtures("length_reward")
@pytest.mark.parametrize(
    "bindings, call, budget",
    [
        ((TOOLS,), "<calculator>2+3</calculator>", 32),
        (HERMES, _hermes("calculator", '{"expression": "2+3"}') + "<|im_end|>", 96),
        (
            (TOOLS, "make_sampling.keep_sampling_mask=True", "make_sampling.top_k=16"),
            "<calculator>2+3</calculator>",
            32,
        ),
    ],
    ids=["tags", "hermes", "tags-kept-ids"],
)
def test_later_rounds_record_the_trainers_logps_after_a_tool_result(
    monkeypatch, bindings, call, budget
):
    # The round after a call prefills prompt + reply + result afresh; the log-probs it records
    # must be the trainer's recomputation over the whole sequence, at the same positions (with
    # the keep sampling mask, over each token's kept ids, which the tool's tokens have none of).
    exp = _experiment(*bindings, f"make_sampling.max_new_tokens={budget}")
    _force_first_call(monkeypatch, exp.tokenizer, call)
    out = sampling.sample(
        exp, exp.params, exp.train_examples[:2], jax.random.key(3), exp.sampling, 4
    )
    rollout = jax.tree.map(np.asarray, out.rollout)
    after_a_result = np.cumsum(rollout.tool_mask_BxC, axis=1) > 0
    later = rollout.completion_mask_BxC & after_a_result & ~rollout.tool_mask_BxC
    assert later.sum() > 8, "want the second round sampled"
    assert (out.tool_calls >= 1).all() and not out.tool_errors.any()
    # Each reply: the call, then the result (special tokens and all, for hermes: the template's
    # tool turn), written by the tool.
    called = exp.tokenizer.encode(call, add_special_tokens=False)
    result = exp.tokenizer.encode(
        exp.tools.result_template.format(output="5"), add_special_tokens=False
    )
    for row in range(len(out.texts)):
        tokens, by_tool = rollout.completion_tokens_BxC[row], rollout.tool_mask_BxC[row]
        np.testing.assert_array_equal(tokens[: len(called)], called)
        np.testing.assert_array_equal(tokens[len(called) : len(called) + len(result)], result)
        assert by_tool[len(called) : len(called) + len(result)].all()
        assert not by_tool[: len(called)].any() and not by_tool[len(called) + len(result)]
    logps, _ = tf.completion_logprobs(
        exp.params,
        rollout.prompt_tokens_BxP,
        rollout.prompt_mask_BxP,
        rollout.completion_tokens_BxC,
        rollout.completion_mask_BxC,
        config=exp.model,
        temperature=exp.sampling.logp_temperature,
        kept_BxCxK=rollout.kept_ids_BxCxK,
    )
    np.testing.assert_allclose(rollout.logps_BxC[later], np.asarray(logps)[later], atol=2e-5)
    if exp.sampling.keep_sampling_mask:
        kept = rollout.kept_ids_BxCxK
        assert (kept == rollout.completion_tokens_BxC[..., None]).any(-1)[later].all()
        assert (kept[rollout.tool_mask_BxC] == NOT_KEPT).all()


@pytest.mark.usefixtures("length_reward")
def test_a_run_with_tools_trains_and_reports_its_calls(tmp_path, monkeypatch):
    _force_first_call(monkeypatch, _experiment(read_params=False).tokenizer)
    summary = _train_in_process(
        tmp_path, TOOLS, "TrainConfig.num_steps=2", "make_sampling.max_new_tokens=24"
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tool_calls_mean" in r]
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
    assert all(r["tool_call_rate"] == 1.0 and r["tool_error_rate"] == 0.0 for r in steps)
    assert all(r["tool_calls_mean"] >= 1.0 for r in steps)
    records = [
        json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()
    ]
    assert records and all(r["tool_calls"] >= 1 for r in records)
    assert all("<result>5</result>" in r["completion"] for r in records)
    assert summary is not None
