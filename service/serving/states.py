"""Sessions as portable states (exports/state.py's `charstream-state`): a session exported, and a
state taken in as the start of a generation or of a new session.

A state is checked before anything reads it: it must parse, be signed under CHARSTREAM_STATE_KEY
when that is set, belong to a model this server serves with the same weights and vocabulary, have
that model's shapes, hold only finite values, and carry an RNG state numpy accepts. Anything else
is 409 `state_refused` saying which. What a forged but valid state can do is what any state can:
make the model continue from a point it might never have reached by reading text. It reads no
other session and costs no more than the request's own work budget.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from exports import state as portable
from service.errors import StateRefused
from service.serving.leases import fresh_session
from service.serving.registry import LoadedModel
from service.serving.resources import Resources
from service.sessions.store import ANYONE, Owner, Session


class States:
    def __init__(self, res: Resources) -> None:
        self.res = res

    @property
    def key(self) -> bytes | None:
        secret = self.res.settings.state_key
        return None if secret is None else secret.get_secret_value().encode()

    def export(self, session: Session, metadata: dict[str, Any] | None = None) -> bytes:
        """The session's state, position, last character and RNG as a `charstream-state` blob."""
        model = self.res.registry.get(session.model)
        info = model.engine.info
        state = portable.State(
            model=model.id,
            weights_sha256=session.model_sha256 or model.sha256,
            vocab_sha256=portable.vocab_sha256(info.vocab),
            cell=info.cell,
            tensors=list(session.state),
            logits=session.logits,
            position=session.history_chars,
            last_char=session.last_char or None,
            rng=session.rng_state,
            metadata=metadata or {},
        )
        try:
            return portable.encode(state, self.key)
        except portable.StateError as exc:
            raise StateRefused(str(exc), field="metadata") from None

    def start(self, blob: bytes | None, model_id: str | None, seed: int | None, owner: Owner = ANYONE) -> Session:
        """A session no store holds, to start a generation from: the state in `blob` (409 unless it
        fits), or a fresh one of the model; `seed` reseeds it (else a state's RNG goes on where it stopped)."""
        if blob is None:
            self.res.refuse_when_draining()
            model = self.res.registry.get(model_id)
            session = fresh_session(model, seed, owner)
            session.model_sha256 = model.sha256  # the version it starts on: a swap meanwhile refuses it
            return session
        _, session = self.session_of(blob, model_id, owner)
        if seed is not None:
            session.reseed(seed)
        return session

    def session_of(
        self, blob: bytes, model_id: str | None = None, owner: Owner = ANYONE, field: str = "state"
    ) -> tuple[LoadedModel, Session]:
        """A new session (not stored) holding the state in `blob`: 409 unless it fits a served model."""
        try:
            state = portable.decode(blob, self.key)
        except portable.StateError as exc:
            raise StateRefused(str(exc), field=field) from None
        if model_id is not None and model_id != state.model:
            raise StateRefused(f"the state belongs to model {state.model!r}, not {model_id!r}", field="model")
        if state.model not in self.res.registry.models:
            raise StateRefused(f"the state belongs to model {state.model!r}, which this server does not serve", field)
        model = self.res.registry.get(state.model)
        info = model.engine.info
        layers, hidden = info.state_shape_per_row
        try:
            portable.check_fits(state, model.id, model.sha256, info.vocab, info.cell, layers, hidden)
            _check_rng(state.rng)
            if state.last_char is not None and state.last_char not in info.vocab_index:
                raise portable.StateError("the state's last_char is not in the model's vocabulary")
        except portable.StateError as exc:
            raise StateRefused(str(exc), field=field) from None
        session = fresh_session(model, None, owner)
        session.state = state.tensors
        session.logits = state.logits
        session.history_chars = state.position
        session.rng_state = state.rng
        session.last_char = state.last_char or ""
        session.model_sha256 = model.sha256
        return model, session


def from_text(text: str, field: str = "state") -> bytes:
    """A state's bytes from its base64url text (409 when it is not base64url)."""
    try:
        return portable.decode_text(text)
    except portable.StateError as exc:
        raise StateRefused(str(exc), field=field) from None


def to_text(blob: bytes) -> str:
    return portable.encode_text(blob)


def _check_rng(rng: dict[str, Any]) -> None:
    """A state's RNG must be one numpy's PCG64 takes as it is."""
    try:
        generator = np.random.PCG64()
        generator.state = rng  # type: ignore[assignment]
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise portable.StateError(f"the state's rng is not a PCG64 state: {exc}") from None
