"""OpenAI's Completions API on top of the generation service: requests in, choices or SSE chunks out.

A completion is one generation per choice, all started together so that they share the
scheduler's batched steps. A stateless choice runs on a throwaway state of its own, with its own
RNG: the first choice of a prompt takes the request's seed as it is (so it samples what the
native `/v1/generate` samples with that seed) and choice j > 0 a seed derived from (seed, j),
so one seed reproduces every choice. With `session_id` the completion continues that session
exactly as the native session routes do, and keeps its new state; a session holds one history,
so it takes one prompt and one choice. With charstream's `unique`, a prompt's choices have
distinct texts: a repeat is sampled again with the next choice index's seed.

Buildable in one line: `CompletionServing(GenerationService.create(registry, settings))`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import numpy as np

from service.api.openai.errors import openai_error_body
from service.api.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
)
from service.api.sse import SSE_DONE
from service.core.events import Completed, Failed, PromptEvent, StreamEvent, TextEvent, TopLogprobs
from service.core.generation import Generation, GenerationResult
from service.core.sampling import is_greedy
from service.errors import ApiError, InternalError, InvalidInput
from service.serving import states
from service.serving.facade import GenerationService
from service.sessions.store import Owner, Session

log = logging.getLogger("charstream.openai")

# With `unique`, a prompt's choices are sampled at most this many times n before fewer come back.
UNIQUE_ATTEMPTS = 4
# charstream's finish reasons in OpenAI's words: a read-only generation (max_tokens 0) hit its length.
FINISH_REASONS = {"length": "length", "fed": "length", "stop": "stop", "cancelled": "stop"}
UINT64_MASK = 2**64 - 1


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of a prompt's choice `index`: the request's own for the first, one derived from it for the others."""
    if seed is None:
        return None
    seed &= UINT64_MASK  # negative int64 seeds (vLLM accepts them) map onto uint64
    if index == 0:
        return seed
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def _with_chosen(top: TopLogprobs | None, char: str, logprob: float | None) -> TopLogprobs | None:
    """The alternatives at one position, the chosen character always among them (as OpenAI returns them)."""
    if logprob is None:
        return None  # the first character of a prompt read from nothing: no prediction was made
    if top is None:
        return {char: logprob}
    if char in top:
        return top
    return {**top, char: logprob}


def logprobs_block(
    text: str,
    logprobs: Sequence[float | None] | None,
    top: Sequence[TopLogprobs | None] | None,
    offset: int,
) -> dict[str, list[Any]]:
    """OpenAI's logprobs object for `text`, one entry per character, offsets counted from `offset`."""
    lps: list[float | None] = list(logprobs) if logprobs is not None else [None] * len(text)
    tops: Sequence[TopLogprobs | None] = top if top is not None else [None] * len(text)
    return {
        "tokens": list(text),
        "token_logprobs": lps,
        "top_logprobs": [_with_chosen(t, c, lp) for c, lp, t in zip(text, lps, tops, strict=True)],
        "text_offset": list(range(offset, offset + len(text))),
    }


def _error_frame(error: ApiError) -> bytes:
    _, body = openai_error_body(error)
    return f"data: {body.model_dump_json()}\n\n".encode()


class ChunkWriter:
    """SSE frames of one streamed completion; the frame sent most (plain text) is built without a dict."""

    def __init__(self, completion_id: str, created: int, model: str, session_id: str | None, usage: bool) -> None:
        head = json.dumps({"id": completion_id, "object": "text_completion", "created": created, "model": model})
        self._head = "data: " + head[:-1] + ', "choices": ['
        extra = ""
        if session_id is not None:
            extra = f', "session_id": {json.dumps(session_id)}'
        self._extra = extra
        # With include_usage every chunk carries `usage`, null until the last one (as OpenAI sends it).
        self._tail = "]" + (', "usage": null' if usage else "") + extra + "}\n\n"

    def text(self, index: int, text: str, logprobs: dict[str, list[Any]] | None = None) -> bytes:
        lp = "null" if logprobs is None else json.dumps(logprobs, ensure_ascii=False)
        body = json.dumps(text, ensure_ascii=False)
        choice = f'{{"index": {index}, "text": {body}, "logprobs": {lp}, "finish_reason": null}}'
        return f"{self._head}{choice}{self._tail}".encode()

    def finish(self, index: int, reason: str) -> bytes:
        choice = f'{{"index": {index}, "text": "", "logprobs": null, "finish_reason": "{reason}"}}'
        return f"{self._head}{choice}{self._tail}".encode()

    def usage(self, usage: CompletionUsage) -> bytes:
        return f'{self._head}], "usage": {usage.model_dump_json()}{self._extra}}}\n\n'.encode()


async def merged(generations: Sequence[Generation]) -> AsyncGenerator[tuple[int, StreamEvent], None]:
    """The events of several generations as they come, each with its choice index; closing it cancels them all."""
    if len(generations) == 1:  # the common case, without a queue in between
        async for event in generations[0].stream():
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, StreamEvent | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for event in generation.stream():
                queue.put_nowait((index, event))
        except Exception:
            log.exception("choice stream failed")
            queue.put_nowait((index, Failed(InternalError("the stream failed on the server"))))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


class CompletionServing:
    def __init__(self, service: GenerationService) -> None:
        self.service = service

    async def create(self, request: CompletionRequest, owner: Owner) -> CompletionResponse | AsyncIterator[bytes]:
        """Validate and start every choice; the answer, or (streaming) its SSE frames ending in [DONE].
        A `session_id` names one of `owner`'s sessions."""
        group = object()  # its choices run at most CHARSTREAM_MAX_ROWS_PER_REQUEST at a time
        prompts, generations, starts = await self._start(request, owner, group)
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        model = generations[0].model
        if request.stream:
            writer = ChunkWriter(completion_id, created, model, request.session_id, request.include_usage)
            return self._stream(request, prompts, generations, writer)
        results = await self._collect(generations)
        completed = [r.completed for r in results]
        if request.unique:
            prompts, results, completed = await self._unique(request, model, results, group)
        choices = [self._choice(request, i, p, r) for i, (p, r) in enumerate(zip(prompts, results, strict=True))]
        if request.return_state:  # each choice's start now holds its final state
            for choice, start in zip(choices, starts, strict=True):
                assert start is not None
                choice.state = states.to_text(self.service.export_state(start))
        return CompletionResponse(
            id=completion_id,
            created=created,
            model=model,
            choices=choices,
            usage=self._usage(request, completed),
            session_id=request.session_id,
        )

    async def _start(
        self, request: CompletionRequest, owner: Owner, group: object
    ) -> tuple[list[str], list[Generation], list[Session | None]]:
        """Every choice's prompt and generation, in OpenAI's order (prompt by prompt, n choices each)."""
        model = self.service.registry.get(request.model)
        request.check_supported(model.engine.info.vocab_size)
        if request.ignored_fields:
            fields = ", ".join(request.ignored_fields)
            log.warning("fields present in the request but ignored: %s", fields, extra={"fields": fields})
        n, prompts = request.choices_per_prompt, request.prompts
        if request.session_id is not None:
            await self.service.get_session(request.session_id, owner)  # 404 for an unknown or expired session
            if n > 1 or len(prompts) > 1:
                raise InvalidInput(
                    "a session holds one history: with session_id send one prompt and n = 1 "
                    "(fork the session with POST /v1/sessions/{id}/fork to try several continuations)",
                    field="n" if n > 1 else "prompt",
                )
        params = request.to_sampling_params()
        # Every choice's constraint runs at once: a costly one on many rows would slow every step.
        await self.service.check_constraint_rows(params, model.id, n * len(prompts), "n" if n > 1 else "prompt")
        if n > 1 and request.session_id is None and request.state is None:
            # Each prompt read once, into the prompt-state cache, rather than once per choice.
            await asyncio.gather(*(self.service.read_prompt_once(params, p, model.id) for p in dict.fromkeys(prompts)))
        choice_prompts: list[str] = []
        generations: list[Generation] = []
        blob = None if request.state is None else states.from_text(request.state)
        starts: list[Session | None] = []  # each choice's own state, when it starts from one or returns one
        try:
            for prompt in prompts:
                for j in range(n):
                    seed = choice_seed(request.seed, j)
                    start = None
                    if blob is not None or request.return_state:
                        # Each choice continues its own copy; without a seed the first continues the
                        # state's RNG exactly and the others draw fresh seeds.
                        own = seed if seed is not None or j == 0 else secrets.randbits(63)
                        start = self.service.state_session(blob, model.id, own)
                    starts.append(start)
                    generation = await self.service.generate(
                        params,
                        prompt,
                        model.id,
                        seed,
                        request.session_id,
                        owner,
                        start=start,
                        keep=bool(request.return_state),
                        group=group,
                    )
                    generations.append(generation)
                    choice_prompts.append(prompt)
        except BaseException:
            for generation in generations:
                generation.cancel()
            raise
        return choice_prompts, generations, starts

    async def _unique(
        self, request: CompletionRequest, model: str, results: list[GenerationResult], group: object
    ) -> tuple[list[str], list[GenerationResult], list[Completed]]:
        """Each prompt's first n distinct texts, in seed order, with what every attempt generated.

        A repeat is sampled again with the seed of the next choice index (n, n + 1, ...), so one
        seed still reproduces the answer. A greedy request makes one text however often it runs,
        and any request gives up after UNIQUE_ATTEMPTS x n attempts with the distinct texts it has.
        """
        n = request.choices_per_prompt
        params = request.to_sampling_params()
        retries = 0 if is_greedy(params.temperature) else (UNIQUE_ATTEMPTS - 1) * n

        async def one_prompt(prompt: str, first: list[GenerationResult]) -> list[GenerationResult]:
            kept: dict[str, GenerationResult] = {}
            attempts, batch = n, first
            while True:
                for result in batch:
                    if len(kept) < n:
                        kept.setdefault(result.text, result)
                missing = min(n - len(kept), n + retries - attempts)
                if missing <= 0:
                    return list(kept.values())
                more: list[Generation] = []
                try:
                    for k in range(missing):
                        seed = choice_seed(request.seed, attempts + k)
                        more.append(await self.service.generate(params, prompt, model, seed, group=group))
                except BaseException:
                    for generation in more:
                        generation.cancel()
                    raise
                attempts += missing
                batch = await self._collect(more)
                extra.extend(r.completed for r in batch)

        extra: list[Completed] = []
        per_prompt = await asyncio.gather(
            *(one_prompt(p, results[i * n : (i + 1) * n]) for i, p in enumerate(request.prompts))
        )
        prompts = [p for p, kept in zip(request.prompts, per_prompt, strict=True) for _ in kept]
        return prompts, [r for kept in per_prompt for r in kept], [r.completed for r in results] + extra

    @staticmethod
    async def _collect(generations: list[Generation]) -> list[GenerationResult]:
        tasks = [asyncio.ensure_future(g.result()) for g in generations]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()  # the others stop at their next step
            raise

    @staticmethod
    def _usage(request: CompletionRequest, completed: list[Completed]) -> CompletionUsage:
        """Characters: each prompt counted once (not once per choice), every choice's generated ones."""
        prompt = sum(len(p) for p in request.prompts)
        generated = sum(c.generated_chars for c in completed)
        return CompletionUsage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)

    @staticmethod
    def _choice(request: CompletionRequest, index: int, prompt: str, result: GenerationResult) -> CompletionChoice:
        echoed = prompt if request.echo else ""
        logprobs = None
        if request.logprobs is not None:
            block = logprobs_block("", None, None, 0)
            if echoed:
                read = result.prompt
                lps = read.logprobs if read is not None and read.logprobs is not None else None
                top = read.top_logprobs if read is not None else None
                block = logprobs_block(echoed, lps, top, 0)
            more = logprobs_block(result.text, result.logprobs, result.top_logprobs, len(echoed))
            logprobs = CompletionLogprobs(**{k: block[k] + more[k] for k in block})
        return CompletionChoice(
            index=index,
            text=echoed + result.text,
            logprobs=logprobs,
            finish_reason=FINISH_REASONS.get(result.completed.finish_reason, "stop"),  # type: ignore[arg-type]
        )

    async def _stream(
        self,
        request: CompletionRequest,
        prompts: list[str],
        generations: list[Generation],
        writer: ChunkWriter,
    ) -> AsyncIterator[bytes]:
        """Text chunks as they come (the echoed prompt first), one finishing chunk per choice,
        the usage chunk when asked, then [DONE]; an error ends the stream with an error frame."""
        wants_logprobs = request.logprobs is not None
        offsets = [0] * len(generations)
        completed: list[Completed] = []
        try:
            if request.echo and not wants_logprobs:
                for i, prompt in enumerate(prompts):
                    if prompt:
                        offsets[i] = len(prompt)
                        yield writer.text(i, prompt)
            async with contextlib.aclosing(merged(generations)) as events:
                async for i, event in events:
                    if isinstance(event, TextEvent):
                        if not event.text:
                            continue
                        block = None
                        if wants_logprobs:
                            block = logprobs_block(event.text, event.logprobs, event.top_logprobs, offsets[i])
                        offsets[i] += len(event.text)
                        yield writer.text(i, event.text, block)
                    elif isinstance(event, PromptEvent):
                        if request.echo and prompts[i]:  # sent only with echo and logprobs
                            offsets[i] = len(prompts[i])
                            block = logprobs_block(prompts[i], event.logprobs, event.top_logprobs, 0)
                            yield writer.text(i, prompts[i], block)
                    elif isinstance(event, Completed):
                        completed.append(event)
                        yield writer.finish(i, FINISH_REASONS.get(event.finish_reason, "stop"))
                    else:  # one choice failed: the completion fails (closing `events` stops the others)
                        yield _error_frame(event.error)
                        break
            if request.include_usage and len(completed) == len(generations):
                yield writer.usage(self._usage(request, completed))
        except Exception:  # a bug, not a client: the stream still ends with an error and [DONE]
            log.exception("completion stream failed")
            yield _error_frame(InternalError("the stream failed on the server"))
        yield SSE_DONE
