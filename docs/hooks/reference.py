"""Reference tables made from the code at build time, so the docs cannot disagree with it.

A page writes a marker on a line of its own and the build puts the table in its place:

- `<!-- fields: package.module:Model -->`: a request model's fields (pydantic): type, default,
  bounds and what the field means, as the API's schema declares them;
- `<!-- settings -->`: every `CHARSTREAM_*` variable of `service.settings.Settings`;
- `<!-- flags: COMMAND -->`: a `charstream` sub-command's flags, from the parser it runs with.

mkdocs.yml lists this file under `hooks:`; a marker that names something missing fails the build.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for the packages

MARKER = re.compile(r"^<!-- (fields: (?P<model>[\w.]+:\w+)|settings|flags: (?P<command>[\w-]+)) -->$", re.M)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return MARKER.sub(_table, markdown)


def _table(match: re.Match[str]) -> str:
    if match["model"]:
        module, name = match["model"].split(":")
        return fields_table(getattr(importlib.import_module(module), name))
    if match["command"]:
        return flags_table(match["command"])
    return settings_table()


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _type(annotation: Any) -> str:
    """A type as a reader writes it: `int | None`, `list[str]`, `"fp32" | "int8"`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return str(getattr(annotation, "__name__", annotation))


def _default(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.is_required():
        return "required"
    if field.default_factory is not None:
        made = field.default_factory()
        return f"`{made!r}`" if made in ([], {}, ()) else "computed"
    if field.default is PydanticUndefined or field.default is None:
        return "unset"
    value = field.default
    return f"`{str(value).lower()}`" if isinstance(value, bool) else f"`{value!r}`"


def _bounds(field: Any) -> str:
    """The field's numeric and length bounds, as pydantic checks them (and as a 4xx names them)."""
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <="}
    found = []
    for item in field.metadata:
        for key, word in words.items():
            value = getattr(item, key, None)
            if value is not None:
                found.append(f"{word} {value:,}" if isinstance(value, int) else f"{word} {value:g}")
    return ", ".join(found)


def fields_table(model: Any) -> str:
    rows = ["| field | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        shown = field.alias or name
        rows.append(
            f"| `{shown}` | {_cell(_type(field.annotation))} | {_cell(_default(field))} | {_cell(_bounds(field))} "
            f"| {_cell(field.description or '')} |"
        )
    return "\n".join(rows)


def settings_table() -> str:
    from service.settings import SECRET_SETTINGS, Settings

    prefix = Settings.model_config.get("env_prefix", "")
    rows = ["| variable | default | bounds | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "unset (secret)" if name in SECRET_SETTINGS and field.default is None else _default(field)
        meaning = _cell(field.description or "")
        rows.append(f"| `{prefix}{name.upper()}` | {_cell(default)} | {_cell(_bounds(field))} | {meaning} |")
    return "\n".join(rows)


def flags_table(command: str) -> str:
    from charstream_cli import COMMANDS

    module, _, description = COMMANDS[command]
    side = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=f"charstream {command}", description=description)
    side.COMMANDS[command](parser)
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}` (argument)"
        if action.required:
            default = "required"
        elif action.option_strings and action.nargs == 0:
            default = "off" if action.default is False else "on"
        elif action.default is None or action.default == []:
            default = "unset" if action.option_strings else ""
        else:
            default = f"`{action.default!r}`"
        rows.append(f"| {flag} | {_cell(default)} | {_cell(action.help or '')} |")
    return "\n".join(rows)
