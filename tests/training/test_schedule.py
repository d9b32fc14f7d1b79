from __future__ import annotations

from itertools import pairwise

import pytest

from training.schedule import learning_rate


def test_warmup_then_cosine_to_the_floor() -> None:
    lrs = [learning_rate(s, 1.0, 10, 110, "cosine", 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in pairwise(lrs[10:]))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_step_and_constant() -> None:
    assert learning_rate(50, 1.0, 0, 100, "constant") == 1.0
    assert learning_rate(0, 1.0, 0, 100, "step", step_every=25) == 1.0
    assert learning_rate(25, 1.0, 0, 100, "step", step_every=25) == 0.5
    assert learning_rate(99, 1.0, 0, 100, "step", min_lr_ratio=0.2, step_every=25) == 0.2
