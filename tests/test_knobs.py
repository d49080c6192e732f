from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import gin
from grpo import knobs
from grpo.experiment import TrainConfig


@pytest.mark.parametrize(
    "value, hint, ok",
    [
        (3, int, True),
        (np.int64(3), int, True),  # ids and counts computed with numpy
        (True, int, False),  # a bool is an int to Python, never a count here
        (2.5, int, False),
        ("3", int, False),
        (3, float, True),  # 1 for 1.0
        (np.float32(0.5), float, True),
        (False, float, False),
        ("1e-6", float, False),
        (None, int | None, True),
        (None, int, False),
        (True, bool, True),
        (1, bool, False),
        ("x", str | None, True),
        ([64, 128], tuple[int, ...], True),  # gin writes a tuple either way
        ((64, "128"), tuple[int, ...], False),
        (64, tuple[int, ...], False),
        ((1, "a"), tuple[int, str], True),
        ((1,), tuple[int, str], False),
        ({"enable_thinking": False}, dict[str, Any] | None, True),
        ({1: "x"}, dict[str, Any], False),
        (len, Callable[[str], int], True),
        ("len", Callable[[str], int], False),
    ],
)
def test_matches(value, hint, ok):
    assert knobs.matches(value, hint) is ok


def test_a_mistyped_field_names_the_knob_and_the_value():
    with pytest.raises(ValueError, match=r"^TrainConfig.num_steps must be int, got '3' \(str\)$"):
        TrainConfig(num_steps="3")
    with pytest.raises(ValueError, match=r"prompt_buckets must be tuple\[int, ...\], got 64 \(int"):
        TrainConfig(prompt_buckets=64)


def test_checked_functions_check_what_they_are_called_with():
    @knobs.checked
    def make_thing(count: int, *, rate: float = 0.5, name: str | None = None) -> str:
        return f"{count} {rate} {name}"

    assert make_thing(2, rate=1) == "2 1 None"
    with pytest.raises(ValueError, match=r"^make_thing.rate must be float, got 'fast' \(str\)$"):
        make_thing(2, rate="fast")
    with pytest.raises(ValueError, match="make_thing.count must be int, got None"):
        make_thing(None)


def test_gin_binds_a_checked_factory_by_its_own_parameters():
    @gin.configurable("checked_factory")
    @knobs.checked
    def factory(*, size: int = 1) -> int:
        return size

    gin.clear_config()
    try:
        with pytest.raises(ValueError, match="factory.size must be int"):
            gin.parse_config("checked_factory.size = '2'")
            factory()
        gin.clear_config()
        with pytest.raises(ValueError, match="sise"):
            gin.parse_config("checked_factory.sise = 2")  # gin still sees the real signature
    finally:
        gin.clear_config()
