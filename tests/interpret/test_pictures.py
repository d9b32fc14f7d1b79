"""The colour scale of the pictures."""

from __future__ import annotations

import numpy as np
import pytest

from interpret.pictures import colour, display_values


def test_colour_scale() -> None:
    assert colour(-1) == (33, 102, 172)
    assert colour(0) == (255, 255, 255)
    assert colour(1) == (178, 24, 43)
    assert colour(7) == colour(1)
    assert list(display_values(np.array([-5.0, 0.5]), "h")) == [-1.0, 0.5]
    assert display_values(np.array([2.0]), "c")[0] == pytest.approx(np.tanh(2.0))
    assert display_values(np.array([5.0]), "c", center=4.0)[0] == pytest.approx(np.tanh(1.0))
