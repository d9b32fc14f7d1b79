"""The engine room: one scheduler per model steps every active job in one onnxruntime call.

`scheduler` (continuous batching with chunked prefill: the step thread, its iteration and its
guards) runs its stages as its own bases: `admission` (jobs in, each given a row and a first
phase), `stepping` (the engine work: prompt chunks, then one batched step and its sampling, as
`step_plan` lays them out) and `delivery` (each sampled character as text, a job's end, the
events handed to the event loop). They drive `jobs` (a request's lifecycle and its mailbox of
events) through `slots` (each job's recurrent state in batch arrays), `sampling` and `draws`
(the next character and the RNG behind it), `constraints` (structured outputs: which
characters a job may sample next) and `engine` (the onnxruntime session); `prompt_notes`
scores the prompts that ask for it. `events` are what a job emits and `generation` is the
consumer's handle on them. No HTTP, no session store.

The names below are what the layers above (`service.serving`, `service.api`) use: import them
from here, not from the modules. Each is imported on first use, so that importing one light
module of the core (batch generation reads `sampling` and `engine`) does not load llguidance,
the metrics and the settings that the scheduler needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.core.constraints import CharMatcher, Compiled, ConstraintError
    from service.core.engine import Engine
    from service.core.events import Completed, Failed, PromptEvent, StreamEvent, TextEvent, TopLogprobs
    from service.core.generation import Generation, GenerationResult
    from service.core.jobs import Job, Mailbox, Phase
    from service.core.sampling import ActivationSpec, ConstraintSpec, SamplingParams, SteerSpec, is_greedy
    from service.core.scheduler import Scheduler

# Each public name and the module that defines it.
_HOMES = {
    "CharMatcher": "constraints",
    "Compiled": "constraints",
    "ConstraintError": "constraints",
    "Engine": "engine",
    "Completed": "events",
    "Failed": "events",
    "PromptEvent": "events",
    "StreamEvent": "events",
    "TextEvent": "events",
    "TopLogprobs": "events",
    "Generation": "generation",
    "GenerationResult": "generation",
    "Job": "jobs",
    "Mailbox": "jobs",
    "Phase": "jobs",
    "ActivationSpec": "sampling",
    "ConstraintSpec": "sampling",
    "SamplingParams": "sampling",
    "SteerSpec": "sampling",
    "is_greedy": "sampling",
    "Scheduler": "scheduler",
}

__all__ = [
    "ActivationSpec",
    "CharMatcher",
    "Compiled",
    "Completed",
    "ConstraintError",
    "ConstraintSpec",
    "Engine",
    "Failed",
    "Generation",
    "GenerationResult",
    "Job",
    "Mailbox",
    "Phase",
    "PromptEvent",
    "SamplingParams",
    "Scheduler",
    "SteerSpec",
    "StreamEvent",
    "TextEvent",
    "TopLogprobs",
    "is_greedy",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
