"""Triton's interpreter for the kernel tests: each test file runs its cases in a child pytest.

The interpreter must be on before triton decorates anything (it interprets triton.language's own
jitted helpers too), so a file's interpreter cases run in a child process started with
TRITON_INTERPRET=1; the parent, where the rest of the suite runs, only starts it and reads the
result. The interpreter computes through numpy, which has no bf16, and numpy 2.4 broke it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# numpy 2.3 warns where Triton's interpreter turns a loop bound into an int (numpy 2.4 raises).
QUIET = ["-W", "ignore:Conversion of an array with ndim:DeprecationWarning"]
ROOT = Path(__file__).resolve().parents[1]


def run_in_interpreter(test_file: str) -> str:
    """Run `test_file` in a TRITON_INTERPRET=1 child pytest; returns its stdout.

    Skips in the child itself, without triton, and with numpy >= 2.4; fails with the child's
    output when any of its cases failed.
    """
    if INTERPRETING:
        pytest.skip("this is the child process")
    skip_without_interpreter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *QUIET]
        + [test_file],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result.stdout


def skip_without_interpreter() -> None:
    """Skip unless Triton's interpreter can run here: triton installed, numpy < 2.4."""
    pytest.importorskip("triton")
    import numpy

    if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip(
            f"Triton's interpreter needs numpy < 2.4, found {numpy.__version__}"
        )
