"""Embeddings: a text's vector is the model's top-layer hidden state `h` after reading it.

A recurrent model's memory of a text is its final state; the top layer's `h` is what predicts the
next character, so it is the summary the model itself uses. Each text is read from the state a
generation starts from (after a line break), as a read-only job through the scheduler: texts are
read in chunks, batched with every other request, and count against the prefill share like a
prompt. The vector is L2-normalised (as OpenAI's are), after keeping its first `dimensions` units
when asked.
"""

from __future__ import annotations

import asyncio

import numpy as np

from service.core.generation import Generation
from service.core.jobs import Job
from service.core.sampling import SamplingParams
from service.errors import InvalidInput
from service.serving.checks import DEFAULT_START, prompt_ids
from service.serving.leases import fresh_session
from service.serving.resources import Resources

_NO_DRAWS = np.random.default_rng(0)  # read-only jobs draw nothing


class Embeddings:
    def __init__(self, res: Resources) -> None:
        self.res = res

    async def embed(
        self, texts: list[str], model_id: str | None, dimensions: int | None = None
    ) -> tuple[str, list[np.ndarray]]:
        """The model's id and each text's unit vector (float32), in order."""
        self.res.refuse_when_draining()
        model = self.res.registry.get(model_id)
        info = model.engine.info
        hidden = info.hidden_size
        if dimensions is not None and not 1 <= dimensions <= hidden:
            raise InvalidInput(f"dimensions is {dimensions}; this model's vectors have 1 to {hidden}", "dimensions")
        start = [info.vocab_index[DEFAULT_START]] if DEFAULT_START in info.vocab_index else []
        each = [start + prompt_ids(self.res, model, text, f"input.{i}") for i, text in enumerate(texts)]
        scheduler = self.res.schedulers[model.id]
        zero = list(fresh_session(model, None).state)
        readings: list[tuple[Job, Generation]] = []
        try:
            for ids in each:
                # wants_state: the job reads the text's last character too, so its state is the whole text's.
                job = Job(ids, zero, None, SamplingParams(max_new_chars=0), _NO_DRAWS, wants_state=True)
                scheduler.submit(job)
                readings.append((job, Generation(job, scheduler, model.id, None, len(ids))))
            await asyncio.gather(*(reading.result() for _, reading in readings))
        except BaseException:
            for _, reading in readings:
                reading.cancel()
            raise
        return model.id, [_unit(job.state[0][-1][:dimensions]) for job, _ in readings]


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm > 0 else vector).astype(np.float32)
