"""Read-only jobs: texts read teacher-forced through the model's scheduler, nothing sampled.

/v1/score (its context, then its texts) and /v1/embeddings read this way. The texts are submitted
together and read in chunks, batched with every other request; if one fails or the request is
cancelled, the others stop at the scheduler's next step.
"""

from __future__ import annotations

import asyncio

import numpy as np

from service.core.generation import Generation, GenerationResult
from service.core.jobs import Job
from service.core.sampling import SamplingParams
from service.serving.leases import fresh_session
from service.serving.registry import LoadedModel
from service.serving.resources import Resources

# The RNG of jobs that draw nothing: a job that only reads needs no seeded RNG of its own.
NO_DRAWS = np.random.default_rng(0)


def reading_job(
    ids: list[int],
    params: SamplingParams,
    state: list[np.ndarray],
    logits: np.ndarray | None = None,
    keep_state: bool = False,
) -> Job:
    """A job that reads `ids` from `state`; with `keep_state` it reads the last character too, so
    its final state is the whole text's."""
    return Job(ids, state, logits, params, NO_DRAWS, wants_state=keep_state)


def zero_state(model: LoadedModel) -> list[np.ndarray]:
    """The state a text is read from when nothing came before it (each job's row is a copy)."""
    return list(fresh_session(model, None).state)


async def read_all(res: Resources, model: LoadedModel, jobs: list[Job]) -> list[GenerationResult]:
    """Submit the jobs to the model's scheduler and wait for every one of them."""
    scheduler = res.schedulers[model.id]
    readings: list[Generation] = []
    try:
        for job in jobs:
            scheduler.submit(job)
            readings.append(Generation(job, scheduler, model.id, None, len(job.prompt)))
        return list(await asyncio.gather(*(reading.result() for reading in readings)))
    except BaseException:
        for reading in readings:
            reading.cancel()
        raise
