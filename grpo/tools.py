"""Tools the policy calls in the middle of a completion (tool-integrated reasoning, as in
Toolformer, ReTool or Search-R1).

A completion calls tool `name` by writing `<name>argument</name>`. The sampler stops the row at
the closing tag (a stop string), the host runs the tool on the argument and appends its output,
in `ToolConfig.result_template`, to the completion as tokens, and the row goes on sampling from
there (`grpo.sampling`). The policy reads the tools' tokens but never trains on them: the
rollout marks them (`Rollout.tool_mask_BxC`) and the loss leaves them out.

A tool is a function from the argument (a string) to its output (a string, or anything `str`
renders). It runs on the host, on the reward workers, under `ToolConfig.timeout_s`; one that
raises or overruns answers `error: ...` to the policy and is counted, never stopping the run.
`calculator` is built in; `module:function` names any other (importable on every host), whose
tag is the function's name.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

from grpo import knobs
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


def calculator(expression: str) -> str:
    """The value of an arithmetic expression: numbers (commas between digit groups allowed),
    + - * / // % ** (exponents up to 64) and parentheses; `x` or `×` multiplies, `÷` divides.
    Integers print as integers, other values with up to 10 significant digits; anything else
    raises ValueError with what is wrong (the policy reads that as the tool's answer)."""
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


BUILT_IN_TOOLS: dict[str, Callable[[str], Any]] = {"calculator": calculator}


def tool_function(name: str) -> Callable[[str], Any]:
    """The built-in tool called `name`, or the function `module:function` names."""
    return knobs.named_function(name, BUILT_IN_TOOLS, "tool")


def tool_tag(name: str) -> str:
    """The tag a completion calls the tool by: its name, or a `module:function`'s function."""
    return name.rpartition(":")[2]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToolConfig:
    """The tools a completion may call, and how; no `names`, no tools (the default). `max_calls`
    bounds the calls per completion: a completion that asks for one more ends there (it is not
    truncated, and its reward is what it wrote so far). `result_template` is what each call
    appends, `{output}` the tool's output cut to `max_output_chars`."""

    names: tuple[str, ...] = ()
    max_calls: int = 4
    result_template: str = "<result>{output}</result>"
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
        if "{output}" not in self.result_template:
            raise ValueError(
                f"ToolConfig.result_template must contain {{output}}: {self.result_template!r}"
            )
        if not self.timeout_s > 0 or self.max_output_chars < 1:
            raise ValueError(
                "ToolConfig.timeout_s must be > 0 and max_output_chars >= 1, got "
                f"{self.timeout_s} and {self.max_output_chars}"
            )

    @functools.cached_property
    def functions(self) -> dict[str, Callable[[str], Any]]:
        """Each tool's function, by its name in `names`."""
        return {name: tool_function(name) for name in self.names}

    @property
    def close_tags(self) -> tuple[str, ...]:
        """The strings that end a call: the sampler's stop strings for the tools."""
        return tuple(f"</{tool_tag(name)}>" for name in self.names)

    def find_call(self, text: str) -> tuple[str, str | None] | None:
        """(tool name, argument) of the first call `text` closes; the argument is None when
        the closing tag has no opening tag before it. None when `text` closes no call.

        The sampler stops a row at the token that completes a closing tag, so the text of one
        sampling round closes at most one call, at its end."""
        pairs = zip(self.names, self.close_tags, strict=True)
        found = [(text.find(tag), name) for name, tag in pairs if tag in text]
        if not found:
            return None
        at, name = min(found)
        opening = f"<{tool_tag(name)}>"
        start = text.rfind(opening, 0, at)
        return name, None if start < 0 else text[start + len(opening) : at]

    def run(self, calls: Sequence[tuple[str, str | None]]) -> list[tuple[str, bool]]:
        """Each call's result text (`result_template` filled in) and whether it failed."""
        runnable = [(self.functions[name], arg) for name, arg in calls if arg is not None]
        outcomes = iter(reward_phase.run_guarded(_call_as_text, runnable, self.timeout_s))
        results = []
        for name, argument in calls:
            tag = tool_tag(name)
            output, failure = (
                (None, f"</{tag}> without <{tag}>") if argument is None else next(outcomes)
            )
            text = f"error: {failure}" if failure is not None else output
            results.append(
                (
                    self.result_template.format(output=text[: self.max_output_chars]),
                    failure is not None,
                )
            )
        return results


def _call_as_text(fn: Callable[[str], Any], argument: str) -> str:
    return str(fn(argument))
