"""The training library's errors, in its own words; the CLI prints them as one line with exit code 2."""

from __future__ import annotations

from collections.abc import Sequence


class UserError(Exception):
    """Bad input from the user: a message that names the problem, never a traceback."""


class InvalidSetting(UserError):
    """A setting outside what the library accepts, named by its one name (`num_layers`).

    A setting has the same name in the library, the checkpoint and the exported manifest, and
    its flag is that name with dashes (`--num-layers`), so the message needs no translation.
    `settings` lists the settings the message names.
    """

    def __init__(self, message: str, settings: Sequence[str]) -> None:
        super().__init__(message)
        self.settings = tuple(settings)


def check(ok: bool, setting: str, problem: str) -> None:
    """Raise InvalidSetting("<setting> <problem>") unless `ok`."""
    if not ok:
        raise InvalidSetting(f"{setting} {problem}", (setting,))


class ExportError(UserError):
    """An export that must not be shipped: a failed check or a bad request."""
