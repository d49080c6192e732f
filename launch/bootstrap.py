"""Bootstrap a worker: clone the repo at one exact commit, build a venv, install JAX + the package.

Layout under the launch root (default `~/grpo-launch` on each worker): `repo/` (the checkout),
`venv/` (made by uv, which also fetches the Python version asked for when the OS lacks it),
`runs/` (detached jobs, see detached.py).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess

from launch import remote
from launch.shell import LaunchError

# `pip install` spec of JAX per target; empty installs only what the package requires.
JAX_SPECS = {"tpu": "jax[tpu]", "ssh": "jax[cuda13]", "local": ""}

_FULL_SHA = re.compile(r"[0-9a-f]{40}")


@dataclasses.dataclass(frozen=True)
class Checkout:
    repo_url: str
    commit: str  # a full 40-hex SHA

    def __post_init__(self) -> None:
        if not _FULL_SHA.fullmatch(self.commit):
            raise ValueError(f"commit {self.commit!r} is not a full 40-hex SHA")
        if not self.repo_url:
            raise ValueError("a checkout needs a repository URL (--repo_url)")


def _git(repo_dir: str, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", repo_dir, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise LaunchError(f"git {' '.join(args)} in {repo_dir} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def resolve_checkout(
    repo_dir: str, repo_url: str | None, commit: str | None, allow_dirty: bool
) -> Checkout:
    """The commit to run: `commit` (expanded to a full SHA) or this tree's HEAD.

    Read-only git queries. HEAD of a tree with uncommitted or untracked files is refused
    (the workers would run something else) unless `allow_dirty`.
    """
    try:
        url = repo_url or _git(repo_dir, "remote", "get-url", "origin")
    except LaunchError as e:
        raise LaunchError(f"{e}; pass --repo_url (a URL the workers can clone)") from e
    if commit is None:
        dirty = _git(repo_dir, "status", "--porcelain")
        if dirty and not allow_dirty:
            first = dirty.splitlines()[0]
            raise LaunchError(
                f"{repo_dir} has uncommitted changes ({first!r} ...): commit and push them, "
                "pass --commit, or pass --allow_dirty to run HEAD without them"
            )
        commit = "HEAD"
    if not _FULL_SHA.fullmatch(commit):
        commit = _git(repo_dir, "rev-parse", "--verify", f"{commit}^{{commit}}")
    return Checkout(url, commit)


def sync_script(checkout: Checkout) -> str:
    """Bash lines (run in the launch root) that leave `repo/` checked out at exactly the commit."""
    url, sha = shlex.quote(checkout.repo_url), shlex.quote(checkout.commit)
    return f"""
[ -d repo/.git ] || git clone --quiet -- {url} repo
cd repo
git remote set-url origin {url}
git cat-file -e {sha}^{{commit}} 2>/dev/null || git fetch --quiet origin || :
git cat-file -e {sha}^{{commit}} 2>/dev/null || git fetch --quiet origin {sha} || :
if ! git cat-file -e {sha}^{{commit}} 2>/dev/null; then
  echo "commit "{sha}" is not in "{url}": push it first" >&2
  exit 3
fi
git checkout --quiet --detach {sha}
[ "$(git rev-parse HEAD)" = {sha} ]
cd "$root"
"""


def python_script(python: str, jax_spec: str) -> str:
    """Bash lines (run in the launch root) that make `venv/` and install JAX and the package."""
    install = 'uv pip install --quiet --python "$root/venv/bin/python"'
    jax_line = f"{install} -U {shlex.quote(jax_spec)}" if jax_spec else ""
    return f"""
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --quiet --user uv \\
    || python3 -m pip install --quiet --user --break-system-packages uv \\
    || curl -LsSf https://astral.sh/uv/install.sh | sh
fi
[ -x venv/bin/python ] || uv venv --quiet --seed --python {shlex.quote(python)} venv
{jax_line}
{install} -e "$root/repo"
"""


def bootstrap_script(root: str, checkout: Checkout, python: str, jax_spec: str) -> str:
    """The whole bootstrap; every worker ends with `LAUNCH <host> bootstrapped <sha> <python>`."""
    report = 'say bootstrapped "$(git -C repo rev-parse HEAD)" "$(venv/bin/python -V 2>&1)"'
    return remote.prelude(root) + sync_script(checkout) + python_script(python, jax_spec) + report
