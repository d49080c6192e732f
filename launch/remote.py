"""Where commands run: every worker of a TPU VM, one host over ssh, or this machine.

A target turns a bash script into one argv. Locally the script is an argv element, never
parsed by a local shell. Remotely ssh hands a string to the login shell, so that string is
`bash -c <quoted script>`, and every user value inside the script is `shlex.quote`d by its
builder: the script reaches bash exactly as built, and values reach commands literally.

Scripts report to the launcher with marker lines, `LAUNCH <host> <kind> <text>`, one per
worker and kind, so a multi-worker answer can be counted (did every worker join?).
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Protocol

from launch import gcloud
from launch.shell import LaunchError, Result

MARKER = "LAUNCH"


class Target(Protocol):
    workers: int  # how many hosts run each command (and must answer)

    def shell(self, script: str) -> list[str]:
        """The argv that runs the bash `script` on every worker of this target."""
        ...


def remote_command(script: str) -> str:
    """The string a remote login shell parses into `bash -c <script>`."""
    return "bash -c " + shlex.quote(script)


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    vm: gcloud.TpuVm
    zone: str
    workers: int = 1

    def shell(self, script: str) -> list[str]:
        return gcloud.ssh_argv(self.vm, self.zone, remote_command(script))


@dataclasses.dataclass(frozen=True)
class SshTarget:
    host: str
    options: tuple[str, ...] = ()  # each passed as `-o OPTION`
    workers: int = 1

    def shell(self, script: str) -> list[str]:
        opts = [arg for option in self.options for arg in ("-o", option)]
        return ["ssh", "-o", "BatchMode=yes", *opts, "--", self.host, remote_command(script)]


@dataclasses.dataclass(frozen=True)
class LocalTarget:
    workers: int = 1

    def shell(self, script: str) -> list[str]:
        return ["bash", "-c", script]


def prelude(root: str) -> str:
    """Script start: strict mode, the `say` marker helper, and `cd` into the launch root.

    A relative `root` is under $HOME, the directory ssh starts in.
    """
    return "\n".join(
        [
            "set -eu",
            "host=$(hostname)",
            f'say() {{ printf "{MARKER} %s %s\\n" "$host" "$*"; }}',
            'cd "$HOME"',
            f"mkdir -p {shlex.quote(root)}",
            f"cd {shlex.quote(root)}",
            "root=$(pwd)",
        ]
    )


def markers(output: str, kind: str) -> dict[str, str]:
    """{host: text} of the `LAUNCH <host> <kind> <text>` lines in `output` (last one wins)."""
    found = {}
    for line in output.splitlines():
        parts = line.split(" ", 3)
        if len(parts) >= 3 and parts[0] == MARKER and parts[2] == kind:
            found[parts[1]] = parts[3] if len(parts) == 4 else ""
    return found


def require_workers(target: Target, result: Result, kind: str, step: str) -> dict[str, str]:
    """The `kind` markers of every worker; fails fast when a worker did not report."""
    found = markers(result.output, kind)
    if not result.ok or len(found) < target.workers:
        raise LaunchError(
            f"{step}: {len(found)}/{target.workers} workers reported {kind!r} "
            f"(exit status {result.returncode}; hosts: {sorted(found) or 'none'})"
        )
    return found
