"""The docs' reference tables are made from the code (docs/hooks/reference.py): every request
model a route validates has one, and each table shows every field with its bounds, so a field
added, renamed or re-bounded in the code is the same in the docs."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from tests.utils import REPO

DOCS = REPO / "docs"
REQUEST_MODULES = ("service.api.native.schemas", "service.api.openai.protocol")


def _hook():
    spec = importlib.util.spec_from_file_location("reference", DOCS / "hooks" / "reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _markers() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in sorted(DOCS.glob("*.md")))


BODIES = ("WsGenerate", "WsFeed", "SamplingFields")  # request bodies whose names do not end in Request
PARTS = ("SteerRequest", "ActivationRequest")  # parts of a body, described in its table's prose


def _request_models() -> list[str]:
    found = []
    for name in REQUEST_MODULES:
        for attr, value in vars(importlib.import_module(name)).items():
            if not (inspect.isclass(value) and issubclass(value, BaseModel) and value.__module__ == name):
                continue
            if (attr.endswith("Request") and attr not in PARTS) or attr in BODIES:
                found.append(f"{name}:{attr}")
    return found


@pytest.mark.parametrize("model", _request_models())
def test_every_request_model_has_a_generated_table(model: str) -> None:
    assert f"<!-- fields: {model} -->" in _markers(), f"no table of {model} in docs/"


@pytest.mark.parametrize("model", _request_models())
def test_a_table_shows_every_field_and_its_bounds(model: str) -> None:
    module, name = model.split(":")
    cls = getattr(importlib.import_module(module), name)
    table = _hook().fields_table(cls)
    for field_name, field in cls.model_fields.items():
        row = next((r for r in table.splitlines() if r.startswith(f"| `{field.alias or field_name}` |")), None)
        assert row is not None, f"{field_name} missing from the table of {model}"
        for item in field.metadata:
            for key in ("ge", "gt", "le", "lt", "max_length"):
                value = getattr(item, key, None)
                if value is not None:
                    assert (f"{value:,}" if isinstance(value, int) else f"{value:g}") in row, (field_name, key, row)


def test_settings_and_flags_tables_are_generated() -> None:
    markers = _markers()
    assert "<!-- settings -->" in markers
    for command in ("train", "generate"):
        assert f"<!-- flags: {command} -->" in markers
    hook = _hook()
    from service.settings import Settings

    settings = hook.settings_table()
    assert all(f"`CHARSTREAM_{name.upper()}`" in settings for name in Settings.model_fields)
    train = hook.flags_table("train")
    assert "`--max-steps`" in train and "`--precision`" in train


def _same(documented: str, value: object) -> bool:
    if isinstance(value, bool):
        return documented.lower() == str(value).lower()
    if isinstance(value, int | float):
        try:
            return float(documented.replace(",", "")) == float(value)
        except ValueError:
            return False
    return documented == str(value)


def test_a_setting_named_in_prose_tables_has_its_real_default() -> None:
    """Pages that explain a few settings at length (deploy, sessions) may list them again; their
    defaults must be the code's."""
    from service.settings import Settings

    row = re.compile(r"^\| `CHARSTREAM_(\w+)` \| `([^`]*)` \|", re.M)
    for path in DOCS.glob("*.md"):
        for name, documented in row.findall(path.read_text(encoding="utf-8")):
            field = Settings.model_fields[name.lower()]
            assert _same(documented, field.default), (
                f"{path.name}: CHARSTREAM_{name} is {field.default!r}, not {documented}"
            )
    assert "| `max_new_chars` | 256 |" not in (DOCS / "api.md").read_text(encoding="utf-8")


def test_docs_speak_of_the_penalties_as_the_code_does() -> None:
    """They work (they were once documented as refused and ignored)."""
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    assert "refused with 400 unless null (empty, 0)" not in text
    assert "repetition_penalty`, `min_tokens`...) are accepted and ignored" not in text


def test_hook_is_configured() -> None:
    assert "docs/hooks/reference.py" in Path(REPO / "mkdocs.yml").read_text(encoding="utf-8")
