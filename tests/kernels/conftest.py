"""Kernel tests: cases that need Triton's interpreter run only in the child process that has it."""

from __future__ import annotations

import os


def pytest_collection_modifyitems(config, items):
    # test_sgmv_triton.py starts a TRITON_INTERPRET=1 child for these; listing them as skipped
    # in the parent would only repeat them.
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    child_only = [i for i in items if getattr(i.function, "interpreter_only", False)]
    if child_only:
        config.hook.pytest_deselected(items=child_only)
        items[:] = [i for i in items if i not in child_only]
