"""Runs commands as argv lists (never through a local shell), or only prints them (--dry-run)."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from collections.abc import Sequence


class LaunchError(RuntimeError):
    """A launch step failed; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class Result:
    returncode: int
    output: str  # stdout and stderr, interleaved as the command wrote them

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclasses.dataclass(frozen=True)
class Runner:
    """Every launcher command goes through `run`; under `dry_run` it is printed and not run."""

    dry_run: bool = False

    def run(self, argv: Sequence[str], *, stream: bool = False, show: bool = True) -> Result:
        """Runs `argv`; `stream` echoes its output live; `show=False` hides a repeated poll."""
        if show or self.dry_run:
            print("+ " + shlex.join(argv), flush=True)
        if self.dry_run:
            return Result(0, "")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
        except FileNotFoundError:
            return Result(127, f"command not found: {argv[0]}\n")
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if stream:
                sys.stdout.write(line)
                sys.stdout.flush()
        return Result(proc.wait(), "".join(lines))
