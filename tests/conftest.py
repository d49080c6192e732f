"""Test setup: 8 virtual CPU devices (set before JAX initialises its backends)."""

import os
import subprocess
import sys

import pytest

# XLA:CPU's older loop emitters compile the tests' programs about 3x faster than its fusion
# emitters (the tiny update: 0.7 s against 2.0 s; a cold tests/phases/test_update.py 108 s
# against 277 s, BUILD_NOTES). An XLA without the flag would abort on it: ask one first.
OLD_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
    probe = "import jax; jax.devices()"
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True)
    return run.returncode == 0


os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags = f"{_flags} --xla_force_host_platform_device_count=8"
if "xla_cpu_use_fusion_emitters" not in _flags and _xla_accepts(OLD_EMITTERS):
    _flags = f"{_flags} {OLD_EMITTERS}"
os.environ["XLA_FLAGS"] = _flags.strip()

# The tests' tiny programs run in milliseconds but take ~1 s each to compile, and a fresh
# machine compiles every one: skip XLA's costly optimisations (LLVM at -O0). A cold
# tests/phases/test_rollout.py took 155 s with this against 204 s without (BUILD_NOTES).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Persist XLA compiles across the in-process and subprocess runs of one test session, all of
# them: each trainer run builds its jitted functions afresh, so a test that trains three times
# (a resume) compiles every program three times without the cache, and with the old emitters
# few compiles reach JAX's default 1 s floor (BUILD_NOTES: a cold resume test 51 -> 36 s).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/grpo-test-jax-cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Converted GGUF tokenizers (grpo.models.loading), kept apart from the user's ~/.cache/grpo.
os.environ.setdefault("GRPO_CACHE_DIR", "/tmp/grpo-test-cache")


def pytest_runtest_setup(item):
    import jax  # only now: the environment above must be set before JAX initialises

    if item.get_closest_marker("eight_devices") and jax.device_count() < 8:
        pytest.skip(f"needs 8 devices, have {jax.device_count()}")
