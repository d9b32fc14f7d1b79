from __future__ import annotations

import numpy as np
import pytest

from service.core.sampling import BatchSampler, StopMatcher, log_softmax


def sample_rows(
    logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, uniform: np.ndarray
) -> np.ndarray:
    return BatchSampler(temperature, top_k, top_p, logits.shape[1]).sample(logits, uniform)


def _sample(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, u: float = 0.5) -> int:
    b = logits.shape[0]
    return sample_rows(logits, np.full(b, temperature), np.full(b, top_k), np.full(b, top_p), np.full(b, u)).tolist()


def test_greedy_takes_the_argmax_whatever_the_draw() -> None:
    logits = np.array([[0.1, 3.0, 2.9, -1.0]], np.float32)
    assert {_sample(logits, temperature=0.0, u=u)[0] for u in (0.0, 0.3, 0.99)} == {1}


def test_top_k_never_picks_outside_the_k_best() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 50)).astype(np.float32)
    best3 = set(np.argsort(-logits[0])[:3].tolist())
    picks = {_sample(logits, top_k=3, u=u)[0] for u in np.linspace(0, 0.999, 200)}
    assert picks == best3


def test_top_p_keeps_the_smallest_set_holding_the_mass() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)[None, :].astype(np.float32)
    picks = {_sample(logits, top_p=0.7, u=u)[0] for u in np.linspace(0, 0.999, 300)}
    assert picks == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: two tokens
    assert {_sample(logits, top_p=0.01, u=u)[0] for u in (0.1, 0.9)} == {0}


def test_draw_follows_the_distribution() -> None:
    logits = np.log(np.array([[0.2, 0.8]]))
    # The inverse CDF runs over the vocabulary in order: token 0 holds the draws below 0.2.
    assert _sample(logits, u=0.1) == [0] and _sample(logits, u=0.3) == [1] and _sample(logits, u=0.9) == [1]
    rng = np.random.default_rng(1)
    draws = [_sample(logits, u=rng.random())[0] for _ in range(4000)]
    assert abs(np.mean(draws) - 0.8) < 0.03


def test_top_k_keeps_tokens_tied_with_the_last_one_kept() -> None:
    logits = np.array([[2.0, 1.0, 1.0, 0.0]], np.float32)
    picks = {_sample(logits, top_k=2, u=u)[0] for u in np.linspace(0, 0.999, 200)}
    assert picks == {0, 1, 2}


def test_a_draw_never_lands_on_a_filtered_or_underflowed_token() -> None:
    # Token 0 is filtered by top-k and token 3 underflows to probability zero at this temperature.
    logits = np.array([[0.0, 5.0, 4.0, -5000.0]], np.float32)
    for u in (0.0, 1e-12, 0.5, 1 - 2**-53, 1.0):
        assert _sample(logits, top_k=2, u=u)[0] in {1, 2}
        assert _sample(logits, temperature=0.5, u=u)[0] in {0, 1, 2}


def test_rows_are_independent_of_their_batch() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 40)).astype(np.float32)
    temps = np.array([0.0, 0.5, 1.0, 1.5, 0.8, 1.0])
    ks = np.array([0, 5, 0, 10, 3, 0])
    ps = np.array([1.0, 1.0, 0.9, 0.5, 1.0, 0.95])
    us = rng.random(6)
    together = sample_rows(logits, temps, ks, ps, us)
    alone = [
        sample_rows(logits[i : i + 1], temps[i : i + 1], ks[i : i + 1], ps[i : i + 1], us[i : i + 1])[0]
        for i in range(6)
    ]
    assert together.tolist() == alone


def test_log_softmax() -> None:
    logits = np.array([[1.0, 2.0, 3.0]])
    want = 3.0 - np.log(np.exp([1.0, 2.0, 3.0]).sum())
    assert log_softmax(logits)[0, 2] == pytest.approx(want)


def test_stop_matcher_holds_back_prefixes_and_cuts_the_stop() -> None:
    m = StopMatcher(("\n\n", "END"))
    out = []
    stopped = False
    for ch in "Hello\nworld E\nEN\n\nafter":
        text, stopped = m.push(ch)
        out.append(text)
        if stopped:
            break
    assert stopped and "".join(out) == "Hello\nworld E\nEN"


def test_stop_matcher_flushes_held_text_at_the_end() -> None:
    m = StopMatcher(("STOP",))
    assert m.push("ab") == ("ab", False)
    assert m.push("ST") == ("", False)
    assert m.flush() == "ST"
    assert StopMatcher(()).push("x") == ("x", False)


def test_a_denormal_temperature_samples_greedily() -> None:
    """Dividing by 5e-324 overflows: such temperatures count as greedy (found by fuzzing)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 65)).astype(np.float32)
    temperature = np.array([5e-324, 1e-6, 0.0, 1e-5])
    ids = sample_rows(logits, temperature, np.zeros(4, np.int64), np.full(4, 5e-324), rng.random(4))
    assert list(ids[:3]) == list(logits[:3].argmax(axis=1))
    assert 0 <= ids[3] < 65
