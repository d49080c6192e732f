"""Detached jobs with an exit code that is always recorded, and the monitor that reads it.

A job named NAME lives in `<root>/runs/`: `NAME.log` (its stdout+stderr), `NAME.pid` (the
wrapper's pid, which is also the job's process group and session), `NAME.exit` (its exit
status; 128+N after death by signal N), `NAME.wrapper.sh` (the wrapper, WRAPPER below).
The wrapper is started with `setsid nohup`, so it
survives the ssh session; it writes `.exit` atomically (tmp file, then mv) on success, on
failure, and when the job dies by a signal. A TERM or INT sent to the wrapper is forwarded
to the job as TERM (a background job ignores INT), and the wrapper still records its end.
Only a SIGKILL of the wrapper itself (or a lost machine) leaves no `.exit`: the monitor
calls that `lost`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import shlex
import signal
import time
from collections.abc import Callable, Mapping, Sequence

from launch import remote
from launch.shell import LaunchError, Runner

# The trainer prints `step N/M`; valid both as a Python regex and a POSIX ERE (grep -E).
STEP_PATTERN = r"[Ss]tep ([0-9]+)/([0-9]+)"

# $1: the run prefix (`<root>/runs/NAME`); the rest: the job's argv.
WRAPPER = r"""
prefix=$1; shift
printf '%s\n' $$ > "$prefix.pid.tmp" && mv -f "$prefix.pid.tmp" "$prefix.pid"
child= stop=
forward() { stop=1; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null || :; }
trap forward TERM INT
"$@" >> "$prefix.log" 2>&1 < /dev/null &
child=$!
[ -z "$stop" ] || kill -TERM "$child" 2>/dev/null || :
while :; do
  wait "$child"; code=$?
  # A trapped signal interrupts `wait` early; wait again until the job has really ended.
  kill -0 "$child" 2>/dev/null || break
done
printf '[launch] exit code %s\n' "$code" >> "$prefix.log"
printf '%s\n' "$code" > "$prefix.exit.tmp" && mv -f "$prefix.exit.tmp" "$prefix.exit"
"""

_ALIVE = """alive() {
  kill -0 "$1" 2>/dev/null || return 1
  case "$(ps -o stat= -p "$1" 2>/dev/null)" in Z*) return 1 ;; esac
}"""


def _prefix_lines(root: str, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"run name {name!r}: use letters, digits, '.', '_' and '-'")
    return f'{remote.prelude(root)}\n{_ALIVE}\nmkdir -p runs\np="$root/runs/{name}"\n'


def start_script(root: str, name: str, job: Sequence[str]) -> str:
    """Starts `job` detached in `<root>/repo` with the venv active; reports `started <pid>`."""
    if not job:
        raise ValueError("the job command is empty")
    job_words = " ".join(shlex.quote(arg) for arg in job)
    return (
        _prefix_lines(root, name)
        + f"""
if [ -f "$p.pid" ] && [ ! -f "$p.exit" ] && alive "$(cat "$p.pid")"; then
  echo "run {name} is still running (pid $(cat "$p.pid")); stop it first" >&2
  exit 3
fi
rm -f "$p.pid" "$p.exit" "$p.log"
[ -d repo ] || {{ echo "no checkout in $root/repo: run bootstrap first" >&2; exit 3; }}
cd repo
# What venv/bin/activate does, without sourcing a script that embeds the path unquoted.
if [ -x "$root/venv/bin/python" ]; then
  export VIRTUAL_ENV="$root/venv" PATH="$root/venv/bin:$PATH"
  unset PYTHONHOME
fi
export PYTHONUNBUFFERED=1
cat > "$p.wrapper.sh" <<'LAUNCH_WRAPPER_END'
{WRAPPER.strip()}
LAUNCH_WRAPPER_END
setsid nohup sh "$p.wrapper.sh" "$p" {job_words} > /dev/null 2>&1 < /dev/null &
i=0
while [ ! -s "$p.pid" ] && [ "$i" -lt 500 ]; do sleep 0.02; i=$((i + 1)); done
[ -s "$p.pid" ] || {{ echo "run {name} did not start" >&2; exit 3; }}
say started "$(cat "$p.pid")"
"""
    )


def probe_script(root: str, name: str, tail_lines: int) -> str:
    """Reports `state`, the last `step` line and the last `tail_lines` `log` lines."""
    return (
        _prefix_lines(root, name)
        + f"""
if [ ! -f "$p.pid" ] && [ ! -f "$p.exit" ]; then say state missing; exit 0; fi
pid=$(cat "$p.pid" 2>/dev/null || echo -)
up=0; [ "$pid" = - ] || ! alive "$pid" || up=1
# After the liveness check: the wrapper writes .exit before it exits, so this cannot race.
code=$(cat "$p.exit" 2>/dev/null || echo -)
lines=$(($(wc -l 2>/dev/null < "$p.log" || echo 0)))
say state pid=$pid alive=$up exit=$code lines=$lines
last=$(grep -E {shlex.quote(STEP_PATTERN)} "$p.log" 2>/dev/null | tail -n 1 || :)
[ -z "$last" ] || say step "$last"
# The first $lines lines (the log only grows), so `lines` counts exactly what `log` shows.
head -n "$lines" "$p.log" 2>/dev/null | tail -n {int(tail_lines)} | while IFS= read -r l; do
  say log "$l"
done
"""
    )


def stop_script(root: str, name: str, grace_s: int = 30) -> str:
    """TERM to the job's process group; KILL after `grace_s` (recording 137). `stopped <code>`."""
    return (
        _prefix_lines(root, name)
        + f"""
pid=$(cat "$p.pid" 2>/dev/null || echo -)
if [ -f "$p.exit" ] || [ "$pid" = - ] || ! alive "$pid"; then say stopped not-running; exit 0; fi
kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || :
i=0
while [ ! -f "$p.exit" ] && [ "$i" -lt {10 * int(grace_s)} ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -f "$p.exit" ]; then
  kill -KILL -- "-$pid" 2>/dev/null || :
  printf '137\\n' > "$p.exit.tmp" && mv -f "$p.exit.tmp" "$p.exit"
fi
say stopped "$(cat "$p.exit")"
"""
    )


class State(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    KILLED = "killed"
    LOST = "lost"  # the wrapper is gone and left no exit code (SIGKILL, preemption)
    MISSING = "missing"  # no such run on this worker


@dataclasses.dataclass(frozen=True)
class WorkerStatus:
    host: str
    state: State
    exit_code: int | None = None
    pid: int | None = None
    step: tuple[int, int] | None = None
    log_lines: int = 0
    tail: tuple[str, ...] = ()

    @property
    def exit_status(self) -> int:
        """What the launcher exits with for this worker: the job's code, or 1 if unknown."""
        if self.state is State.RUNNING:
            return 0
        return 1 if self.exit_code is None else self.exit_code

    def summary(self) -> str:
        if self.state is State.KILLED:
            assert self.exit_code is not None
            text = f"killed({signal.Signals(self.exit_code - 128).name})"
        elif self.state in (State.SUCCEEDED, State.FAILED):
            text = f"{self.state.value}({self.exit_code})"
        else:
            text = self.state.value
        if self.step:
            text += f" step {self.step[0]}/{self.step[1]}"
        return text


def job_state(exit_code: int | None, alive: bool) -> State:
    """State from the recorded exit code (None: no `.exit` yet) and the wrapper's liveness."""
    if exit_code is None:
        return State.RUNNING if alive else State.LOST
    if exit_code == 0:
        return State.SUCCEEDED
    valid_signals = {s.value for s in signal.Signals}
    if exit_code > 128 and exit_code - 128 in valid_signals:
        return State.KILLED
    return State.FAILED


def _fields(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.strip().lstrip("-").isdigit() else None


def parse_probe(output: str) -> dict[str, WorkerStatus]:
    """{host: status} from the output of `probe_script` on one or more workers."""
    tails: dict[str, list[str]] = {}
    for line in output.splitlines():
        parts = line.split(" ", 3)
        if len(parts) >= 3 and parts[0] == remote.MARKER and parts[2] == "log":
            tails.setdefault(parts[1], []).append(parts[3] if len(parts) == 4 else "")
    steps = remote.markers(output, "step")
    statuses = {}
    for host, text in remote.markers(output, "state").items():
        if text == "missing":
            statuses[host] = WorkerStatus(host, State.MISSING)
            continue
        fields = _fields(text)
        code = _int_or_none(fields.get("exit"))
        match = re.search(STEP_PATTERN, steps.get(host, ""))
        statuses[host] = WorkerStatus(
            host=host,
            state=job_state(code, fields.get("alive") == "1"),
            exit_code=code,
            pid=_int_or_none(fields.get("pid")),
            step=(int(match.group(1)), int(match.group(2))) if match else None,
            log_lines=_int_or_none(fields.get("lines")) or 0,
            tail=tuple(tails.get(host, ())),
        )
    return statuses


def overall(statuses: Mapping[str, WorkerStatus]) -> WorkerStatus:
    """One status for the job: the first worker that ended badly, else running, else success.

    A multi-host job whose worker has failed will not finish, so one bad worker decides.
    """
    ordered = [statuses[host] for host in sorted(statuses)]
    if not ordered:
        return WorkerStatus("-", State.LOST)
    for status in ordered:
        if status.state not in (State.RUNNING, State.SUCCEEDED):
            return status
    for status in ordered:
        if status.state is State.RUNNING:
            return status
    return ordered[0]


def probe(
    runner: Runner,
    target: remote.Target,
    root: str,
    name: str,
    tail_lines: int,
    *,
    show: bool = True,
) -> dict[str, WorkerStatus]:
    return parse_probe(
        runner.run(target.shell(probe_script(root, name, tail_lines)), show=show).output
    )


def watch(
    runner: Runner,
    target: remote.Target,
    root: str,
    name: str,
    *,
    poll_s: float,
    timeout_s: float,
    tail_lines: int = 50,
    max_failed_probes: int = 5,
    out: Callable[[str], None] = print,
) -> tuple[WorkerStatus, bool]:
    """Polls until the job ends, printing new log lines and state changes.

    Returns (overall status, timed_out). A probe where a worker does not answer is retried;
    `max_failed_probes` in a row make the job `lost` (a preempted VM stops answering).
    """
    printed: dict[str, int] = {}
    last_summary = ""
    failed_probes = 0
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    while True:
        statuses = probe(runner, target, root, name, tail_lines, show=False)
        if len(statuses) < target.workers:
            failed_probes += 1
            out(
                f"[launch] probe: {len(statuses)}/{target.workers} workers answered "
                f"({failed_probes}/{max_failed_probes})"
            )
            if failed_probes >= max_failed_probes:
                return WorkerStatus("-", State.LOST), False
        else:
            failed_probes = 0
            for host in sorted(statuses):
                status = statuses[host]
                new = status.log_lines - printed.get(host, 0)
                tag = f"[{host}] " if target.workers > 1 else ""
                if new > len(status.tail):
                    out(f"{tag}[launch] ... {new - len(status.tail)} lines not shown")
                for line in status.tail[max(0, len(status.tail) - new) :]:
                    out(tag + line)
                printed[host] = status.log_lines
            job = overall(statuses)
            summary = ", ".join(f"{h}: {s.summary()}" for h, s in sorted(statuses.items()))
            if summary != last_summary:
                out(f"[launch] {summary}")
                last_summary = summary
            if job.state is not State.RUNNING:
                return job, False
        if deadline is not None and time.monotonic() > deadline:
            return overall(statuses), True
        time.sleep(poll_s)


def start(
    runner: Runner, target: remote.Target, root: str, name: str, job: Sequence[str]
) -> dict[str, str]:
    """Starts the job on every worker; if one did not start, stops the others and fails."""
    result = runner.run(target.shell(start_script(root, name, job)), stream=True)
    if runner.dry_run:
        return {}
    try:
        return remote.require_workers(target, result, "started", "run")
    except LaunchError:
        if remote.markers(result.output, "started"):  # some workers did start: end them
            stop(runner, target, root, name)
        raise


def stop(
    runner: Runner, target: remote.Target, root: str, name: str, grace_s: int = 30
) -> dict[str, str]:
    """Stops the job on every worker; {host: recorded exit code or 'not-running'}."""
    result = runner.run(target.shell(stop_script(root, name, grace_s)), stream=True)
    return remote.markers(result.output, "stopped")


def print_status(statuses: Mapping[str, WorkerStatus], tail_lines: int) -> None:
    for host in sorted(statuses):
        status = statuses[host]
        for line in status.tail[-tail_lines:] if tail_lines else ():
            print(f"[{host}] {line}")
        pid = f" pid {status.pid}" if status.pid else ""
        print(f"[launch] {host}: {status.summary()}{pid}", flush=True)
