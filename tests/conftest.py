"""Test setup: 8 virtual CPU devices (set before JAX initialises its backends)."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

# The tests' tiny programs run in milliseconds but take ~1 s each to compile, and a fresh
# machine compiles every one: skip XLA's costly optimisations (LLVM at -O0). A cold
# tests/phases/test_rollout.py took 155 s with this against 204 s without (BUILD_NOTES).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Persist XLA compiles across the in-process and subprocess runs of one test session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/grpo-test-jax-cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# Converted GGUF tokenizers (grpo.models.loading), kept apart from the user's ~/.cache/grpo.
os.environ.setdefault("GRPO_CACHE_DIR", "/tmp/grpo-test-cache")


def pytest_runtest_setup(item):
    import jax  # only now: the environment above must be set before JAX initialises

    if item.get_closest_marker("eight_devices") and jax.device_count() < 8:
        pytest.skip(f"needs 8 devices, have {jax.device_count()}")
