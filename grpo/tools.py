"""Tools the policy calls in the middle of a completion (tool-integrated reasoning, as in
Toolformer, ReTool or Search-R1).

Two call formats (`ToolConfig.call_format`):
- `tags`: a completion calls tool `name` by writing `<name>argument</name>`; the system prompt
  says so. The sampler stops the row at the closing tag (a stop string), and the tool's output
  comes back as `<result>output</result>`.
- `hermes`: the format Qwen2.5 and Qwen3 (and Hermes models) are trained on, turn by turn as
  TRL's and verl's multi-turn rollouts take it. The chat template puts the tools' JSON schemas
  (from each function's signature and docstring) in the prompt; the assistant's turn calls any
  number of them, each as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and ends
  (its end-of-turn token, e.g. Qwen's `<|im_end|>`, sampled by the policy). Every call of the
  turn runs, and the outputs come back as the template's tool turn (Qwen: a user turn holding
  one `<tool_response>output</tool_response>` per call), which opens the assistant's next turn.
The host runs the calls and appends the results to the completion as tokens, and the row goes
on sampling from there (`grpo.sampling`). The policy reads the tools' tokens but never trains on
them: the rollout marks them (`Rollout.tool_mask_BxC`) and the loss leaves them out.

A tool is a function of one string (`tags`) or of the JSON arguments (`hermes`) to its output
(a string, or anything `str` renders). It runs on the host, on the reward workers, under
`ToolConfig.timeout_s`; one that raises or overruns, or a malformed call, answers `error: ...`
to the policy and is counted, never stopping the run. `calculator` is built in;
`module:function` names any other (importable on every host), whose name in calls is the
function's name.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from grpo import knobs
from grpo.data import prompts
from grpo.phases import reward as reward_phase

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPONENT = 64  # bounds the work and the size of a power's result
_MAX_MAGNITUDE = 1e30
_MAX_EXPRESSION_CHARS = 200


# Commas between digit groups are dropped; x or × multiplies, ÷ divides, ^ is a power with an
# exponent up to 64. Integers print as integers, other values with up to 10 significant digits;
# anything else raises ValueError saying what is wrong (the policy reads that as the answer).
# The docstring is what the hermes format's schema tells the policy.
def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression: numbers, + - * / // % ** and parentheses.

    Args:
        expression: The expression, e.g. "12 * (3 + 4)".
    """
    text = (
        expression.strip().replace("×", "*").replace("÷", "/").replace("^", "**").replace("$", "")
    )
    if len(text) > _MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {_MAX_EXPRESSION_CHARS} characters")
    text = _digit_group_commas_dropped(text).replace("x", "*")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression.strip()!r}") from None
    return _formatted(_evaluate(tree.body))


def _digit_group_commas_dropped(text: str) -> str:
    """'1,234,567' -> '1234567' (a comma between a digit and three digits), other commas kept."""
    out = []
    for i, char in enumerate(text):
        groups = text[i + 1 : i + 4]
        after = text[i + 4 : i + 5]
        if (
            char == ","
            and i
            and text[i - 1].isdigit()
            and groups.isdigit()
            and len(groups) == 3
            and not after.isdigit()
        ):
            continue
        out.append(char)
    return "".join(out)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right} beyond +-{_MAX_EXPONENT}")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        if isinstance(value, complex) or abs(value) > _MAX_MAGNITUDE:
            raise ValueError("result out of range")
        return value
    raise ValueError(f"unsupported in an arithmetic expression: {ast.unparse(node)!r}")


def _formatted(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise ValueError("result out of range")
    return f"{value:.10g}"


BUILT_IN_TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator}


def tool_function(name: str) -> Callable[..., Any]:
    """The built-in tool called `name`, or the function `module:function` names."""
    return knobs.named_function(name, BUILT_IN_TOOLS, "tool")


def tool_tag(name: str) -> str:
    """The tag a completion calls the tool by: its name, or a `module:function`'s function."""
    return name.rpartition(":")[2]


CALL_FORMATS = ("tags", "hermes")
_TAGS_RESULT = "<result>{output}</result>"
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
# Stand for the outputs when the chat template renders a tool turn.
_OUTPUT_MARKS = ("TOOL_OUTPUT_MARK_A", "TOOL_OUTPUT_MARK_B")


class ToolCall(NamedTuple):
    """A call a completion wrote: the tool's name (as in `ToolConfig.names`) and its argument,
    the text between the tags (`tags`) or the JSON call's arguments (`hermes`). A malformed call
    says why in `problem` (and has no argument), and the policy gets that as the answer."""

    name: str
    argument: str | dict[str, Any] | None
    problem: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToolConfig:
    """The tools a completion may call, and how; no `names`, no tools (the default). `max_calls`
    bounds the calls per completion: a completion that asks for more ends there (it is not
    truncated, and its reward is what it wrote so far). `call_format` is how a completion calls
    (see the module doc). `result_template` is what a round's calls append, `{output}` the
    tool's output cut to `max_output_chars` (`hermes`: the outputs of the turn's calls, joined
    by `result_separator`); None: `<result>{output}</result>` for `tags`, the chat template's
    tool turn for `hermes` (`for_chat_template`), and its separator likewise."""

    names: tuple[str, ...] = ()
    max_calls: int = 4
    call_format: str = "tags"
    result_template: str | None = None
    result_separator: str | None = None
    timeout_s: float = 5.0
    max_output_chars: int = 500

    def __post_init__(self):
        knobs.check_fields(self, "ToolConfig")
        object.__setattr__(self, "names", tuple(self.names))
        if not self.names:
            bound = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
            if bound:
                raise ValueError(f"make_tools.{bound[0]} needs tools: bind make_tools.names")
            return
        tags = [tool_tag(name) for name in self.names]
        if len(set(tags)) != len(tags):
            raise ValueError(f"ToolConfig.names give one tag twice: {tags}")
        bad = [tag for tag in tags if not tag.isidentifier()]
        if bad:
            raise ValueError(f"ToolConfig: a tool's tag must be an identifier, got {bad}")
        self.functions  # noqa: B018 - resolves every name now: a bad one fails at config time
        if self.max_calls < 1:
            raise ValueError(f"ToolConfig.max_calls must be >= 1, got {self.max_calls}")
        if self.call_format not in CALL_FORMATS:
            raise ValueError(
                f"ToolConfig.call_format must be one of {CALL_FORMATS}, got {self.call_format!r}"
            )
        if self.result_template is None and self.call_format == "tags":
            object.__setattr__(self, "result_template", _TAGS_RESULT)
        if self.result_template is not None and "{output}" not in self.result_template:
            raise ValueError(
                f"ToolConfig.result_template must contain {{output}}: {self.result_template!r}"
            )
        if self.call_format == "hermes":
            self.schemas  # noqa: B018 - a function the schema cannot describe fails now
        elif self.result_separator is not None:
            raise ValueError(
                "make_tools.result_separator joins the outputs of a turn's calls: it needs "
                "make_tools.call_format='hermes' (a tags round makes one call)"
            )
        if not self.timeout_s > 0 or self.max_output_chars < 1:
            raise ValueError(
                "ToolConfig.timeout_s must be > 0 and max_output_chars >= 1, got "
                f"{self.timeout_s} and {self.max_output_chars}"
            )

    @functools.cached_property
    def functions(self) -> dict[str, Callable[..., Any]]:
        """Each tool's function, by its name in `names`."""
        return {name: tool_function(name) for name in self.names}

    @functools.cached_property
    def schemas(self) -> list[dict[str, Any]]:
        """Each tool's JSON schema, as chat templates take tools (`hermes`): its name, the
        docstring's description, and a parameter per argument (type hint and `Args:` line)."""
        from transformers.utils import get_json_schema

        schemas = []
        for name, fn in self.functions.items():
            try:
                schema = get_json_schema(fn)
            except Exception as e:  # transformers' docstring and type-hint parsing errors
                raise ValueError(
                    f"ToolConfig: call_format='hermes' describes tool {name!r} by its type hints "
                    f"and docstring (with an Args: section): {e}"
                ) from None
            schema["function"]["name"] = tool_tag(name)
            schemas.append(schema)
        return schemas

    @property
    def prompt_tools(self) -> list[dict[str, Any]] | None:
        """What the chat template renders into every prompt (`tools=`): the schemas for
        `hermes`; None for `tags` (the system prompt says how to call)."""
        return self.schemas if self.call_format == "hermes" else None

    @property
    def round_stops(self) -> tuple[str, ...]:
        """The strings at which the sampler stops a row for its call: the closing tags
        (`tags`); none for `hermes`, whose rounds end with the assistant's turn."""
        if self.call_format == "hermes":
            return ()
        return tuple(f"</{tool_tag(name)}>" for name in self.names)

    def for_chat_template(
        self,
        tokenizer: Any,
        *,
        end_tokens: Sequence[str] = (),
        use_chat_template: bool = True,
        system_prompt: str | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> ToolConfig:
        """This config for prompts through `tokenizer`'s chat template. For `hermes`, the
        template must render the tools, and an unbound `result_template` (`result_separator`)
        becomes its tool turn (between two outputs): what it renders after the assistant's turn
        that calls, past that turn's end-of-turn token (one of `end_tokens`, the sampler's end
        tokens as text), up to the assistant's next words."""
        if self.call_format != "hermes":
            return self
        if not use_chat_template:
            raise ValueError("make_tools.call_format='hermes' needs TrainConfig.use_chat_template")
        question = prompts.build_messages("?", system_prompt)

        def render(messages: list[dict[str, Any]], tools: Any) -> str:
            return tokenizer.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=True,
                tokenize=False,
                **(template_kwargs or {}),
            )

        if not getattr(tokenizer, "chat_template", None) or render(
            question, self.schemas
        ) == render(question, None):
            raise ValueError(
                "make_tools.call_format='hermes' needs a chat template that renders tools, and "
                "this tokenizer's does not: bind TrainConfig.chat_template_path (e.g. "
                "gin/templates/chatml_tools.jinja) or make_tools.call_format='tags'"
            )
        if self.result_template is not None and self.result_separator is not None:
            return self
        template, separator = self._tool_turn(
            lambda messages: render(question + messages, self.schemas), end_tokens
        )
        read = {"result_template": template, "result_separator": separator}
        bound = {knob: getattr(self, knob) for knob in read if getattr(self, knob) is not None}
        return dataclasses.replace(self, **{**read, **bound})

    def _tool_turn(
        self, render: Callable[[list[dict[str, Any]]], str], end_tokens: Sequence[str]
    ) -> tuple[str, str]:
        """The chat template's tool turn as (`result_template`, `result_separator`), read off
        its renderings of a turn of one call and of two, after the end-of-turn token."""
        tag = tool_tag(self.names[0])
        call = {"type": "function", "function": {"name": tag, "arguments": {}}}

        def turn(outputs: Sequence[str]) -> str | None:
            messages = [{"role": "assistant", "content": "", "tool_calls": [call] * len(outputs)}]
            messages += [{"role": "tool", "name": tag, "content": out} for out in outputs]
            text = render(messages)
            close = text.rfind(_HERMES_CLOSE, 0, max(text.find(outputs[0]), 0))
            after = text[close + len(_HERMES_CLOSE) :] if close >= 0 else ""
            end = next((end for end in end_tokens if end and after.startswith(end)), None)
            return after[len(end) :] if end is not None else None

        mark, second = _OUTPUT_MARKS
        one, two = turn([mark]), turn([mark, second])
        if one is None or two is None:
            raise ValueError(
                "make_tools.call_format='hermes': the chat template renders no tool turn after "
                f"a {_HERMES_CLOSE} and an end-of-turn token ({', '.join(end_tokens)}); bind "
                "make_tools.result_template and make_tools.result_separator"
            )
        head, _, tail = one.partition(mark)
        two_head, _, rest = two.partition(mark)
        separator, _, two_tail = rest.partition(second)
        if (two_head, two_tail) != (head, tail):
            raise ValueError(
                "make_tools.call_format='hermes': the chat template's tool turn for two calls "
                "is not its turn for one with the outputs side by side; bind "
                "make_tools.result_template and make_tools.result_separator"
            )
        escape = lambda text: text.replace("{", "{{").replace("}", "}}")
        return escape(head) + "{output}" + escape(tail), separator

    def find_calls(self, text: str) -> list[ToolCall]:
        """The calls a round's `text` makes: `tags`, the first call it closes (the sampler
        stops a row at the token that completes a closing tag, so a round closes at most one
        call, at its end); `hermes`, every call of the turn, malformed ones included."""
        if self.call_format == "hermes":
            return self._hermes_calls(text)
        pairs = zip(self.names, self.round_stops, strict=True)
        found = [(text.find(tag), name) for name, tag in pairs if tag in text]
        if not found:
            return []
        at, name = min(found)
        opening = f"<{tool_tag(name)}>"
        start = text.rfind(opening, 0, at)
        if start < 0:
            return [ToolCall(name, None, f"</{tool_tag(name)}> without {opening}")]
        return [ToolCall(name, text[start + len(opening) : at])]

    def _hermes_calls(self, text: str) -> list[ToolCall]:
        calls, done = [], 0
        while (at := text.find(_HERMES_CLOSE, done)) >= 0:
            start = text.rfind(_HERMES_OPEN, done, at)
            if start < 0:
                calls.append(ToolCall("", None, f"{_HERMES_CLOSE} without {_HERMES_OPEN}"))
            else:
                calls.append(self._hermes_call(text[start + len(_HERMES_OPEN) : at]))
            done = at + len(_HERMES_CLOSE)
        if _HERMES_OPEN in text[done:]:
            calls.append(ToolCall("", None, f"{_HERMES_OPEN} without {_HERMES_CLOSE}"))
        return calls

    def _hermes_call(self, body: str) -> ToolCall:
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            return ToolCall("", None, f"the call is not JSON ({e})")
        arguments = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(arguments, dict) or not isinstance(call.get("name"), str):
            return ToolCall("", None, 'a call is {"name": <tool>, "arguments": {...}}')
        names = {tool_tag(name): name for name in self.names}
        if call["name"] not in names:
            known = ", ".join(names)
            return ToolCall("", None, f"no tool named {call['name']!r} (there are: {known})")
        return ToolCall(names[call["name"]], arguments)

    def run(self, calls: Sequence[ToolCall]) -> list[tuple[str, bool]]:
        """Each call's output, cut to `max_output_chars` (`error: ...` for one that failed), and
        whether it failed."""
        runnable = [(self.functions[c.name], c.argument) for c in calls if c.problem is None]
        outcomes = iter(reward_phase.run_guarded(_call_as_text, runnable, self.timeout_s))
        results = []
        for call in calls:
            output, failure = (None, call.problem) if call.problem else next(outcomes)
            text = f"error: {failure}" if failure is not None else output
            results.append((text[: self.max_output_chars], failure is not None))
        return results

    def answer(self, outputs: Sequence[str]) -> str:
        """What a round's calls append to the completion, given their outputs (`run`)."""
        if self.result_template is None:
            raise ValueError("ToolConfig.answer: no result_template (see for_chat_template)")
        if self.call_format == "hermes":
            if len(outputs) > 1 and self.result_separator is None:
                raise ValueError("ToolConfig.answer: no result_separator (see for_chat_template)")
            return self.result_template.format(output=(self.result_separator or "").join(outputs))
        return "".join(self.result_template.format(output=output) for output in outputs)


def _call_as_text(fn: Callable[..., Any], argument: str | dict[str, Any]) -> str:
    return str(fn(**argument) if isinstance(argument, dict) else fn(argument))
