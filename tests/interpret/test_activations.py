"""Stepping a real tiny model keeps the graph's own states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from interpret.activations import UnitGroup, open_model, run_states


@pytest.mark.slow
def test_the_units_values_are_the_graphs_states(models_dir: Path) -> None:
    """Stepping keeps exactly the h_out/c_out the graph returns after each character."""
    session, info, _ = open_model(models_dir / "tiny-lstm")
    text = "ROMEO:\nAy."
    acts = run_states(session, info, text)
    ids = np.array([[info.vocab_index[ch] for ch in text]], np.int64)
    zeros = np.zeros((2, 1, 48), np.float32)
    _, h, c = session.run(None, {"tokens": ids, "h": zeros, "c": zeros})
    assert np.allclose(acts.values[UnitGroup(1, "h")][-1], h[1, 0], atol=1e-5)
    assert np.allclose(acts.values[UnitGroup(0, "c")][-1], c[0, 0], atol=1e-5)
