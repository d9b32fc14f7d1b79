"""The scores, and a unit planted by hand found first."""

from __future__ import annotations

import numpy as np
import pytest

from exports import contract
from interpret import scoring
from interpret.activations import Activations, UnitGroup
from interpret.features import in_quotes, line_position


def test_correlation_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(200, 5)).astype(np.float32)
    acts[:, 4] = 3.0  # constant: scored 0, not NaN
    feature = acts[:, 0] * 2 + rng.normal(size=200) * 0.1
    r = scoring.correlation(acts, feature)
    for u in range(4):
        assert r[u] == pytest.approx(np.corrcoef(acts[:, u], feature)[0, 1], abs=1e-9)
    assert r[4] == 0.0


def test_average_ranks_share_ties() -> None:
    assert list(scoring.average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0]))) == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_auc_matches_pair_counting() -> None:
    rng = np.random.default_rng(1)
    acts = np.round(rng.normal(size=(60, 3)), 1)  # rounded: ties happen
    labels = rng.random(60) < 0.3
    got = scoring.score_group(acts, [("binary", labels)])[0]
    for u in range(3):
        pos, neg = acts[labels, u], acts[~labels, u]
        wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        assert got[u] == pytest.approx(wins / (pos.size * neg.size))
    perfect = np.c_[labels.astype(np.float32), -labels.astype(np.float32)]
    assert list(scoring.score_group(perfect, [("binary", labels)])[0]) == [1.0, 0.0]
    assert list(scoring.strength("binary", np.array([1.0, 0.0, 0.5]))) == [1.0, 1.0, 0.0]


def test_a_planted_unit_is_found() -> None:
    """Activations built by hand: the unit that copies a feature ranks first with a perfect score."""
    text = 'ab "cd" e\nfg "h" ij\n' * 5
    info = contract.ModelInfo(tuple(sorted(set(text))), "lstm", 1, 4, 1, "", None, "fp32")
    rng = np.random.default_rng(2)
    noise = rng.normal(size=(len(text), 4)).astype(np.float32)
    h, c = noise.copy(), noise.copy() * 0.5
    c[:, 2] = in_quotes(text) * 2.0 - 1.0
    h[:, 1] = line_position(text) / 10
    acts = Activations(info, {UnitGroup(0, "h"): h, UnitGroup(0, "c"): c})
    found = {r.feature.name: r for r in scoring.find_cells(acts, text, top=3)}
    # c sits at -1 outside the quotes, most of the text: that is its center for colouring.
    expected = {"layer": 0, "state": "c", "unit": 2, "score": 1.0, "strength": 1.0, "center": -1.0}
    assert found["in_quotes"].top[0].to_json() == expected
    best = found["line_position"].top[0]
    assert (best.state, best.unit, best.score) == ("h", 1, pytest.approx(1.0))
    assert found["bracket_depth"].skipped == "constant on this text"
    assert "indent_depth" not in found  # prose: the code features are not asked
