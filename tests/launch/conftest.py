"""Fixtures of the launcher tests: a fake cloud on PATH (see launch_fakes.py)."""

import pytest
from launch_fakes import FakeCloud, kill_runs, make_fake_cloud


@pytest.fixture
def fake_cloud(tmp_path, monkeypatch) -> FakeCloud:
    cloud = make_fake_cloud(tmp_path)
    for key in ("PATH", "FAKE_CLOUD_DIR"):
        monkeypatch.setenv(key, cloud.env[key])
    yield cloud
    kill_runs(tmp_path)
