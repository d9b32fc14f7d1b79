"""Embeddings: a text's vector is the model's top-layer hidden state `h` after reading it.

A recurrent model's memory of a text is its final state; the top layer's `h` is what predicts the
next character, so it is the summary the model itself uses. Each text is read from the state a
generation starts from (after a line break), as a read-only job through the scheduler: texts are
read in chunks, batched with every other request, and count against the prefill share like a
prompt. The vector is L2-normalised (as OpenAI's are), after keeping its first `dimensions` units
when asked.
"""

from __future__ import annotations

import numpy as np

from service.core.sampling import SamplingParams
from service.errors import InvalidInput
from service.serving.checks import DEFAULT_START, prompt_ids
from service.serving.reading import read_all, reading_job, zero_state
from service.serving.resources import Resources


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
        zero = zero_state(model)
        jobs = [reading_job(ids, SamplingParams(max_new_chars=0), zero, keep_state=True) for ids in each]
        await read_all(self.res, model, jobs)
        return model.id, [_unit(job.state[0][-1][:dimensions]) for job in jobs]


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm > 0 else vector).astype(np.float32)
