"""Ranking units against features: which units of a model track which feature of its text.

A unit's score is the Pearson correlation with a continuous feature, or the ROC AUC with a
binary one (how often a position where the feature holds gets a higher value than one where it
does not; 0.5 is chance, 0 and 1 are perfect, so strength = |AUC - 0.5| * 2). This is the
experiment of Karpathy, Johnson and Fei-Fei, "Visualizing and Understanding Recurrent Networks"
(2015), done by search rather than by eye.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from interpret.activations import Activations
from interpret.features import Feature, Kind, features_for


def correlation(acts: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """Pearson r of each column of acts (T, units) with feature (T,); 0 for a constant column."""
    x = acts.astype(np.float64)
    x -= x.mean(axis=0)
    y = feature.astype(np.float64) - feature.mean()
    denom = np.sqrt((x * x).sum(axis=0) * float((y * y).sum()))
    r = (x.T @ y) / np.where(denom > 0, denom, 1.0)
    return np.where(denom > 0, r, 0.0)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-d array, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # Positions where a new value starts; each tie group gets the mean of its ordinal ranks.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    group_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def _auc_from_ranks(ranks: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of one unit from its ranks (Mann-Whitney U / n+ n-); 0.5 when one class is empty."""
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return 0.5
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def strength(kind: Kind, scores: np.ndarray) -> np.ndarray:
    """How well a unit tracks the feature whatever its sign: |r|, or |AUC - 0.5| * 2."""
    return np.abs(scores) if kind == "continuous" else np.abs(scores - 0.5) * 2.0


def score_group(matrix: np.ndarray, features: Sequence[tuple[Kind, np.ndarray]]) -> list[np.ndarray]:
    """Each feature's scores for every column of matrix (T, units): r or AUC.

    A unit's ranks are computed once and serve every binary feature: ranking is the costly part.
    """
    scores = [correlation(matrix, v) if kind == "continuous" else np.empty(matrix.shape[1]) for kind, v in features]
    binary = [(i, v.astype(bool)) for i, (kind, v) in enumerate(features) if kind == "binary"]
    if binary:
        for u in range(matrix.shape[1]):
            ranks = average_ranks(matrix[:, u])
            for i, labels in binary:
                scores[i][u] = _auc_from_ranks(ranks, labels)
    return scores


@dataclass(frozen=True)
class UnitScore:
    layer: int
    state: str
    unit: int
    score: float
    strength: float
    center: float = 0.0  # where a c unit sits on this text (its median): colours show tanh(c - center)

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "state": self.state,
            "unit": self.unit,
            "score": round(self.score, 4),
            "strength": round(self.strength, 4),
            "center": round(self.center, 4),
        }


@dataclass
class FeatureResult:
    feature: Feature
    values: np.ndarray
    top: list[UnitScore] = field(default_factory=list)
    skipped: str | None = None  # why no unit was scored (the feature is constant on this text)
    excerpt: tuple[int, int] = (0, 0)  # [start, end) of the text shown for this feature


def rank_units(acts: Activations, features: Sequence[tuple[Kind, np.ndarray]], top: int) -> list[list[UnitScore]]:
    """Per feature, the `top` units that track it best, strongest first."""
    found: list[list[UnitScore]] = [[] for _ in features]
    for group, matrix in acts.values.items():
        for (kind, _), scores, kept in zip(features, score_group(matrix, features), found, strict=True):
            strengths = strength(kind, scores)
            for u in np.argsort(-strengths, kind="stable")[:top]:
                center = float(np.median(matrix[:, u])) if group.state == "c" else 0.0
                kept.append(UnitScore(group.layer, group.state, int(u), float(scores[u]), float(strengths[u]), center))
    for kept in found:
        kept.sort(key=lambda s: (-s.strength, s.layer, s.state, s.unit))
        del kept[top:]
    return found


def choose_excerpt(text: str, values: np.ndarray, kind: Kind, length: int) -> tuple[int, int]:
    """A stretch of whole lines, about `length` characters, where the feature changes most."""
    if len(text) <= length:
        return 0, len(text)
    last = len(text) - length  # every window is a full one
    starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 <= last]
    changes = np.r_[0, np.cumsum(values[1:] != values[:-1])] if kind == "binary" else None
    best, best_score = (0, length), -1.0
    for start in starts:
        end = min(len(text), start + length)
        nl = text.rfind("\n", start, end)
        if nl > start + length // 2:
            end = nl + 1
        score = float(changes[end - 1] - changes[start]) if changes is not None else float(values[start:end].std())
        if score > best_score:
            best, best_score = (start, end), score
    return best


def find_cells(
    acts: Activations,
    text: str,
    features: Iterable[Feature] | None = None,
    top: int = 5,
    excerpt_chars: int = 600,
) -> list[FeatureResult]:
    """Score every unit against every feature (by default those for this kind of text); a feature
    constant on the text is skipped, with the reason."""
    results = [FeatureResult(f, f.compute(text)) for f in (features if features is not None else features_for(text))]
    scored = []
    for r in results:
        if r.values.size == 0 or np.all(r.values == r.values[0]):
            r.skipped = "constant on this text"
        else:
            scored.append(r)
    tops = rank_units(acts, [(r.feature.kind, r.values) for r in scored], top)
    for r, best in zip(scored, tops, strict=True):
        r.top = best
        r.excerpt = choose_excerpt(text, r.values, r.feature.kind, excerpt_chars)
    return results
