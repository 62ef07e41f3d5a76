"""Which commit a benchmark measured: LORAPLEX_COMMIT when set, else `git rev-parse HEAD`.

A GPU host's copy of the tree may carry a stale .git (seen on 2026-11-27: every benchmark read
the session's first commit), so the command that sends the tree names the commit it sent.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """The measured commit, or "unknown" outside a git checkout."""
    if os.environ.get("LORAPLEX_COMMIT"):
        return os.environ["LORAPLEX_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
