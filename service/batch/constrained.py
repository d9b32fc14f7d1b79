"""Structured outputs for batch generation: one llguidance matcher per row, its mask applied before each draw.

The constraint is compiled once (the service's `ConstraintCompiler`), and each attempt gets a copy
of the compiled matcher. Before a step's draw, every constrained row's logits outside its allowed
characters become -inf; after it, each row's matcher consumes the character drawn. A row whose
text matches and may not go on is complete; one that can no longer match is a dead end. llguidance
is imported only when a constraint is asked for: plain generation needs onnxruntime and numpy alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from service.core.sampling import ConstraintSpec

if TYPE_CHECKING:
    from service.core.constraints import CharMatcher


class ConstraintRefused(ValueError):
    """The compiler's reason a constraint cannot be used with this model."""


class RowConstraints:
    def __init__(self, spec: ConstraintSpec, vocab: Sequence[str], rows: int) -> None:
        from service.core.constraints import ConstraintCompiler, ConstraintError

        self._spec = spec
        self._compiler = ConstraintCompiler(vocab)
        try:
            self._compiler.matcher(spec)  # compiled and probed now: a refusal comes before any step
        except ConstraintError as exc:
            raise ConstraintRefused(str(exc)) from None
        self._matchers: list[CharMatcher | None] = [None] * rows
        self._allowed = np.ones((rows, len(vocab)), bool)

    def start(self, row: int, active: bool) -> None:
        """A new attempt in `row` gets its own matcher; an idle row none (it may draw anything)."""
        matcher = self._compiler.matcher(self._spec) if active else None
        self._matchers[row] = matcher
        self._allowed[row] = True if matcher is None else matcher.allowed

    def masked(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every character a row's constraint does not allow next at -inf."""
        out: np.ndarray = np.where(self._allowed, logits, -np.inf)
        return out

    def advance(self, drawn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each matcher consumes its row's character. (complete, dead end) per row."""
        from service.core.constraints import advance_all

        held = [(row, m) for row, m in enumerate(self._matchers) if m is not None]
        advance_all([m for _, m in held], [int(drawn[row]) for row, _ in held])
        complete = np.zeros(len(self._matchers), bool)
        dead = np.zeros(len(self._matchers), bool)
        for row, m in held:
            self._allowed[row] = m.allowed
            complete[row] = m.complete
            dead[row] = m.dead_end
        return complete, dead
