r"""Validate a commit on a TPU VM or a GPU machine: create, bootstrap, run, monitor, delete.

    python -m launch.main COMMAND [flags] [-- JOB ARGV ...]

Commands: create, bootstrap, run, monitor, stop, delete, validate (all of them in a row, with
the VM deleted at the end, failure included). Flag names take `_` or `-` (`--dry-run`).
The job is the argv after `--` (default: the trainer smoke run); it reaches the workers word
for word. See launch/README.md.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

from launch import bootstrap, detached, gcloud, remote
from launch.shell import LaunchError, Runner

COMMANDS = ("create", "bootstrap", "run", "monitor", "stop", "delete", "validate")

# The trainer smoke run (gin/gsm8k.gin's header): 3 steps, 1 prompt x 8 samples, 64 new tokens.
DEFAULT_JOB = (
    "python",
    "-m",
    "grpo.main",
    "--gin_file=gin/gsm8k.gin",
    "--gin_bindings=TrainConfig.num_steps=3",
    "--gin_bindings=TrainConfig.prompts_per_step=1",
    "--gin_bindings=TrainConfig.num_generations=8",
    "--gin_bindings=make_sampling.max_new_tokens=64",
    "--gin_bindings=TrainConfig.eval_every_steps=0",
    "--workdir=runs/smoke",
)

FLAGS = flags.FLAGS
flags.DEFINE_enum("target", "tpu", ["tpu", "ssh", "local"], "Where the job runs.")
flags.DEFINE_bool("dry_run", False, "Print every command; run none.")
# TPU VM
flags.DEFINE_string("name", None, "TPU VM name.")
flags.DEFINE_list("zones", [], "Zones to try in order (create); other commands take one.")
flags.DEFINE_string("project", None, "GCP project (default: gcloud's).")
flags.DEFINE_string("accelerator_type", "v6e-8", "TPU accelerator type.")
flags.DEFINE_string("runtime_version", "v2-alpha-tpuv6e", "TPU VM runtime version.")
flags.DEFINE_enum("provisioning", "spot", list(gcloud.PROVISIONING), "TPU VM pricing model.")
flags.DEFINE_integer("num_workers", 0, "Workers the TPU VM must have; 0: ask gcloud describe.")
flags.DEFINE_bool(
    "delete_on_exit",
    False,
    "Delete the TPU VM once the job ends, failure included "
    "(validate: on unless --nodelete_on_exit).",
)
# ssh
flags.DEFINE_string("host", None, "ssh target, [user@]host (--target=ssh).")
flags.DEFINE_multi_string("ssh_option", [], "Passed to ssh as `-o OPTION` (repeatable).")
# bootstrap
flags.DEFINE_string("root", "grpo-launch", "Launch directory on each worker (relative: $HOME).")
flags.DEFINE_string("local_repo", ".", "The local checkout that names the commit.")
flags.DEFINE_string("repo_url", None, "URL the workers clone (default: local origin).")
flags.DEFINE_string("commit", None, "Commit to run (default: local HEAD, which must be clean).")
flags.DEFINE_bool("allow_dirty", False, "Run local HEAD even with uncommitted changes.")
flags.DEFINE_string("python", "3.12", "Python for the venv (a version uv finds or fetches).")
flags.DEFINE_string(
    "jax_spec", None, "pip spec for JAX (default: jax[tpu] / jax[cuda13] on ssh / none local)."
)
# run / monitor
flags.DEFINE_string("run_name", "train", "Names <root>/runs/<run_name>.{log,pid,exit}.")
flags.DEFINE_bool("watch", False, "run/monitor: follow the job until it ends.")
flags.DEFINE_float("poll_s", 30.0, "Seconds between monitor polls.")
flags.DEFINE_float("timeout_s", 3600.0, "Stop a watched job after this long; 0: no limit.")
flags.DEFINE_integer("tail_lines", 20, "Log lines a monitor poll reads.")
flags.DEFINE_integer("stop_grace_s", 30, "stop: seconds between TERM and KILL.")


def _vm() -> gcloud.TpuVm:
    return gcloud.TpuVm(
        name=FLAGS.name or "",
        accelerator_type=FLAGS.accelerator_type,
        runtime_version=FLAGS.runtime_version,
        provisioning=FLAGS.provisioning,
        project=FLAGS.project,
    )


def _one_zone() -> str:
    if len(FLAGS.zones) != 1:
        raise app.UsageError(f"this command needs exactly one --zones value, got {FLAGS.zones}")
    return FLAGS.zones[0]


def _target(runner: Runner, zone: str | None = None) -> remote.Target:
    if FLAGS.target == "local":
        return remote.LocalTarget()
    if FLAGS.target == "ssh":
        if not FLAGS.host:
            raise app.UsageError("--target=ssh needs --host")
        return remote.SshTarget(FLAGS.host, tuple(FLAGS.ssh_option))
    vm, zone = _vm(), zone or _one_zone()
    workers = FLAGS.num_workers
    if workers <= 0:
        result = runner.run(gcloud.describe_argv(vm, zone))
        if not result.ok and not runner.dry_run:
            raise LaunchError(f"gcloud describe {vm.name} in {zone} failed: {result.output}")
        workers = 1 if runner.dry_run else gcloud.worker_count(result.output)
    return remote.TpuTarget(vm, zone, workers)


def cmd_create(runner: Runner) -> str:
    vm = _vm()
    zone, attempts = gcloud.create_with_fallback(runner, vm, FLAGS.zones)
    print(gcloud.format_attempts(attempts), flush=True)
    if zone is None:
        raise LaunchError(f"no zone created {vm.name} (see the table above)")
    print(
        f"[launch] created {vm.name} in {zone}; delete it with: "
        f"python -m launch.main delete --name={vm.name} --zones={zone}",
        flush=True,
    )
    return zone


def cmd_delete(runner: Runner, zone: str) -> None:
    """Deletes the VM, then checks gcloud no longer knows it."""
    vm = _vm()
    deleted = runner.run(gcloud.delete_argv(vm, zone), stream=True)
    if runner.dry_run:
        return
    check = runner.run(gcloud.describe_argv(vm, zone))
    if not deleted.ok or check.ok or "not found" not in check.output.lower():
        raise LaunchError(
            f"{vm.name} in {zone} may still exist (it bills): delete it by hand: "
            f"gcloud compute tpus tpu-vm delete {vm.name} --zone={zone}"
        )
    print(f"[launch] deleted {vm.name} in {zone}", flush=True)


def _checkout() -> bootstrap.Checkout:
    return bootstrap.resolve_checkout(
        FLAGS.local_repo, FLAGS.repo_url, FLAGS.commit, FLAGS.allow_dirty
    )


def cmd_bootstrap(runner: Runner, target: remote.Target, checkout: bootstrap.Checkout) -> None:
    """Checks every worker answers, then syncs the exact commit and installs on each."""
    jax_spec = FLAGS.jax_spec if FLAGS.jax_spec is not None else bootstrap.JAX_SPECS[FLAGS.target]
    joined = runner.run(target.shell(remote.prelude(FLAGS.root) + "\nsay joined"))
    script = bootstrap.bootstrap_script(FLAGS.root, checkout, FLAGS.python, jax_spec)
    if not runner.dry_run:
        remote.require_workers(target, joined, "joined", "join")
    result = runner.run(target.shell(script), stream=True)
    if runner.dry_run:
        return
    found = remote.require_workers(target, result, "bootstrapped", "bootstrap")
    wrong = {h: t for h, t in found.items() if t.split(" ")[0] != checkout.commit}
    if wrong:
        raise LaunchError(f"bootstrap: workers are not at {checkout.commit}: {wrong}")
    print(f"[launch] {len(found)} worker(s) at {checkout.commit}", flush=True)


def _stop(runner: Runner, target: remote.Target) -> dict[str, str]:
    return detached.stop(runner, target, FLAGS.root, FLAGS.run_name, FLAGS.stop_grace_s)


def _finish(runner: Runner, target: remote.Target) -> int:
    """Watches the job to its end (stopping it at the timeout); returns its exit status."""
    if runner.dry_run:
        runner.run(target.shell(detached.probe_script(FLAGS.root, FLAGS.run_name, 0)))
        return 0
    status, timed_out = detached.watch(
        runner,
        target,
        FLAGS.root,
        FLAGS.run_name,
        poll_s=FLAGS.poll_s,
        timeout_s=FLAGS.timeout_s,
        tail_lines=max(FLAGS.tail_lines, 50),
    )
    if timed_out or (target.workers > 1 and status.state is not detached.State.SUCCEEDED):
        # Fail fast: a multi-host job with one failed worker would hang; end the others too.
        _stop(runner, target)
    if timed_out:
        print(f"[launch] timed out after {FLAGS.timeout_s:.0f}s; stopped the job", flush=True)
        final = detached.probe(runner, target, FLAGS.root, FLAGS.run_name, 0)
        status = detached.overall(final) if final else status
    print(f"[launch] result: {status.summary()} (exit status {status.exit_status})", flush=True)
    return 1 if timed_out and status.exit_status == 0 else status.exit_status


def _deleting_on_exit(runner: Runner, body: Callable[[], int]) -> int:
    """Runs `body`; then, with --delete_on_exit, deletes the TPU VM whatever happened."""
    try:
        return body()
    finally:
        if FLAGS.delete_on_exit and FLAGS.target == "tpu":
            cmd_delete(runner, _one_zone())


def cmd_run(runner: Runner, target: remote.Target, job: Sequence[str]) -> int:
    """Starts the job; with --watch or --delete_on_exit follows it to the end."""
    started = detached.start(runner, target, FLAGS.root, FLAGS.run_name, job)
    if started:
        print(f"[launch] started {FLAGS.run_name}: {started}", flush=True)
    if FLAGS.watch or FLAGS.delete_on_exit:
        return _finish(runner, target)
    return 0


def cmd_monitor(runner: Runner, target: remote.Target) -> int:
    """One look at the job (exit status: its own once ended), or with --watch to its end."""
    if FLAGS.watch or FLAGS.delete_on_exit:
        return _finish(runner, target)
    statuses = detached.probe(runner, target, FLAGS.root, FLAGS.run_name, FLAGS.tail_lines)
    if runner.dry_run:
        return 0
    detached.print_status(statuses, FLAGS.tail_lines)
    if len(statuses) < target.workers:
        raise LaunchError(f"monitor: {len(statuses)}/{target.workers} workers answered")
    return detached.overall(statuses).exit_status


def cmd_validate(runner: Runner, job: Sequence[str]) -> int:
    """create -> bootstrap -> run -> watch -> delete; the VM goes whatever happens in between."""
    tpu = FLAGS.target == "tpu"
    delete = FLAGS.delete_on_exit or not FLAGS["delete_on_exit"].present
    checkout = _checkout()  # a dirty tree fails before any VM exists
    zone, target, running = None, None, False
    try:
        zone = cmd_create(runner) if tpu else None
        target = _target(runner, zone)
        cmd_bootstrap(runner, target, checkout)
        detached.start(runner, target, FLAGS.root, FLAGS.run_name, job)
        running = True
        code = _finish(runner, target)
        running = False
        return code
    finally:
        if target is not None and running and not runner.dry_run:
            print("[launch] interrupted: stopping the job", flush=True)
            _stop(runner, target)
        if tpu and zone is not None and delete:
            cmd_delete(runner, zone)


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m launch.main {{{','.join(COMMANDS)}}} [flags]")
    command, job = argv[1], tuple(argv[2:]) or DEFAULT_JOB
    if len(argv) > 2 and command not in ("run", "validate"):
        raise app.UsageError(f"{command} takes no job command: {list(argv[2:])}")
    runner = Runner(dry_run=FLAGS.dry_run)
    try:
        if command == "validate":
            return cmd_validate(runner, job)
        if command == "create":
            cmd_create(runner)
            return 0
        if command == "delete":
            cmd_delete(runner, _one_zone())
            return 0
        if command == "run":
            return _deleting_on_exit(runner, lambda: cmd_run(runner, _target(runner), job))
        if command == "monitor":
            return _deleting_on_exit(runner, lambda: cmd_monitor(runner, _target(runner)))
        if command == "bootstrap":
            checkout = _checkout()
            cmd_bootstrap(runner, _target(runner), checkout)
            return 0
        stopped = _stop(runner, _target(runner))
        print(f"[launch] stopped: {stopped}", flush=True)
        return 0
    except (LaunchError, ValueError) as e:
        print(f"[launch] error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("[launch] interrupted", file=sys.stderr, flush=True)
        return 130


def _normalize(argv: Sequence[str]) -> list[str]:
    """`--dry-run` -> `--dry_run` for the launcher's own flags (before `--`)."""
    out = list(argv[:1])
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--":
            return out + list(argv[i:])
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


def run() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app.run(main, flags_parser=lambda argv: app.parse_flags_with_usage(_normalize(argv)))


if __name__ == "__main__":
    run()
