"""TPU VM commands over `gcloud`: argv builders, failure classes, and create with zone fallback."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Sequence

from launch.shell import Runner

PROVISIONING = ("spot", "on-demand", "reserved")
_PROVISIONING_FLAGS = {"spot": ["--spot"], "on-demand": [], "reserved": ["--reserved"]}


class Failure(enum.Enum):
    CAPACITY = "capacity"
    QUOTA = "quota"
    RESERVATION = "reservation"
    UNAVAILABLE = "unavailable"  # the zone does not offer this accelerator type
    PERMISSION = "permission"
    OTHER = "other"


# Another zone may answer differently for these; the rest would fail the same way everywhere.
RETRYABLE = frozenset({Failure.CAPACITY, Failure.QUOTA, Failure.RESERVATION, Failure.UNAVAILABLE})

# First match wins. Quota and reservation errors often also say RESOURCE_EXHAUSTED or
# "capacity", so they are tested before capacity.
_FAILURE_PATTERNS = (
    (Failure.QUOTA, r"quota"),
    (
        Failure.RESERVATION,
        r"reservation.*(not (be )?found|does not exist)|no (matching |such )?reservation",
    ),
    (
        Failure.CAPACITY,
        r"no more capacity|insufficient capacity|out of capacity|resource_exhausted|stockout"
        r"|resource_pool_exhausted|not enough resources",
    ),
    (
        # As the TPU API words it ("the accelerator v4-128 was not found in zone ...") and the
        # compute API ("acceleratorTypes/v6e-8' was not found").
        Failure.UNAVAILABLE,
        r"accelerator \S+ (was )?not found in zone|acceleratortypes/[^\s']+'? was not found"
        r"|accelerator type \S+ is not (available|supported|offered) in",
    ),
    (
        Failure.PERMISSION,
        r"permission_denied|permission .*denied|does not have .*permission|forbidden"
        r"|unauthenticated|active account",
    ),
)


def classify(output: str) -> Failure:
    """The failure class of a failed `gcloud ... create` from its output."""
    for failure, pattern in _FAILURE_PATTERNS:
        if re.search(pattern, output, re.IGNORECASE):
            return failure
    return Failure.OTHER


@dataclasses.dataclass(frozen=True)
class TpuVm:
    """A TPU VM by name; `zone` is set once it exists."""

    name: str
    accelerator_type: str = "v6e-8"
    runtime_version: str = "v2-alpha-tpuv6e"
    provisioning: str = "spot"
    project: str | None = None

    def __post_init__(self) -> None:
        if self.provisioning not in PROVISIONING:
            raise ValueError(f"provisioning {self.provisioning!r} is not one of {PROVISIONING}")
        if not self.name:
            raise ValueError("a TPU VM needs a --name")


def _base(verb: str, vm: TpuVm, zone: str) -> list[str]:
    argv = ["gcloud", "compute", "tpus", "tpu-vm", verb, vm.name, f"--zone={zone}"]
    return argv + ([f"--project={vm.project}"] if vm.project else [])


def create_argv(vm: TpuVm, zone: str) -> list[str]:
    return [
        *_base("create", vm, zone),
        f"--accelerator-type={vm.accelerator_type}",
        f"--version={vm.runtime_version}",
        *_PROVISIONING_FLAGS[vm.provisioning],
        "--quiet",
    ]


def delete_argv(vm: TpuVm, zone: str) -> list[str]:
    return [*_base("delete", vm, zone), "--quiet"]


def describe_argv(vm: TpuVm, zone: str) -> list[str]:
    return [*_base("describe", vm, zone), "--format=json"]


def ssh_argv(vm: TpuVm, zone: str, remote_command: str) -> list[str]:
    """`remote_command` is one string the VM's login shell parses, on every worker at once."""
    return [*_base("ssh", vm, zone), "--worker=all", "--quiet", f"--command={remote_command}"]


def worker_count(describe_output: str) -> int:
    """Workers of a TPU VM (one network endpoint each) from `describe --format=json`."""
    try:
        endpoints = json.loads(describe_output).get("networkEndpoints", [])
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"gcloud describe did not return a JSON object: {e}") from e
    if not endpoints:
        raise ValueError("gcloud describe lists no networkEndpoints (is the VM READY?)")
    return len(endpoints)


@dataclasses.dataclass(frozen=True)
class Attempt:
    zone: str
    failure: Failure | None  # None: created
    message: str


def _error_line(output: str) -> str:
    """The last error line, without gcloud's `ERROR: (gcloud.compute...)` prefix."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line]
    return re.sub(r"^ERROR: \(gcloud[^)]*\)\s*", "", (errors or lines or ["(no output)"])[-1])


def create_with_fallback(
    runner: Runner, vm: TpuVm, zones: Sequence[str]
) -> tuple[str | None, list[Attempt]]:
    """Tries `zones` in order; moves on only after a retryable failure. Returns (zone, attempts)."""
    if not zones:
        raise ValueError("create needs at least one zone (--zones)")
    attempts = []
    for zone in zones:
        result = runner.run(create_argv(vm, zone), stream=True)
        if result.ok:
            attempts.append(Attempt(zone, None, "created"))
            return zone, attempts
        failure = classify(result.output)
        attempts.append(Attempt(zone, failure, _error_line(result.output)))
        if failure not in RETRYABLE:
            break
    return None, attempts


def format_attempts(attempts: Sequence[Attempt], width: int = 100) -> str:
    """A table of what each zone answered, in the order asked."""
    rows = [("zone", "result", "message")]
    for a in attempts:
        result = "created" if a.failure is None else a.failure.value
        if a.failure is not None:
            result += " (retry)" if a.failure in RETRYABLE else " (stop)"
        message = a.message if len(a.message) <= width else a.message[: width - 3] + "..."
        rows.append((a.zone, result, message))
    zone_w = max(len(r[0]) for r in rows)
    result_w = max(len(r[1]) for r in rows)
    return "\n".join(f"{z:<{zone_w}}  {r:<{result_w}}  {m}".rstrip() for z, r, m in rows)
