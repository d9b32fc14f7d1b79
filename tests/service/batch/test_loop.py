"""The batch loop's counter-based draws: uniform, and a pure function of (seed, attempt, position)."""

from __future__ import annotations

import numpy as np

from service.batch.loop import attempt_key, uniforms


def test_draws_are_uniform_and_streams_differ() -> None:
    keys = np.array([attempt_key(3, k) for k in range(2000)], np.uint64)
    draws = np.stack([uniforms(keys, np.full(2000, t)) for t in range(100)])  # (position, attempt)
    assert draws.min() >= 0.0 and draws.max() < 1.0
    counts = np.histogram(draws, bins=20, range=(0, 1))[0]
    expected = draws.size / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60  # 19 degrees of freedom: p < 1e-6 above 60
    assert abs(np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]) < 0.1
    assert len(np.unique(draws[0])) == 2000


def test_a_draw_depends_on_its_stream_and_position_only() -> None:
    keys = np.array([attempt_key(1, 7), attempt_key(1, 8), attempt_key(2, 7)], np.uint64)
    first = uniforms(keys, np.array([0, 5, 9]))
    alone = [uniforms(keys[i : i + 1], np.array([p]))[0] for i, p in enumerate([0, 5, 9])]
    assert first.tolist() == alone
    assert len(set(first.tolist())) == 3
    assert attempt_key(1, 7) != attempt_key(2, 7) != attempt_key(1, 8)
