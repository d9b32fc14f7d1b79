"""min_p, repetition_penalty, frequency_penalty and presence_penalty, each against a reference computation
written here from the definitions (vLLM's, llama.cpp's and OpenAI's), on fixed logits and through the real
scheduler against a step-by-step loop over the same onnxruntime graph."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from service.core.engine import Engine
from service.core.events import DoneEvent, TextEvent
from service.core.jobs import Job
from service.core.sampling import BatchSampler, SamplingParams, penalise
from service.core.scheduler import Scheduler
from service.metrics import Metrics

RNG = np.random.default_rng(1234)
LOGITS = (RNG.standard_normal((6, 40)) * 3).astype(np.float32)


def reference_probs(logits: np.ndarray, temperature: float, min_p: float) -> np.ndarray:
    """softmax(logits / T), characters under min_p x the top probability dropped, renormalised."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    p = np.where(p >= min_p * p.max(), p, 0.0)
    return p / p.sum()


def reference_draw(p: np.ndarray, u: float) -> int:
    return int(np.searchsorted(np.cumsum(p), u * p.sum(), side="right"))


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_min_p_draws_what_the_reference_draws(min_p: float, temperature: float) -> None:
    rows = len(LOGITS)
    sampler = BatchSampler(
        np.full(rows, temperature), np.zeros(rows, np.int64), np.ones(rows), LOGITS.shape[1], np.full(rows, min_p)
    )
    uniforms = np.random.default_rng(5).random((300, rows))
    for u in uniforms:
        got = sampler.sample(LOGITS, u)
        want = [reference_draw(reference_probs(LOGITS[i], temperature, min_p), u[i]) for i in range(rows)]
        assert got.tolist() == want
    # min_p = 1 keeps only the most likely character: greedy.
    if min_p == 1.0:
        assert set(sampler.sample(LOGITS, uniforms[0]).tolist()) <= set(LOGITS.argmax(axis=1).tolist())


def test_min_p_rows_leave_their_neighbours_alone() -> None:
    rows = len(LOGITS)
    min_p = np.array([0.0, 0.5, 0.0, 0.2, 0.0, 0.9])
    u = np.random.default_rng(9).random(rows)
    mixed = BatchSampler(np.ones(rows), np.zeros(rows, np.int64), np.ones(rows), 40, min_p).sample(LOGITS, u)
    plain = BatchSampler(np.ones(rows), np.zeros(rows, np.int64), np.ones(rows), 40).sample(LOGITS, u)
    assert mixed[min_p == 0].tolist() == plain[min_p == 0].tolist()


def reference_penalties(logits: np.ndarray, prompt: list[int], output: list[int], params: SamplingParams) -> np.ndarray:
    """vLLM's repetition penalty over prompt and output; OpenAI's frequency and presence penalties over the output."""
    out = logits.astype(np.float64).copy()
    for c in set(prompt) | set(output):
        r = params.repetition_penalty
        out[c] = out[c] / r if out[c] > 0 else out[c] * r
    for c in set(output):
        out[c] -= params.frequency_penalty * output.count(c) + params.presence_penalty
    return out


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.7),
        SamplingParams(frequency_penalty=0.8),
        SamplingParams(presence_penalty=-1.5),
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.3, presence_penalty=0.6),
    ],
)
def test_penalties_equal_the_reference_on_fixed_logits(params: SamplingParams) -> None:
    prompt, output = [1, 2, 3, 3, 7], [3, 9, 9, 9, 12, 1]
    seen = np.zeros(40, bool)
    seen[prompt + output] = True
    counts = np.bincount(output, minlength=40)
    for row in LOGITS:
        got = row.copy()
        penalise(got, seen, counts, params)
        np.testing.assert_allclose(got, reference_penalties(row, prompt, output, params), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> Engine:
    return Engine(models_dir / "tiny-lstm" / "model.onnx")


def scheduled_text(engine: Engine, prompt: str, params: SamplingParams, seed: int) -> str:
    async def scenario() -> str:
        scheduler = Scheduler("m", engine, Metrics())
        scheduler.start()
        info = engine.info
        job = Job(
            prompt=[info.vocab_index[c] for c in prompt],
            state=[np.zeros((info.num_layers, info.hidden_size), np.float32)] * len(info.state_names),
            logits=None,
            params=params,
            rng=np.random.default_rng(seed),
        )
        scheduler.submit(job)
        texts = []
        while True:
            events = await job.events.take()
            texts += [e.text for e in events if isinstance(e, TextEvent)]
            if any(isinstance(e, DoneEvent) for e in events):
                break
        await scheduler.stop()
        return "".join(texts)

    return asyncio.run(scenario())


def reference_text(engine: Engine, prompt: str, params: SamplingParams, seed: int) -> str:
    """One character at a time with Engine.run (seq = 1), the reference penalties and min-p, one draw each."""
    info = engine.info
    ids = [info.vocab_index[c] for c in prompt]
    rng = np.random.default_rng(seed)
    logits, state = engine.run(np.array([ids], np.int64), engine.zero_state(1))
    row = logits[0, -1]
    output: list[int] = []
    for _ in range(params.max_new_chars):
        z = reference_penalties(row, ids, output, params)
        p = reference_probs(z, params.temperature, params.min_p)
        char = reference_draw(p, rng.random())
        output.append(char)
        logits, state = engine.run(np.array([[char]], np.int64), state)
        row = logits[0, -1]
    return "".join(info.vocab[c] for c in output)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_chars=80, min_p=0.1),
        SamplingParams(max_new_chars=80, repetition_penalty=1.5, temperature=0.8),
        SamplingParams(max_new_chars=80, frequency_penalty=0.5, presence_penalty=0.5),
        SamplingParams(max_new_chars=80, repetition_penalty=1.2, frequency_penalty=0.2, min_p=0.05, temperature=1.3),
    ],
)
def test_the_scheduler_samples_what_the_reference_loop_samples(engine: Engine, params: SamplingParams) -> None:
    for seed in range(3):
        assert scheduled_text(engine, "ROMEO:", params, seed) == reference_text(engine, "ROMEO:", params, seed)


def test_presence_penalty_changes_greedy_text(engine: Engine) -> None:
    plain = scheduled_text(engine, "KING:", SamplingParams(temperature=0, max_new_chars=60), 0)
    penalised = scheduled_text(engine, "KING:", SamplingParams(temperature=0, max_new_chars=60, presence_penalty=2), 0)
    assert plain != penalised and len(set(penalised)) > len(set(plain))
