"""The command line's shared ground floor: a setting declared once on a config dataclass becomes one
flag of a sub-command, and a sub-command runs with one-line errors.

Standard library only, like the rest of this package, so each side's command (training/cli.py,
service/cli.py, interpret/cli.py) builds its flags without the other side installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
C = TypeVar("C")


def setting(default: T, help: str, **flag: Any) -> T:
    """A field with its default, its `--help` line and any further argparse keywords (`nargs`, `choices`).

    `exclusive="<group>"` puts the flag in a mutually exclusive group with the others of that name;
    `positional=True` makes it an argument; `flag=False` gives it none (the command fills it in);
    `aliases=("--old-name",)` are further spellings of the flag, so a renamed flag's scripts keep working.
    A bool that defaults to True is the flag `--no-<name>`; its help says what the flag does.
    """
    return dataclasses.field(default=default, metadata={"help": help, **flag})


def int_value(text: str) -> int:
    """An integer flag's value, refused in argparse's one-line style."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def add_flags(parser: argparse.ArgumentParser, config: type) -> None:
    """One flag per field of a config dataclass, in field order: `embedding_dropout` is `--embedding-dropout`.

    Type and default come from the field, help and any further argparse keywords from its metadata.
    """
    types = typing.get_type_hints(config)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in dataclasses.fields(config):
        keywords = dict(f.metadata)
        if not keywords.pop("flag", True):
            continue
        target: argparse._ActionsContainer = parser
        if "exclusive" in keywords:
            name = keywords.pop("exclusive")
            if name not in groups:
                groups[name] = parser.add_mutually_exclusive_group()
            target = groups[name]
        positional = keywords.pop("positional", False)
        aliases = keywords.pop("aliases", ())
        flag = f.name if positional else "--" + f.name.replace("_", "-")
        value_type = _value_type(types[f.name])
        if value_type is bool:
            off = f.default is True  # a setting that is on by default is a flag that turns it off
            flag = "--no-" + flag[2:] if off else flag
            keywords.update(dest=f.name, action="store_false" if off else "store_true")
        else:
            parse = keywords.get("type")
            keywords["type"] = _one_line_errors(parse) if parse else int_value if value_type is int else value_type
            if f.default is dataclasses.MISSING:
                if not positional:  # an argument is required by being one
                    keywords["required"] = True
            else:
                # argparse's append adds to a copy of the default, which must be a list.
                keywords["default"] = list(f.default) if keywords.get("action") == "append" else f.default
        target.add_argument(flag, *aliases, **keywords)


def _one_line_errors(parse: Callable[[str], object]) -> Callable[[str], object]:
    """A library's parser for a flag, its ValueError shown by argparse as the message it carries."""

    def checked(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return checked


def _value_type(annotation: object) -> type:
    """What argparse turns one value into: `float | None` -> float, `list[str]` (nargs) -> str."""
    inner = [a for a in typing.get_args(annotation) if a is not type(None)]
    found = inner[0] if inner else annotation
    assert isinstance(found, type), annotation
    return found


def config_from(config: type[C], args: argparse.Namespace, **given: object) -> C:
    """The config dataclass from the parsed flags (a repeated flag's list as the field's tuple) and `given`."""
    values: dict[str, object] = {}
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        if f.name in given or not f.metadata.get("flag", True):
            continue
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) and f.metadata.get("action") == "append" else value
    return config(**values, **given)


Command = Callable[[argparse.Namespace], int]


def run(
    command: str,
    func: Command,
    args: argparse.Namespace,
    user_errors: tuple[type[BaseException], ...],
) -> int:
    """A sub-command's exit code: a user error is one line on stderr and exit code 2, never a traceback."""
    try:
        return func(args)
    except user_errors as exc:
        print(f"charstream {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"charstream {command}: interrupted", file=sys.stderr)
        return 130


def fail(command: str, exc: BaseException) -> int:
    """A refusal found inside a command: its first line, as `run` prints a user error."""
    print(f"charstream {command}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
    return 2
