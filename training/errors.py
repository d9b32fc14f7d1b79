"""The training library's errors, in its own words; the CLI turns them into flags and exit codes."""

from __future__ import annotations

from collections.abc import Sequence


class UserError(Exception):
    """Bad input from the user: a message that names the problem, never a traceback."""


class InvalidSetting(UserError):
    """A setting outside what the library accepts, named as the library names it (`num_layers`).

    `settings` lists the setting names the message mentions, so a front end can say them its own
    way: the CLI writes `--layers` where the library writes `num_layers`.
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
