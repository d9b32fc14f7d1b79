"""The step loop of batch generation: one onnxruntime call per character for a whole batch of samples.

Every row of the batch is one sample attempt. A row starts from the state after the prompt (less
its last character, which the row's first step reads) and samples with its own RNG, seeded by the
attempt's number alone, so an attempt's text does not depend on which row or batch it ran in. A
row that finishes (a terminator sampled, or the length reached) is handed back at once and takes
the next attempt in the same step: the batch stays full and the graph's shape never changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from exports.sampling import Sampling
from service.batch.constrained import RowConstraints
from service.core.engine import Engine, StepBinding
from service.core.sampling import BatchSampler, ConstraintSpec


@dataclass(frozen=True)
class SampleSpec:
    """The per-sample settings the loop needs: how to sample, terminators and a length bound."""

    sampling: Sampling = field(default_factory=Sampling)
    terminators: tuple[tuple[int, ...], ...] = ()  # id sequences that end a sample (not part of its text)
    max_chars: int = 200  # a sample that reaches this many characters without a terminator ends here
    constraint: ConstraintSpec | None = None  # structured outputs: what every sample's text must match


@dataclass(frozen=True)
class Finished:
    """One attempt's outcome: its number, its character ids (terminator cut), the model's nll of them."""

    attempt: int
    ids: np.ndarray
    nll: float  # nats: minus the model's own log-probability (no temperature) of every character drawn
    finish_reason: str  # "stop": a terminator, or the constraint's text complete; "length": max_chars reached;
    # "invalid": the constraint could no longer be met (a dead end)
    drawn: int  # characters sampled, the terminator included


# SplitMix64 (Steele, Lea and Flood 2014; Java's SplittableRandom): a counter hashed into 64 random bits.
GAMMA = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1
_GAMMA, _M1, _M2 = np.uint64(GAMMA), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def attempt_key(seed: int, attempt: int) -> int:
    """The stream of one attempt: the same whichever row, batch, run or shard draws it."""
    return _mix(((_mix((seed + GAMMA) & MASK) ^ attempt) + GAMMA) & MASK)


def uniforms(keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Draw number `positions` of each stream `keys` (uint64), uniform in [0, 1): SplitMix64 by counter.

    Counter-based, so a row's draws cost nothing to set up when it starts a new attempt (a seeded
    numpy Generator costs ~30 us, more than its sample's share of the steps at int8 speed).
    """
    z = keys + (positions.astype(np.uint64) + np.uint64(1)) * _GAMMA
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    z ^= z >> _S31
    out: np.ndarray = (z >> _S11) * (1.0 / (1 << 53))
    return out


class StepLoop:
    """Runs attempts through the model at a fixed batch size and yields each as it finishes."""

    def __init__(self, engine: Engine, prompt: list[int], spec: SampleSpec, batch: int) -> None:
        if not prompt:
            raise ValueError("the prompt needs at least one character")
        self.engine = engine
        self.spec = spec
        self.batch = batch
        info = engine.info
        self._last = prompt[-1]
        # The state before the prompt's last character: a fresh row reads that character in its first
        # step, which gives its first logits, so a row never needs a separate call to start.
        if len(prompt) > 1:
            _, self._start = engine.run(np.array([prompt[:-1]], np.int64), engine.zero_state(1))
        else:
            self._start = engine.zero_state(1)
        temperature = np.full(batch, spec.sampling.temperature)
        self._sampler = BatchSampler(
            temperature,
            np.full(batch, spec.sampling.top_k),
            np.full(batch, spec.sampling.top_p),
            info.vocab_size,
            min_p=np.full(batch, spec.sampling.min_p),
        )
        self._constraints = None
        if spec.constraint is not None:
            self._constraints = RowConstraints(spec.constraint, info.vocab, batch)
        self.steps = 0

    def run(self, attempts: Iterator[int], seed: int) -> Iterator[Finished]:
        """Attempts in, finished attempts out (in the order they finish), until `attempts` runs dry."""
        b = self.batch
        spec = self.spec
        binding = self.engine.binding(b)
        keys = np.zeros(b, np.uint64)  # each row's draw stream: its attempt's key
        rows = np.arange(b)
        attempt = np.full(b, -1, np.int64)  # the attempt each row runs; -1: idle (no attempts left)
        length = np.zeros(b, np.intp)
        nll = np.zeros(b)
        ids = np.zeros((b, spec.max_chars), np.int64)
        stops = [(np.array(t, np.int64), len(t)) for t in spec.terminators]
        for row in range(b):
            self._start_row(row, next(attempts, -1), binding, keys, attempt, length, nll, seed)
        tokens = binding.tokens[:, 0]
        idle = bool((attempt < 0).any())
        while not idle or (attempt >= 0).any():
            binding.run()
            binding.carry()
            self.steps += 1
            logits = binding.logits[:, 0, :]
            constraints = self._constraints
            drawn_from = logits if constraints is None else constraints.masked(logits)
            drawn = self._sampler.sample(drawn_from, uniforms(keys, length))
            # The model's own log-probability of the drawn character: logit minus log-sum-exp of the row.
            top = logits.max(axis=1)
            lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
            nll -= logits[rows, drawn] - lse
            ids[rows, length] = drawn
            length += 1
            cut = np.zeros(b, np.intp)  # characters of a terminator to cut from each finished row's text
            for stop, size in stops:
                hit = np.flatnonzero((drawn == stop[-1]) & (length >= size) & (cut == 0))
                if size > 1 and hit.size:
                    tails = ids[hit[:, None], length[hit, None] - size + np.arange(size)]
                    hit = hit[(tails == stop).all(axis=1)]
                cut[hit] = size
            stopped = cut > 0
            dead = np.zeros(b, bool)
            if constraints is not None:
                complete, dead = constraints.advance(drawn)
                stopped |= complete
            done = np.flatnonzero((stopped | dead | (length >= spec.max_chars)) & (attempt >= 0))
            tokens[:] = drawn
            if idle:
                length[attempt < 0] = 0  # an idle row's characters are never read
            for row in done.tolist():
                yield Finished(
                    int(attempt[row]),
                    ids[row, : length[row] - cut[row]].copy(),
                    float(nll[row]),
                    "stop" if stopped[row] else "invalid" if dead[row] else "length",
                    int(length[row]),
                )
                self._start_row(row, next(attempts, -1), binding, keys, attempt, length, nll, seed)
                idle = idle or bool(attempt[row] < 0)

    def _start_row(
        self,
        row: int,
        number: int,
        binding: StepBinding,
        keys: np.ndarray,
        attempt: np.ndarray,
        length: np.ndarray,
        nll: np.ndarray,
        seed: int,
    ) -> None:
        """Put attempt `number` in `row` (idle when it is -1): the prompt's state and its last character."""
        attempt[row] = number
        length[row] = 0
        nll[row] = 0.0
        for state, start in zip(binding.state_in, self._start, strict=True):
            state[:, row, :] = start[:, 0, :]
        binding.tokens[row, 0] = self._last
        if self._constraints is not None:
            self._constraints.start(row, number >= 0)
        keys[row] = attempt_key(seed, number) if number >= 0 else 0  # an idle row still steps; its draws are unused
