"""House rules that keep the code base readable: small modules, the engine step short."""

from __future__ import annotations

import inspect
from pathlib import Path

import loraplex
from loraplex.platform.engine import Engine

SRC = Path(loraplex.__file__).parent
MAX_MODULE_LINES = 400


def test_no_module_over_the_line_budget():
    too_long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


def test_engine_step_reads_top_to_bottom():
    body = inspect.getsource(Engine.step).splitlines()
    assert len(body) <= 15, (
        "Engine.step grew: keep schedule → inputs → forward → sample → update"
    )


def test_importing_loraplex_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, loraplex; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
