"""Reading XLA's optimized HLO text: its computations, instructions and array sizes.

`bench/gpu_target.py` (bytes, roofline) and the `--tpu_target` paths of `bench.rollout` and
`bench.update` (collectives) read what XLA compiled for a device that is not here; these are the
parts of the text they share.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_ITEMSIZE.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})
_ARRAY = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"(ROOT )?%(\S+) = (.*?) ([\w-]+)\((.*)")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str
    op: str
    rest: str  # operands and attributes
    root: bool

    @property
    def operands(self) -> list[str]:
        return re.findall(r"%([\w.\-]+)", self.rest.split("), ")[0])


def array_bytes(shape_text: str) -> int:
    """Bytes of every array in an HLO shape (a tuple counts each element)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * _ITEMSIZE[dtype]
    return total


def computations(hlo_text: str) -> dict[str, list[Instruction]]:
    """Every computation's instructions, by computation name."""
    found, current = {}, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = found.setdefault(header.group(1), [])
        elif line == "}":
            current = None
        elif current is not None:
            match = _INSTRUCTION.match(line.strip())
            if match:
                root, name, shape, op, rest = match.groups()
                current.append(Instruction(name, shape, op, rest, root=bool(root)))
    return found


def entry_name(hlo_text: str) -> str:
    """The name of the module's entry computation."""
    return re.search(r"^ENTRY %(\S+)", hlo_text, re.MULTILINE).group(1)


def dims(shape_text: str) -> list[int]:
    """The dimensions of the first array in an HLO shape."""
    return [int(d) for d in filter(None, _ARRAY.search(shape_text).group(2).split(","))]


def loop_collectives(hlo_text: str) -> list[dict[str, Any]]:
    """The cross-device collectives one iteration of each of the program's while loops runs.

    One entry per `lax.while_loop` / `lax.scan` of the program, outer loops before the loops
    they run (`depth`: how many such loops enclose it; `op`: its jax op name). An entry counts
    its own body, not its nested program loops; loops XLA makes itself (a windowed einsum's)
    count once inside the loop that runs them. `count` by kind, and `bytes`: what each device
    receives as results (an all-gather's gathered array, an all-reduce's reduced arrays).
    """
    found = computations(hlo_text)
    results: list[dict[str, Any]] = []

    def visit(computation: str, depth: int) -> None:
        for loop in (i for i in found[computation] if _is_program_loop(i)):
            body = re.search(r"body=%([\w.\-]+)", loop.rest).group(1)
            instructions, nested = _reachable(found, body)
            count: dict[str, int] = collections.Counter()
            received = 0
            for instruction in instructions:
                kind = instruction.op.removesuffix("-start")
                if kind not in _COLLECTIVES or instruction.op.endswith("-done"):
                    continue
                count[kind] += 1
                sizes = [array_bytes(a) for a in _arrays(instruction.shape)]
                # An async start's shape pairs each operand with its result: count the result.
                paired = instruction.op.endswith("-start") and kind != "all-reduce"
                received += max(sizes) if paired else sum(sizes)
            op = re.search(r'op_name="([^"]*)"', loop.rest).group(1)
            results.append({"op": op, "depth": depth, "count": dict(count), "bytes": received})
            for computation_with_loops in nested:
                visit(computation_with_loops, depth + 1)

    _, top_level = _reachable(found, entry_name(hlo_text))
    for computation in top_level:
        visit(computation, 0)
    return results


def collectives_report(hlo_text: str) -> list[dict[str, Any]]:
    """`loop_collectives` for printing: MB instead of bytes, the op name without `jit(...)/`."""
    return [
        {
            "loop": loop["op"].split("/", 1)[-1],
            "depth": loop["depth"],
            "count": loop["count"],
            "mb": round(loop["bytes"] / 1e6, 1),
        }
        for loop in loop_collectives(hlo_text)
    ]


def _is_program_loop(instruction: Instruction) -> bool:
    return instruction.op == "while" and bool(re.search(r'op_name="[^"]*/while"', instruction.rest))


def _arrays(shape_text: str) -> list[str]:
    return [m.group(0) for m in _ARRAY.finditer(shape_text)]


def _reachable(
    found: dict[str, list[Instruction]], name: str
) -> tuple[list[Instruction], list[str]]:
    """The instructions of computation `name` and of the computations it calls, stopping at
    program loops; and the computations holding those loops."""
    seen, stack, out, with_loops = set(), [name], [], []
    while stack:
        current = stack.pop()
        if current in seen or current not in found:
            continue
        seen.add(current)
        for instruction in found[current]:
            if _is_program_loop(instruction):
                if current not in with_loops:
                    with_loops.append(current)
                continue
            out.append(instruction)
            stack.extend(_CALLED.findall(instruction.rest))
    return out, with_loops
