"""The job's mailbox: one final event per stream, and frames that wait for `interval` characters."""

from __future__ import annotations

import asyncio

import pytest

from service.core.events import DoneEvent, ErrorEvent, PromptEvent, TextEvent
from service.core.jobs import Mailbox, Phase


def test_phases_say_when_a_job_is_finished() -> None:
    assert not any(p.finished for p in (Phase.JOINING, Phase.PREFILL, Phase.DECODING, Phase.FINISHING))
    assert all(p.finished for p in (Phase.LENGTH, Phase.STOP, Phase.CANCELLED, Phase.FED, Phase.FAILED))
    assert Phase.STOP.finish_reason == "stop"


def test_nothing_after_the_final_event() -> None:
    async def scenario() -> None:
        box = Mailbox()
        box.put(TextEvent("a"))
        box.put(ErrorEvent("internal", "x"))
        box.put(DoneEvent("length", 1))
        box.put(TextEvent("b"))
        assert [type(e) for e in await box.take()] == [TextEvent, ErrorEvent]

    asyncio.run(scenario())


@pytest.mark.parametrize("interval", [1, 3])
def test_a_stream_wakes_once_interval_characters_wait(interval: int) -> None:
    async def scenario() -> list[list[str]]:
        box = Mailbox(interval)
        frames: list[list[str]] = []

        async def reader() -> None:
            while True:
                events = await box.take()
                frames.append([e.text if isinstance(e, TextEvent) else type(e).__name__ for e in events])
                if any(isinstance(e, DoneEvent) for e in events):
                    return

        task = asyncio.create_task(reader())
        for ch in "abcdefg":
            box.put(TextEvent(ch))
            await asyncio.sleep(0)  # the reader runs between puts, as it does between steps
            await asyncio.sleep(0)
        box.put(DoneEvent("length", 7))
        await task
        return frames

    frames = asyncio.run(scenario())
    if interval == 1:
        assert frames[:7] == [[c] for c in "abcdefg"]
    else:
        assert frames == [["a", "b", "c"], ["d", "e", "f"], ["g", "DoneEvent"]]


def test_a_prompt_event_wakes_the_stream_at_once() -> None:
    async def scenario() -> None:
        box = Mailbox(8)
        box.put(PromptEvent("hi", activations=[[0.1], [0.2]]))
        events = await asyncio.wait_for(box.take(), timeout=5)
        assert isinstance(events[0], PromptEvent)

    asyncio.run(scenario())
