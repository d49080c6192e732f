"""Fake `gcloud`, `ssh`, `uv` and `hostname` on PATH, so the launcher runs end to end offline.

Each fake appends its argv (JSON, one line per call) to `calls.jsonl`. `gcloud ... create`
fails the zones named in `scenario.json` with realistic gcloud error texts; `gcloud ... ssh`
and `ssh` run the remote command string with `bash -c` (as a remote login shell would) in a
per-host home directory, so the scripts really run and nothing is executed that a real remote
shell would not execute.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys

ERRORS = {
    "capacity": (
        'ERROR: (gcloud.compute.tpus.tpu-vm.create) {{"code": 8, "message": "There is no more '
        'capacity in the zone \\"{zone}\\"; you can try in another zone where Cloud TPU Nodes '
        'are offered (see https://cloud.google.com/tpu/docs/regions) [EID: 0x5e1f]"}}'
    ),
    "quota": (
        "ERROR: (gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: Quota "
        "'TPUV6E_SPOT_PER_PROJECT_PER_ZONE' exceeded. Limit: 0.0 in zone {zone}."
    ),
    "reservation": (
        "ERROR: (gcloud.compute.tpus.tpu-vm.create) NOT_FOUND: Reservation not found: "
        "projects/demo/zones/{zone}/reservations/tpu-res"
    ),
    "unavailable": (
        "ERROR: (gcloud.compute.tpus.tpu-vm.create) Cloud TPU received a bad request. the "
        "accelerator v6e-8 was not found in zone {zone} [EID: 0x945e]"
    ),
    "permission": (
        "ERROR: (gcloud.compute.tpus.tpu-vm.create) PERMISSION_DENIED: Permission "
        "'tpu.nodes.create' denied on 'projects/demo/locations/{zone}/nodes/{name}'"
    ),
    "other": (
        "ERROR: (gcloud.compute.tpus.tpu-vm.create) ALREADY_EXISTS: Resource "
        "'projects/demo/locations/{zone}/nodes/{name}' already exists"
    ),
}

_COMMON = r"""
import json, os, subprocess, sys
DIR = os.environ["FAKE_CLOUD_DIR"]
with open(os.path.join(DIR, "calls.jsonl"), "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\n")
SCENARIO = json.load(open(os.path.join(DIR, "scenario.json")))

def run_on(host, command):
    home = os.path.join(DIR, "hosts", host)
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ, HOME=home, FAKE_HOSTNAME=host)
    sys.stdout.flush()
    return subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode
"""

_GCLOUD = r"""
ERRORS = json.load(open(os.path.join(DIR, "errors.json")))
args = sys.argv[1:]
flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
verb, name, zone = args[3], args[4], flags.get("zone")
vms_path = os.path.join(DIR, "vms.json")
vms = set(json.load(open(vms_path))) if os.path.exists(vms_path) else set()
key = f"{zone}/{name}"
def not_found():
    print(f"ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) NOT_FOUND: Resource "
          f"'projects/demo/locations/{zone}/nodes/{name}' was not found", file=sys.stderr)
    sys.exit(1)
if verb == "create":
    failure = SCENARIO.get("zones", {}).get(zone)
    if failure:
        print(ERRORS[failure].format(zone=zone, name=name), file=sys.stderr)
        sys.exit(1)
    vms.add(key)
    print(f"Create request issued for: [{name}]")
elif verb == "delete":
    if key not in vms:
        not_found()
    if not SCENARIO.get("delete_fails"):
        vms.discard(key)
    print(f"Deleted tpu [{name}].")
elif verb == "describe":
    if key not in vms:
        not_found()
    endpoints = [{"ipAddress": f"10.0.0.{i}", "port": 8470} for i in range(SCENARIO["workers"])]
    print(json.dumps({"name": name, "state": "READY", "networkEndpoints": endpoints}))
elif verb == "ssh":
    if key not in vms:
        not_found()
    codes = [run_on(f"{name}-w-{w}", flags["command"]) for w in range(SCENARIO["workers"])
             if w not in SCENARIO.get("silent_workers", [])]
    sys.exit(next((c for c in codes if c), 0))
json.dump(sorted(vms), open(vms_path, "w"))
"""

_SSH = r"""
args = sys.argv[1:]
while args[0] != "--":
    args = args[2:] if args[0] == "-o" else args[1:]
host, command = args[1], args[2]
sys.exit(run_on(host, command))
"""

_UV = r"""
args = sys.argv[1:]
if args[0] == "venv":
    bin_dir = os.path.abspath(os.path.join(args[-1], "bin"))
    os.makedirs(bin_dir, exist_ok=True)
    for exe in ("python", "python3"):
        path = os.path.join(bin_dir, exe)
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
        os.chmod(path, 0o755)
"""


@dataclasses.dataclass
class FakeCloud:
    dir: pathlib.Path
    env: dict[str, str]

    def scenario(self, **scenario) -> None:
        (self.dir / "scenario.json").write_text(json.dumps({"workers": 1, **scenario}))

    def calls(self) -> list[list[str]]:
        path = self.dir / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def vms(self) -> list[str]:
        path = self.dir / "vms.json"
        return json.loads(path.read_text()) if path.exists() else []

    def host_home(self, host: str) -> pathlib.Path:
        return self.dir / "hosts" / host

    def launcher(self, *args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
        """`python -m launch.main ARGS` with the fakes first on PATH."""
        return subprocess.run(
            [sys.executable, "-m", "launch.main", *args],
            env=self.env,
            cwd=cwd or str(pathlib.Path(__file__).parents[2]),
            capture_output=True,
            text=True,
            timeout=60,
        )


def _write_exe(path: pathlib.Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def make_fake_cloud(tmp_path: pathlib.Path) -> FakeCloud:
    """Writes the fakes under `tmp_path/cloud`; `env` puts them first on PATH."""
    root = tmp_path / "cloud"
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    (tmp_path / "home").mkdir()
    (root / "errors.json").write_text(json.dumps(ERRORS))
    shebang = f"#!{sys.executable}\n"
    _write_exe(bin_dir / "gcloud", shebang + _COMMON + _GCLOUD)
    _write_exe(bin_dir / "ssh", shebang + _COMMON + _SSH)
    _write_exe(bin_dir / "uv", shebang + _COMMON + _UV)
    _write_exe(bin_dir / "hostname", '#!/bin/sh\necho "${FAKE_HOSTNAME:-fakehost}"\n')
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_CLOUD_DIR=str(root),
        HOME=str(tmp_path / "home"),
        PYTHONPATH=str(pathlib.Path(__file__).parents[2]),
    )
    cloud = FakeCloud(root, env)
    cloud.scenario()
    return cloud


def kill_runs(root: pathlib.Path) -> None:
    """Ends any detached job a test left behind (its pid file names its process group)."""
    for pid_file in root.rglob("*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass
