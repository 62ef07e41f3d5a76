"""The docs match the code: every API route and every `loraplex serve` option is documented."""

from __future__ import annotations

from pathlib import Path

from loraplex.api import create_app
from loraplex.serve_settings import ServeSettings

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_route_is_in_api_md():
    api_md = (DOCS / "api.md").read_text()
    paths = create_app(state=None).openapi()["paths"]
    assert len(paths) >= 15
    missing = []
    for path, methods in paths.items():
        for method in methods:
            # routes are written as `GET /path` in a heading or in a table row
            if f"{method.upper()} {path}" not in api_md and f"`{path}" not in api_md:
                missing.append(f"{method.upper()} {path}")
    assert not missing, f"undocumented routes: {missing}"


def test_every_serve_option_is_in_api_md():
    api_md = (DOCS / "api.md").read_text()
    missing = []
    for name in ServeSettings.model_fields:
        if name == "model":
            continue
        flag = (
            "LORAPLEX_ADMIN_KEY"
            if name == "admin_key"
            else "--" + name.replace("_", "-")
        )
        if flag not in api_md:
            missing.append(flag)
    assert not missing, f"undocumented options: {missing}"


def test_every_metric_is_in_api_md():
    import re

    api_md = (DOCS / "api.md").read_text()
    api = Path(__file__).resolve().parents[1] / "src/loraplex/api"
    source = "".join(path.read_text() for path in sorted(api.glob("*.py")))
    names = set(re.findall(r'"((?:vllm:|loraplex_)[a-z_:]+)"', source))
    assert len(names) >= 10
    missing = [n for n in names if n not in api_md]
    assert not missing, f"undocumented metrics: {missing}"


def _sections(text: str) -> dict[str, str]:
    """`### `loraplex.<package>`` heading → the text under it."""
    sections = {}
    for chunk in text.split("\n### ")[1:]:
        heading, _, body = chunk.partition("\n")
        sections[heading.strip().strip("`").split("`")[0]] = body.split("\n## ")[0]
    return sections


def test_every_module_has_its_sentence_in_architecture_md():
    sections = _sections((DOCS / "architecture.md").read_text())
    src = Path(__file__).resolve().parents[1] / "src" / "loraplex"
    missing = []
    for path in sorted(src.rglob("*.py")):
        relative = path.relative_to(src)
        if path.name == "__init__.py" and len(relative.parts) > 1:
            continue  # a package's __init__ only re-exports; the package has its heading
        if len(relative.parts) > 1:
            section = sections.get(f"loraplex.{relative.parts[0]}", "")
            inner = "/".join(relative.parts[1:])  # e.g. `sgmv/shrink.py`
        else:
            section, inner = sections.get("loraplex", ""), relative.name
        if f"- `{inner}`" not in section:
            missing.append(str(relative))
    assert not missing, f"modules without a sentence in docs/architecture.md: {missing}"
