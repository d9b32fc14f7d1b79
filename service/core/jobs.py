"""A job: one generation (or feed) on one session's state, and the phases it goes through.

A job's lifecycle is one enum, never a set of flags: it joins, reads its prompt a chunk at a
time, decodes one character per step, reads the last character it sent, and ends. Which
phase a job is in says which of the scheduler's collections holds it; `Phase.finished` jobs
are held by none and have had their one final event.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.core.constraints import CharMatcher
from service.core.events import FINAL_EVENTS, Event, PromptEvent, TextEvent, TopLogprobs
from service.core.sampling import SamplingParams, StopMatcher


class Phase(enum.IntEnum):
    JOINING = 0  # submitted; the step thread has not taken it yet
    PREFILL = 1  # reading its prompt, one bounded chunk per scheduler iteration
    DECODING = 2  # in the step batch: reads its last character (or next prompt character), samples the next
    FINISHING = 3  # sampling is over; reads the last character it sent, then ends with `ending`
    # Finished: the job has had its final event and holds nothing.
    LENGTH = 4
    STOP = 5
    CANCELLED = 6
    FED = 7
    FAILED = 8

    @property
    def finished(self) -> bool:
        return self >= Phase.LENGTH

    @property
    def finish_reason(self) -> str:
        return self.name.lower()


class Mailbox:
    """A job's events on their way to its stream, taken all at once on the event loop.

    Lighter than an asyncio.Queue per character: a put is a list append plus, only when the
    stream should wake, one future to set; a stream that fell behind takes everything waiting
    in one go (and sends it as one frame). With `interval` n > 1 the stream wakes only once n
    characters wait (or a prompt or final event comes), as vLLM's `stream_interval` does: fewer,
    larger frames for a latency of n steps per frame.
    """

    __slots__ = ("_chars", "_closed", "_interval", "_items", "_waiter")

    def __init__(self, interval: int = 1) -> None:
        self._items: list[Event] = []
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False  # a final event was put: the stream has ended
        self._interval = interval
        self._chars = 0  # text characters waiting

    def put(self, event: Event) -> None:
        """Queue an event; anything after the first final event is dropped (one end per stream)."""
        if self._closed:
            return
        self._items.append(event)
        if isinstance(event, TextEvent):
            self._chars += len(event.text)
            if self._chars < self._interval:
                return
        else:
            self._closed = isinstance(event, FINAL_EVENTS)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self) -> list[Event]:
        """Every event waiting, in order; waits for at least one (or `interval` characters)."""
        while not self._items or (self._chars < self._interval and not self._closed and self._only_text()):
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        self._chars = 0
        return items

    def _only_text(self) -> bool:
        return all(isinstance(e, TextEvent) for e in self._items)


class Notes:
    """Per-character annotations (logprobs, top alternatives, unit values), held until the text is sent.

    Entries are kept per generated character, oldest first. Text released by the stop matcher
    is a prefix of what was generated, so the first n unsent characters always match the first
    n entries. Unit values arrive one step after their character (the model reads a character
    in the step after the one that sampled it), so text waits for them.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.unsent = ""
        self.logprobs: list[float] = []
        self.top: list[TopLogprobs] = []
        self.activations: list[list[float]] = []
        # The prompt's own entries, sent as one PromptEvent once the prompt is read.
        self.prompt_logprobs: list[float | None] = []
        self.prompt_top: list[TopLogprobs | None] = []
        self.prompt_ranks: list[int | None] = []
        self.prompt_activations: list[list[float]] = []

    def ready(self) -> int:
        """How many unsent characters have every entry they need."""
        if self.params.activations is None:
            return len(self.unsent)
        return min(len(self.unsent), len(self.activations))

    def take(self, n: int) -> TextEvent:
        text, self.unsent = self.unsent[:n], self.unsent[n:]
        event = TextEvent(text)
        if self.params.logprobs:
            event.logprobs, self.logprobs = self.logprobs[:n], self.logprobs[n:]
        if self.params.top_logprobs:
            event.top_logprobs, self.top = self.top[:n], self.top[n:]
        if self.params.activations is not None:
            event.activations, self.activations = self.activations[:n], self.activations[n:]
        return event

    def prompt_event(self, text: str) -> PromptEvent:
        p = self.params
        return PromptEvent(
            text,
            logprobs=self.prompt_logprobs if p.prompt_logprobs else None,
            top_logprobs=self.prompt_top if p.prompt_logprobs and p.top_logprobs else None,
            activations=self.prompt_activations if p.activations is not None and p.activations.prompt else None,
            ranks=self.prompt_ranks if p.prompt_ranks else None,
        )


@dataclass(eq=False)
class Job:
    """A request for the scheduler: read `prompt` on top of `state`, then generate per `params`.

    The scheduler owns everything below `events` while the job runs; the event loop reads
    `state`, `logits` and `absorbed` only after the final event.
    """

    prompt: list[int]
    state: list[np.ndarray]  # (layers, hidden) per state tensor
    logits: np.ndarray | None  # (vocab,) next-char logits, None until the model has read something
    params: SamplingParams
    rng: np.random.Generator
    wants_state: bool = True  # False for stateless requests: the last character need not be read
    on_complete: Callable[[Job], None] | None = None
    # Called on the step thread after each prompt chunk is read: (prompt characters read, state per
    # tensor (layers, hidden), next-character logits), views that the callee copies if it keeps them.
    on_chunk: Callable[[int, list[np.ndarray], np.ndarray], None] | None = None
    matcher: CharMatcher | None = None  # the constraint every generated text must meet (params.constraint)
    # The request it is one of (a completion's choices): a request runs at most the scheduler's
    # max_rows_per_request jobs at once, the rest wait for one of them to end.
    group: object | None = None
    events: Mailbox = field(default_factory=Mailbox)
    phase: Phase = Phase.JOINING
    ending: Phase = Phase.LENGTH  # the finished phase a FINISHING job will take
    read: int = 0  # prompt characters read so far
    next_input: int | None = None  # the character the model reads at the next step
    last_input: int | None = None  # the last character a step read (a prompt's chunks are not steps)
    generated: int = 0
    absorbed: int = 0  # characters the state has read during this job
    stop: StopMatcher = field(init=False)
    notes: Notes | None = field(init=False)
    submitted_at: float = 0.0  # perf_counter() when submitted to the scheduler, and when it took the job
    admitted_at: float = 0.0
    # For penalties only: which characters this request's prompt and output hold, and the output's counts.
    seen: np.ndarray | None = field(init=False, default=None)
    counts: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.stop = StopMatcher(self.params.stop)
        self.notes = Notes(self.params) if self.params.annotated else None

    def start_penalties(self, vocab_size: int) -> None:
        """Count characters from here on (the prompt counts as seen for repetition_penalty)."""
        self.seen = np.zeros(vocab_size, bool)
        self.seen[self.prompt] = True
        self.counts = np.zeros(vocab_size, np.int64)

    def note_sampled(self, char: int) -> None:
        if self.counts is not None and self.seen is not None:
            self.counts[char] += 1
            self.seen[char] = True

    @property
    def last_char(self) -> int | None:
        """The last character the state read, when the job read any."""
        if self.last_input is not None:
            return self.last_input
        return self.prompt[self.read - 1] if self.read else None

    @property
    def reads_last_char(self) -> bool:
        """Whether the last character sent must be read before the job ends."""
        return self.wants_state or self.params.activations is not None
