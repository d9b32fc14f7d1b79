"""The service's layers import downwards only (DESIGN.md, "Layers"): read from the source with `ast`, every
import, at the top of a module or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A folder's modules (and the tests of core) never import these packages.
FORBIDDEN: list[tuple[str, tuple[str, ...]]] = [
    ("service/core", ("service.api", "service.serving", "service.sessions", "service.batch")),
    ("service/sessions", ("service.api", "service.serving", "service.core", "service.batch")),
    ("service/batch", ("service.api", "service.serving", "service.sessions")),
    ("service/serving", ("service.api",)),
    ("service/api/openai", ("service.api.native",)),  # API families share what lies in service/api itself
    ("service/api/native", ("service.api.openai",)),
    ("tests/service/core", ("service.api", "service.serving")),
]


def imported(path: Path) -> set[str]:
    """Every module a file imports, by its full name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize(("folder", "forbidden"), FORBIDDEN, ids=[f for f, _ in FORBIDDEN])
def test_imports_point_down(folder: str, forbidden: tuple[str, ...]) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, folder
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(imported(path))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert not wrong, wrong


def test_settings_sit_below_every_layer() -> None:
    """Every layer reads the settings, so the settings import nothing of the service but its errors."""
    own = {name for name in imported(ROOT / "service" / "settings.py") if name.startswith("service")}
    assert own <= {"service.errors"}, own
