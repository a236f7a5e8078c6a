"""Which code produced a result: every result file records it (``job.json``, ``summary.json``,
a sweep's rows), so that a number can be traced to the exact source that computed it."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import trainact


@functools.cache
def code_identity() -> dict[str, Any]:
    """The trainact version, a SHA-256 of the imported package's Python sources, and, where the
    package is a git checkout's, its commit and whether the package's files differ from it
    (``git_dirty``; uncommitted or untracked). Computed once per process."""
    package = Path(trainact.__file__).parent
    return {
        "trainact": trainact.__version__,
        "sources_sha256": sources_sha256(package),
        **_git(package),
    }


def sources_sha256(package: Path) -> str:
    """SHA-256 over every ``.py`` file under ``package``: its path and its bytes, in order."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _git(package: Path) -> dict[str, Any]:
    """``git_commit`` and ``git_dirty`` where ``package`` is tracked by git; else nothing (an
    installed wheel, or git absent)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(package), *args], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # tracked: not a wheel in a checkout
        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git_commit": commit, "git_dirty": bool(changes)}
