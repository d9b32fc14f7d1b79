"""What a generation asks of each step beside the sampler: its parameters, penalties, stops and annotations.

A row's result depends only on its own logits, parameters and uniform draw, so a session
samples the same text whether it is stepped alone or alongside others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The sampler and its parameters' bounds are the artifact contract's, shared with the training
# side and the edge runner; the service adds what only a server does (penalties, stops, constraints).
from exports.sampling import GREEDY_BELOW, BatchSampler, Sampling, is_greedy

__all__ = [
    "GREEDY_BELOW",
    "ActivationSpec",
    "BatchSampler",
    "ConstraintSpec",
    "SamplingParams",
    "SteerSpec",
    "StopMatcher",
    "is_greedy",
    "log_softmax",
    "penalise",
    "top_alternatives",
]


@dataclass(frozen=True)
class ActivationSpec:
    """Which units' values to report per character: state tensor `tensor` (h = 0, c = 1) of `layer`."""

    layer: int
    tensor: int
    units: tuple[int, ...]
    prompt: bool = False  # the prompt's characters too, not only the generated ones


@dataclass(frozen=True)
class ConstraintSpec:
    """What every generated text must match: `kind` is regex, choice, json or grammar (Lark), `source` its text
    (the choices and the JSON Schema as JSON). Hashable: compiled constraints are cached by it."""

    kind: str
    source: str
    field: str = "structured_outputs"  # the request field named when the constraint is refused


@dataclass(frozen=True)
class SteerSpec:
    """A unit written after every step: set to `value`, or offset by `add` (exactly one is set)."""

    layer: int
    tensor: int  # h = 0, c = 1
    unit: int
    value: float | None = None
    add: float | None = None


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_new_chars: int = 256
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0  # the N most likely characters at each position, with their logprobs
    activations: ActivationSpec | None = None
    prompt_logprobs: bool = False  # the prompt's own logprobs (and top_logprobs), as OpenAI's echo gives
    prompt_ranks: bool = False  # each prompt character's rank among the model's predictions (0 = the most likely)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (character id, bias added to its logit), OpenAI's logit_bias
    min_p: float = 0.0  # keep characters at least min_p times as likely as the most likely one; 0 = off
    repetition_penalty: float = 1.0  # vLLM's: logits of characters already seen divided (or, < 0, multiplied)
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the character's count in the output
    presence_penalty: float = 0.0  # OpenAI's: minus this once the character is in the output
    constraint: ConstraintSpec | None = None
    steer: tuple[SteerSpec, ...] = ()

    def __post_init__(self) -> None:
        # The sampler's own bounds, checked where every entry point's parameters meet.
        Sampling(self.temperature, self.top_k, self.top_p, self.min_p)

    @property
    def penalised(self) -> bool:
        """Whether the row's logits depend on the characters it has seen."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def annotated(self) -> bool:
        """Anything asked for beside the text: the slower, per-character path."""
        return self.logprobs or self.top_logprobs > 0 or self.activations is not None or self.annotates_prompt

    @property
    def annotates_prompt(self) -> bool:
        return self.prompt_logprobs or self.prompt_ranks or self.steps_prompt

    @property
    def steps_prompt(self) -> bool:
        """The prompt is read one character per step (to report unit values after each), not in chunks."""
        return self.activations is not None and self.activations.prompt


def penalise(logits: np.ndarray, seen: np.ndarray, counts: np.ndarray, params: SamplingParams) -> None:
    """Apply a row's penalties in place to its logits (vocab,), as vLLM does.

    repetition_penalty (vLLM's and Hugging Face's): a character seen in the prompt or the output
    has a positive logit divided by the penalty and a negative one multiplied by it.
    frequency_penalty and presence_penalty (OpenAI's): the logit minus frequency_penalty times the
    character's count in the output, minus presence_penalty if it is there at all.
    """
    if params.repetition_penalty != 1.0:
        r = params.repetition_penalty
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / r, logits[seen] * r)
    if params.frequency_penalty or params.presence_penalty:
        logits -= (params.frequency_penalty * counts + params.presence_penalty * (counts > 0)).astype(logits.dtype)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """The model's own log-probabilities (no temperature or filtering), (batch, vocab) float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    return z


def top_alternatives(logprobs: np.ndarray, n: int, vocab: tuple[str, ...]) -> list[dict[str, float]]:
    """The n most likely characters of each row of (batch, vocab) log-probabilities, most likely first."""
    n = min(n, logprobs.shape[1])
    best = np.argpartition(-logprobs, n - 1, axis=1)[:, :n]
    rows = np.arange(logprobs.shape[0])[:, None]
    order = np.argsort(-logprobs[rows, best], axis=1, kind="stable")
    best = best[rows, order]
    values = logprobs[rows, best]
    return [
        {vocab[int(i)]: float(v) for i, v in zip(ids, vals, strict=True)}
        for ids, vals in zip(best, values, strict=True)
    ]


class StopMatcher:
    """Holds back text that could be the start of a stop sequence; cuts the stop sequence out.

    As OpenAI-style servers do, the stop sequence itself is not returned to the client.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Feed generated text; returns (text safe to send now, whether a stop sequence matched)."""
        if not self.stops:
            return text, False
        self.pending += text
        for stop in self.stops:
            at = self.pending.find(stop)
            if at >= 0:
                out, self.pending = self.pending[:at], ""
                return out, True
        # Release everything that cannot be the beginning of a stop sequence.
        for i in range(len(self.pending)):
            tail = self.pending[i:]
            if any(stop.startswith(tail) for stop in self.stops):
                out, self.pending = self.pending[:i], self.pending[i:]
                return out, False
        out, self.pending = self.pending, ""
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
