"""Scoring: texts read teacher-forced, each as a stateless job that only reads, with the model's
log-probability of each of their characters (and the top alternatives when asked).

The context is read once, by a job of its own, and every text starts from the state after it (a
recurrent model's whole memory of the context is that state), so a long context with many texts
costs the context once plus the texts, never context x texts. The scheduler reads the texts in
chunks of at most `prefill_chunk` positions, texts of the same chunk length in one seq=T call,
between the steps of running streams. Every text is checked before any is read.
"""

from __future__ import annotations

from service.core.events import PromptEvent
from service.core.sampling import SamplingParams
from service.errors import InvalidInput, TooLarge
from service.serving.checks import DEFAULT_START, check_vocab_count, prompt_ids
from service.serving.reading import read_all, reading_job, zero_state
from service.serving.registry import LoadedModel
from service.serving.resources import Resources

# Characters one score request may bring, over all its texts: about a minute of reading on two cores.
MAX_SCORE_CHARS = 1_000_000


class Scoring:
    def __init__(self, res: Resources) -> None:
        self.res = res

    async def score(
        self, texts: list[str], context: str | None = None, model_id: str | None = None, top_logprobs: int = 0
    ) -> tuple[str, list[PromptEvent]]:
        """Each text read teacher-forced after `context` (or after the line break a generation starts
        from): the model's log-probability of each of its characters, with the top alternatives when asked."""
        self.res.refuse_when_draining()
        model = self.res.registry.get(model_id)
        check_vocab_count(model, top_logprobs, "top_logprobs")
        start = self._context_ids(model, context)
        total = sum(len(text) for text in texts)
        if total > MAX_SCORE_CHARS:
            raise TooLarge(
                f"texts have {total} characters in all; one request may score at most {MAX_SCORE_CHARS}", field="texts"
            )
        each = [prompt_ids(self.res, model, text, f"texts.{i}") for i, text in enumerate(texts)]
        before = reading_job(start, SamplingParams(max_new_chars=0), zero_state(model), keep_state=True)
        await read_all(self.res, model, [before])
        state, logits = list(before.state), before.logits
        params = SamplingParams(temperature=0.0, max_new_chars=0, prompt_logprobs=True, top_logprobs=top_logprobs)
        # Each text's row starts as a copy of the state after the context.
        results = await read_all(self.res, model, [reading_job(ids, params, state, logits) for ids in each])
        scored = []
        for result in results:
            assert result.prompt is not None  # asked for: sent once the text is read
            scored.append(result.prompt)
        return model.id, scored

    def _context_ids(self, model: LoadedModel, context: str | None) -> list[int]:
        """What every text is read after: the context, or the line break a generation starts from."""
        if context:
            return prompt_ids(self.res, model, context, "context")
        vocab_index = model.engine.info.vocab_index
        if DEFAULT_START in vocab_index:
            return [vocab_index[DEFAULT_START]]
        raise InvalidInput("context is required: the model has no line break to start from", field="context")
