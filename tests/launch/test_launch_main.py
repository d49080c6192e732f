"""`python -m launch.main` end to end against the fake gcloud / ssh / uv (see launch_fakes.py)."""

import re
import subprocess

import pytest

WRITE_ARG = "import sys; open('arg.txt', 'w').write(sys.argv[1])"


def git(repo, *args: str) -> str:
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A clean local git repo with one commit; workers clone it by path."""
    path = tmp_path / "src"
    path.mkdir()
    git(path, "init", "-q")
    (path / "README.md").write_text("grpo\n")
    git(path, "add", "README.md")
    git(path, "commit", "-qm", "init")
    return path


def repo_flags(repo) -> list[str]:
    return [f"--local_repo={repo}", f"--repo_url={repo}"]


def gcloud_verbs(cloud) -> list[str]:
    return [
        call[4] + (" " + call[6] if call[4] == "create" else "")
        for call in cloud.calls()
        if call[0] == "gcloud"
    ]


def test_dry_run_prints_every_command_and_runs_none(fake_cloud, repo):
    sha = git(repo, "rev-parse", "HEAD")
    res = fake_cloud.launcher(
        "validate", "--dry-run", "--name=v", "--zones=a,b", *repo_flags(repo),
        "--", "python", "-c", "print(1)",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert fake_cloud.calls() == []
    assert not (fake_cloud.dir / "hosts").exists()
    printed = re.findall(r"^\+ gcloud compute tpus tpu-vm (\w+)", res.stdout, re.MULTILINE)
    assert printed == ["create", "describe", "ssh", "ssh", "ssh", "ssh", "delete"]
    assert "+ gcloud compute tpus tpu-vm create v --zone=a " in res.stdout
    for text in ["say joined", f"git checkout --quiet --detach {sha}", "uv venv", "wrapper.sh",
                 "print(1)", "say state", "tpu-vm delete v --zone=a --quiet"]:  # fmt: skip
        assert text in res.stdout


def test_dry_run_local_runs_nothing(fake_cloud, repo, tmp_path):
    res = fake_cloud.launcher("validate", "--dry_run", "--target=local", *repo_flags(repo))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("+ bash -c ") == 4 and "grpo.main" in res.stdout
    assert list((tmp_path / "home").iterdir()) == []


def test_validate_end_to_end_on_a_two_worker_tpu(fake_cloud, repo):
    fake_cloud.scenario(zones={"a": "capacity"}, workers=2)
    sha = git(repo, "rev-parse", "HEAD")
    job = "print('step 1/2'); print('step 2/2')"
    res = fake_cloud.launcher(
        "validate", "--name=v", "--zones=a,b", "--poll_s=0.05", *repo_flags(repo),
        "--", "python", "-c", job,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r'^a +capacity \(retry\) +\{"code": 8, "message": "There is no more capa',
                     res.stdout, re.M)  # fmt: skip
    assert re.search(r"^b +created", res.stdout, re.M)
    assert "[launch] result: succeeded(0) step 2/2 (exit status 0)" in res.stdout
    verbs = gcloud_verbs(fake_cloud)
    assert verbs[:6] == ["create --zone=a", "create --zone=b", "describe", "ssh", "ssh", "ssh"]
    assert set(verbs[6:-2]) == {"ssh"} and verbs[-2:] == ["delete", "describe"]
    assert fake_cloud.vms() == []  # nothing left running
    for worker in ("v-w-0", "v-w-1"):
        launch_root = fake_cloud.host_home(worker) / "grpo-launch"
        assert git(launch_root / "repo", "rev-parse", "HEAD") == sha
        assert (launch_root / "runs" / "train.exit").read_text() == "0\n"
    uv = [call[1:] for call in fake_cloud.calls() if call[0] == "uv"]
    assert uv[:3] == [
        ["venv", "--quiet", "--seed", "--python", "3.12", "venv"],
        ["pip", "install", "--quiet", "--python", uv[1][4], "-U", "jax[tpu]"],
        ["pip", "install", "--quiet", "--python", uv[1][4], "-e", uv[2][-1]],
    ]
    assert uv[1][4].endswith("/grpo-launch/venv/bin/python")
    assert uv[2][-1].endswith("/grpo-launch/repo")


def test_validate_deletes_after_a_failed_job(fake_cloud, repo):
    job = "import sys; print('step 1/2'); sys.exit(3)"
    res = fake_cloud.launcher(
        "validate", "--name=v", "--zones=a", "--poll_s=0.05", "--num_workers=1",
        *repo_flags(repo), "--", "python", "-c", job,
    )  # fmt: skip
    assert res.returncode == 3, res.stdout + res.stderr
    assert "[launch] result: failed(3) step 1/2 (exit status 3)" in res.stdout
    assert gcloud_verbs(fake_cloud)[-2:] == ["delete", "describe"]
    assert fake_cloud.vms() == []


def test_fails_fast_when_a_worker_does_not_join(fake_cloud, repo):
    fake_cloud.scenario(workers=2, silent_workers=[1])
    res = fake_cloud.launcher("validate", "--name=v", "--zones=a", *repo_flags(repo))
    assert res.returncode == 1
    assert "join: 1/2 workers reported 'joined'" in res.stderr
    assert gcloud_verbs(fake_cloud) == ["create --zone=a", "describe", "ssh", "delete", "describe"]
    assert fake_cloud.vms() == []


def test_create_stops_at_permission_and_prints_the_table(fake_cloud):
    fake_cloud.scenario(zones={"a": "quota", "b": "permission"})
    res = fake_cloud.launcher("create", "--name=v", "--zones=a,b,c", "--provisioning=on-demand")
    assert res.returncode == 1 and "no zone created v" in res.stderr
    assert gcloud_verbs(fake_cloud) == ["create --zone=a", "create --zone=b"]
    assert "--spot" not in fake_cloud.calls()[0]
    assert re.search(r"^a +quota \(retry\) .*Limit: 0\.0", res.stdout, re.M)
    assert re.search(r"^b +permission \(stop\) +PERMISSION_DENIED", res.stdout, re.M)


def test_delete_that_fails_is_loud(fake_cloud):
    fake_cloud.scenario(delete_fails=True)
    assert fake_cloud.launcher("create", "--name=v", "--zones=z").returncode == 0
    res = fake_cloud.launcher("delete", "--name=v", "--zones=z")
    assert res.returncode == 1 and "may still exist" in res.stderr


HOSTILE = """a b "c" $(touch pwned) `touch pwned` 'd' ; echo $HOME && exit 7 \\"""


@pytest.mark.parametrize("target", ["tpu", "ssh"])
def test_user_values_arrive_literally(fake_cloud, repo, target):
    if target == "tpu":
        assert fake_cloud.launcher("create", "--name=v", "--zones=z").returncode == 0
        flags, host, follow = ["--name=v", "--zones=z"], "v-w-0", "--delete_on_exit"
    else:
        flags, host = ["--target=ssh", "--host=gpu-box", "--ssh_option=ConnectTimeout=5"], "gpu-box"
        follow = "--watch"
    common = [*flags, f"--root=launch {HOSTILE}"]
    res = fake_cloud.launcher(
        "bootstrap", *common, *repo_flags(repo), f"--python={HOSTILE}", f"--jax_spec={HOSTILE}"
    )
    assert res.returncode == 0, res.stdout + res.stderr
    res = fake_cloud.launcher(
        "run", *common, follow, "--poll_s=0.05", "--", "python", "-c", WRITE_ARG, HOSTILE
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert fake_cloud.vms() == []  # tpu: deleted once the job ended
    launch_root = fake_cloud.host_home(host) / f"launch {HOSTILE}"
    assert (launch_root / "repo" / "arg.txt").read_text() == HOSTILE
    uv = [call[1:] for call in fake_cloud.calls() if call[0] == "uv"]
    assert uv[0] == ["venv", "--quiet", "--seed", "--python", HOSTILE, "venv"]
    assert uv[1][-2:] == ["-U", HOSTILE]
    assert not list(fake_cloud.dir.parent.rglob("pwned"))
    if target == "ssh":
        ssh = [call for call in fake_cloud.calls() if call[0] == "ssh"]
        assert ssh[0][:7] == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "--",
                              "gpu-box"]  # fmt: skip
        assert ssh[0][7].startswith("bash -c ") and len(ssh[0]) == 8


def test_monitor_and_stop_on_local(fake_cloud, repo, tmp_path):
    root = f"--root={tmp_path / 'lroot'}"
    flags = ["--target=local", root, "--jax_spec=", *repo_flags(repo)]
    assert fake_cloud.launcher("bootstrap", *flags).returncode == 0
    job = ["--", "python", "-c", "import time; print('step 1/9', flush=True); time.sleep(30)"]
    assert fake_cloud.launcher("run", "--target=local", root, *job).returncode == 0
    res = fake_cloud.launcher("monitor", "--target=local", root)
    assert res.returncode == 0 and "[launch] fakehost: running" in res.stdout
    assert fake_cloud.launcher("stop", "--target=local", root).returncode == 0
    res = fake_cloud.launcher("monitor", "--target=local", root)
    assert res.returncode == 143, res.stdout + res.stderr
    assert "[launch] fakehost: killed(SIGTERM) step 1/9" in res.stdout
    assert [c[1:] for c in fake_cloud.calls() if c[0] == "uv"][1][-2] == "-e"  # no JAX spec


@pytest.mark.parametrize(
    "extra, ok", [([], False), (["--allow_dirty"], True), (["--commit=HEAD"], True)]
)
def test_dirty_tree_is_refused_unless_told(fake_cloud, repo, extra, ok):
    (repo / "new_file.py").write_text("x = 1\n")
    res = fake_cloud.launcher("bootstrap", "--target=local", "--dry_run", *repo_flags(repo), *extra)
    assert (res.returncode == 0) == ok, res.stderr
    assert ok or "uncommitted changes" in res.stderr


def test_validate_checks_the_tree_before_creating_a_vm(fake_cloud, repo):
    (repo / "README.md").write_text("changed\n")
    res = fake_cloud.launcher("validate", "--name=v", "--zones=a", *repo_flags(repo))
    assert res.returncode == 1 and "uncommitted changes" in res.stderr
    assert fake_cloud.calls() == []
