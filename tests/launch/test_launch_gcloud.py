"""gcloud argv builders, failure classes, and create with zone fallback against a fake gcloud."""

import pytest
from launch_fakes import ERRORS

from launch import gcloud
from launch.gcloud import Failure
from launch.shell import Runner

VM = gcloud.TpuVm(name="grpo-val", project="demo")


def create_call(zone: str) -> list[str]:
    return [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "grpo-val", f"--zone={zone}",
        "--project=demo", "--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e", "--spot",
        "--quiet",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "text, failure",
    [
        *[(ERRORS[k].format(zone="us-east5-b", name="n"), Failure(k)) for k in ERRORS],
        ("Quota limit 'TPUV6E-SPOT' has been exceeded. Limit: 0.0 in region us-east1.", "quota"),
        ("ZONE_RESOURCE_POOL_EXHAUSTED: insufficient capacity for v6e-8", "capacity"),
        ('{"code": 5, "message": "Reservation projects/p/reservations/r does not exist"}',
         "reservation"),
        ("ERROR: (gcloud.compute.tpus.tpu-vm.create) User [me@x.com] does not have permission "
         "to access projects instance [demo]", "permission"),
        ("Cloud TPU received a bad request. the accelerator v4-128 was not found in zone "
         "us-central2-b [EID: 0x945e]", "unavailable"),
        ("Could not fetch resource: - The resource 'projects/p/zones/us-west1-b/acceleratorTypes/"
         "v6e-8' was not found", "unavailable"),
        ("INVALID_ARGUMENT: Accelerator type v6e-8 is not available in zone us-central1-a",
         "unavailable"),
        ("ERROR: (gcloud.compute.tpus.tpu-vm.create) INVALID_ARGUMENT: Invalid runtime version",
         "other"),
        ("", "other"),
    ],
)  # fmt: skip
def test_classify(text, failure):
    assert gcloud.classify(text) is Failure(failure)


def test_retryable_classes():
    assert gcloud.RETRYABLE == {
        Failure.CAPACITY, Failure.QUOTA, Failure.RESERVATION, Failure.UNAVAILABLE
    }  # fmt: skip


@pytest.mark.parametrize(
    "provisioning, flags", [("spot", ["--spot"]), ("on-demand", []), ("reserved", ["--reserved"])]
)
def test_create_argv(provisioning, flags):
    vm = gcloud.TpuVm("t", accelerator_type="v5litepod-16", runtime_version="v2-alpha-tpuv5-lite",
                      provisioning=provisioning)  # fmt: skip
    assert gcloud.create_argv(vm, "z") == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "t", "--zone=z",
        "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", *flags, "--quiet",
    ]  # fmt: skip


def test_ssh_delete_describe_argv():
    base = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert gcloud.ssh_argv(VM, "z", "echo 'a b'") == [
        *base, "ssh", "grpo-val", "--zone=z", "--project=demo", "--worker=all", "--quiet",
        "--command=echo 'a b'",
    ]  # fmt: skip
    assert gcloud.delete_argv(VM, "z") == [
        *base, "delete", "grpo-val", "--zone=z", "--project=demo", "--quiet"
    ]  # fmt: skip
    assert gcloud.describe_argv(VM, "z")[4:] == [
        "describe", "grpo-val", "--zone=z", "--project=demo", "--format=json"
    ]  # fmt: skip


def test_bad_vm_spec():
    with pytest.raises(ValueError, match="provisioning"):
        gcloud.TpuVm("t", provisioning="cheap")
    with pytest.raises(ValueError, match="--name"):
        gcloud.TpuVm("")


def test_worker_count():
    two = '{"networkEndpoints": [{"ipAddress": "a"}, {"ipAddress": "b"}]}'
    assert gcloud.worker_count(two) == 2
    with pytest.raises(ValueError, match="no networkEndpoints"):
        gcloud.worker_count('{"state": "CREATING"}')
    with pytest.raises(ValueError, match="JSON"):
        gcloud.worker_count("ERROR: not found")


def test_fallback_moves_past_retryable_zones(fake_cloud):
    fake_cloud.scenario(
        zones={"a": "capacity", "b": "quota", "c": "reservation", "d": "unavailable"}
    )
    zone, attempts = gcloud.create_with_fallback(Runner(), VM, ["a", "b", "c", "d", "e", "f"])
    assert zone == "e"
    assert fake_cloud.calls() == [create_call(z) for z in "abcde"]
    assert [(a.zone, a.failure) for a in attempts] == [
        ("a", Failure.CAPACITY), ("b", Failure.QUOTA), ("c", Failure.RESERVATION),
        ("d", Failure.UNAVAILABLE), ("e", None),
    ]  # fmt: skip
    assert attempts[1].message == (
        "RESOURCE_EXHAUSTED: Quota 'TPUV6E_SPOT_PER_PROJECT_PER_ZONE' exceeded. "
        "Limit: 0.0 in zone b."
    )
    assert fake_cloud.vms() == ["e/grpo-val"]


@pytest.mark.parametrize("failure", ["permission", "other"])
def test_fallback_stops_at_non_retryable(fake_cloud, failure):
    fake_cloud.scenario(zones={"a": "capacity", "b": failure})
    zone, attempts = gcloud.create_with_fallback(Runner(), VM, ["a", "b", "c"])
    assert zone is None
    assert fake_cloud.calls() == [create_call("a"), create_call("b")]
    assert [a.failure for a in attempts] == [Failure.CAPACITY, Failure(failure)]
    assert fake_cloud.vms() == []


def test_fallback_all_zones_exhausted(fake_cloud):
    fake_cloud.scenario(zones={"a": "capacity", "b": "capacity"})
    zone, attempts = gcloud.create_with_fallback(Runner(), VM, ["a", "b"])
    assert zone is None and [a.zone for a in attempts] == ["a", "b"]


def test_format_attempts():
    attempts = [
        gcloud.Attempt("us-east5-b", Failure.CAPACITY, "ERROR: no more capacity"),
        gcloud.Attempt("eu-w4-a", Failure.PERMISSION, "x" * 20),
        gcloud.Attempt("z", None, "created"),
    ]
    assert gcloud.format_attempts(attempts, width=10).splitlines() == [
        "zone" + " " * 8 + "result" + " " * 13 + "message",
        "us-east5-b" + " " * 2 + "capacity (retry)" + " " * 3 + "ERROR: ...",
        "eu-w4-a" + " " * 5 + "permission (stop)" + " " * 2 + "xxxxxxx...",
        "z" + " " * 11 + "created" + " " * 12 + "created",
    ]
