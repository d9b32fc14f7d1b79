from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core.engine import Engine
from service.core.jobs import Job
from service.core.sampling import SamplingParams
from service.core.slots import SlotTable


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> Engine:
    return Engine(models_dir / "tiny-lstm" / "model.onnx")


def job_with_state(engine: Engine, fill: float) -> Job:
    info = engine.info
    return Job(
        prompt=[],
        state=[np.full((info.num_layers, info.hidden_size), fill, np.float32) for _ in info.state_names],
        logits=np.zeros(info.vocab_size, np.float32),
        params=SamplingParams(),
        rng=np.random.default_rng(0),
    )


def step_outputs(engine: Engine, batch: int, fill: float) -> list[np.ndarray]:
    return [np.full(s.shape, fill, np.float32) for s in engine.zero_state(batch)]


def test_parked_rows_read_as_if_scattered(engine: Engine) -> None:
    slots = SlotTable(engine.info)
    jobs = [job_with_state(engine, float(i)) for i in range(3)]
    for job in jobs:
        slots.take(job)
    rows = slots.rows(jobs[:2])
    slots.park(rows, step_outputs(engine, 2, 7.0))
    assert (slots.state[:, :, rows] == 7.0).all()
    assert (slots.state[:, :, slots.row(jobs[2])] == 2.0).all()  # a row not in the step is untouched


def test_giving_back_a_parked_row_copies_its_newest_state(engine: Engine) -> None:
    slots = SlotTable(engine.info)
    jobs = [job_with_state(engine, 0.0) for _ in range(2)]
    for job in jobs:
        slots.take(job)
    slots.park(slots.rows(jobs), step_outputs(engine, 2, 5.0))
    slots.give_back(jobs[0], keep=True)
    assert all((s == 5.0).all() for s in jobs[0].state)


def test_unpark_hands_over_only_the_same_rows_in_the_same_buffers(engine: Engine) -> None:
    slots = SlotTable(engine.info)
    jobs = [job_with_state(engine, 0.0) for _ in range(3)]
    for job in jobs:
        slots.take(job)
    rows = slots.rows(jobs[:2])
    buffers = step_outputs(engine, 2, 4.0)
    slots.park(rows, buffers)
    assert not slots.unpark(rows[::-1].copy(), buffers)  # another order is another batch
    assert not slots.unpark(rows, step_outputs(engine, 2, 4.0))  # equal values, other arrays
    assert not slots.unpark(slots.rows(jobs[1:]), buffers)
    assert slots.unpark(rows, buffers)
    assert not slots.unpark(rows, buffers)  # handed over once: the caller holds it now


def test_a_new_row_and_growth_keep_parked_state(engine: Engine) -> None:
    slots = SlotTable(engine.info)
    first = job_with_state(engine, 1.0)
    slots.take(first)
    slots.park(slots.rows([first]), step_outputs(engine, 1, 9.0))
    newcomers = [job_with_state(engine, 3.0) for _ in range(100)]  # more than the first capacity
    for job in newcomers:
        slots.take(job)
    assert (slots.state[:, :, slots.row(first)] == 9.0).all()
    assert (slots.state[:, :, slots.rows(newcomers)] == 3.0).all()


def test_gather_reads_rows_in_the_given_order(engine: Engine) -> None:
    slots = SlotTable(engine.info)
    jobs = [job_with_state(engine, float(i)) for i in range(4)]
    for job in jobs:
        slots.take(job)
    order = [jobs[3], jobs[0], jobs[2]]
    buffers = engine.zero_state(3)
    slots.gather(slots.rows(order), buffers)
    for buffer in buffers:
        assert (buffer[:, 0] == 3.0).all() and (buffer[:, 1] == 0.0).all() and (buffer[:, 2] == 2.0).all()
    for fresh, buffer in zip(slots.gather(slots.rows(order)), buffers, strict=True):  # new arrays, same values
        np.testing.assert_array_equal(fresh, buffer)
