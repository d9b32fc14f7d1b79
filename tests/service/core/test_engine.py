from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core.engine import BINDINGS_KEPT, Engine


@pytest.fixture(scope="module", params=["tiny-lstm", "tiny-gru", "tiny-rnn"])
def engine(request: pytest.FixtureRequest, models_dir: Path) -> Engine:
    return Engine(models_dir / request.param / "model.onnx")


def test_a_bound_step_gives_what_run_gives(engine: Engine) -> None:
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        tokens = rng.integers(0, engine.info.vocab_size, (batch, 1))
        state = [rng.normal(size=s.shape).astype(np.float32) for s in engine.zero_state(batch)]
        logits, new_state = engine.run(tokens, state)
        bound = engine.binding(batch)
        bound.tokens[:] = tokens
        for buffer, s in zip(bound.state_in, state, strict=True):
            buffer[:] = s
        bound.run()
        np.testing.assert_array_equal(bound.logits, logits)
        for out, expected in zip(bound.state_out, new_state, strict=True):
            np.testing.assert_array_equal(out, expected)


def test_the_next_bound_step_reads_the_buffers_anew(engine: Engine) -> None:
    bound = engine.binding(2)
    bound.tokens[:] = [[1], [2]]
    for buffer in bound.state_in:
        buffer[:] = 0
    bound.run()
    first = bound.logits.copy()
    bound.tokens[:] = [[3], [3]]
    bound.run()
    assert not np.array_equal(first, bound.logits)
    np.testing.assert_array_equal(bound.logits[0], bound.logits[1])  # same token, same state


def test_carry_steps_on_from_the_last_output_without_a_copy(engine: Engine) -> None:
    rng = np.random.default_rng(1)
    batch = 3
    tokens = rng.integers(0, engine.info.vocab_size, (batch, 2))
    state = [rng.normal(size=s.shape).astype(np.float32) for s in engine.zero_state(batch)]
    _, expected = engine.run(tokens, state)  # two characters in one call
    bound = engine.binding(batch)
    for buffer, s in zip(bound.state_in, state, strict=True):
        buffer[:] = s
    bound.tokens[:, 0] = tokens[:, 0]
    bound.run()
    out = bound.state_out
    bound.carry()
    assert all(a is b for a, b in zip(bound.state_in, out, strict=True))  # no copy: the same arrays
    bound.tokens[:, 0] = tokens[:, 1]
    bound.run()
    for got, want in zip(bound.state_out, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    bound.carry()  # and back: the first buffers are the inputs again
    assert all(a is not b for a, b in zip(bound.state_in, out, strict=True))


def test_bindings_are_reused_and_bounded(engine: Engine) -> None:
    first = engine.binding(3)
    assert engine.binding(3) is first
    for batch in range(10, 10 + BINDINGS_KEPT):
        engine.binding(batch)
    assert engine.binding(3) is not first  # the least recently used size was let go
