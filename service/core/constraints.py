"""Structured outputs: a constraint compiled to a mask over the next character, with llguidance.

A character vocabulary makes a constraint exact: each character is one "token" whose bytes are
its UTF-8 encoding, plus one synthetic end token that the constraint allows once the text is
complete. `ConstraintCompiler` compiles a `ConstraintSpec` (regex, choice, JSON Schema or Lark
grammar) once per model and keeps the compiled matcher in an LRU cache; each job gets a copy, a
`CharMatcher`, that says which characters may come next and consumes the one sampled.

Compiling is bounded: llguidance's parser limits cap the lexer's work and size (a pathological
pattern fails with its message), and a probe walks a few characters to measure the cost of a
mask: a constraint whose mask takes longer than `STEP_BUDGET_S` would slow every stream in the
batch, and is refused. A constraint that allows no first character, or only the empty text, is
refused too. Refusals are cached like compiled constraints, so a bad one costs its compile once.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import llguidance
import numpy as np
from llguidance._tokenizer import TokenizerWrapper

from service.core.sampling import ConstraintSpec

KINDS = ("regex", "choice", "json", "grammar")
COMPILED_KEPT = 256  # compiled constraints kept per model (each a few kB to a few MB of lexer states)
# llguidance's own limits, lowered for a server that compiles what clients send: the lexer's
# fuel bounds the time spent building a regex (~50k units per ms: about 20 ms here) and its
# states the memory (1-2 kB each: at most ~40 MB).
LIMITS = dict(
    initial_lexer_fuel=1_000_000,
    step_lexer_fuel=200_000,
    max_lexer_states=20_000,
    max_grammar_size=50_000,
    verbose_errors=False,  # the message goes to the client: no parser dump
)
# Probes of this many walks of this many characters after compiling; a mask slower than the budget is refused (for
# scale: a mask of a regex or JSON Schema takes 5-50 us here, one step of 64 streams ~3 ms).
PROBE_CHARS = 16
PROBE_WALKS = 8
STEP_BUDGET_S = 0.01


class ConstraintError(Exception):
    """The constraint does not compile, or no text of this vocabulary can meet it."""


class _CharTokens:
    """The character vocabulary as llguidance's TokenizerWrapper reads it: one token per character."""

    def __init__(self, vocab: Sequence[str]) -> None:
        self.tokens = [c.encode("utf-8") for c in vocab] + [b"<end>"]
        self.eos_token_id = len(vocab)
        self.bos_token_id = None
        self.special_token_ids = [len(vocab)]
        self._index = {c.encode("utf-8"): i for i, c in enumerate(vocab)}
        self._longest = max((len(t) for t in self._index), default=1)

    def __call__(self, text: bytes) -> list[int]:
        """Ids by longest match over the characters' UTF-8 bytes (a character such as "é" is 2 bytes, "漢" 3).

        llguidance tokenizes only to read literal text; a byte no character starts with has no id."""
        ids: list[int] = []
        at = 0
        while at < len(text):
            for size in range(min(self._longest, len(text) - at), 0, -1):
                found = self._index.get(text[at : at + size])
                if found is not None:
                    ids.append(found)
                    at += size
                    break
            else:
                at += 1
        return ids


def grammar_of(spec: ConstraintSpec) -> str:
    """llguidance's grammar text for a spec; raises ConstraintError with the compiler's message."""
    try:
        if spec.kind == "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(spec.source))
        if spec.kind == "choice":
            return str(llguidance.grammar_from("choice", spec.source))
        if spec.kind == "json":
            return str(llguidance.LLMatcher.grammar_from_json_schema(spec.source))
        if spec.kind == "grammar":
            return str(llguidance.LLMatcher.grammar_from_lark(spec.source))
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise ConstraintError(str(exc)) from exc
    raise ConstraintError(f"unknown kind {spec.kind!r}; one of {', '.join(KINDS)}")


class CharMatcher:
    """One job's constraint: which characters may come next (`allowed`), whether the text is complete
    (it matches and nothing may follow) or at a dead end (nothing may follow and it does not match)."""

    __slots__ = ("allowed", "complete", "dead_end", "matcher")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.allowed = np.zeros(vocab_size, bool)  # (vocab,) characters the next step may sample
        self.complete = False
        self.dead_end = False
        self.refresh()

    def refresh(self) -> None:
        """Work out the next mask (after a character was consumed)."""
        bits = np.zeros((1, _words(self.allowed.shape[0])), np.int32)
        self.matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        self._read(_unpack(bits, self.allowed.shape[0])[0])

    def _read(self, allowed: np.ndarray) -> None:
        self.allowed = allowed
        if allowed.any() and not self.matcher.is_error():
            self.complete = self.dead_end = False
        else:  # rare: only at the end of a text, or a dead end
            accepting = self.matcher.is_accepting() and not self.matcher.is_error()
            self.complete, self.dead_end = accepting, not accepting

    def consume(self, char: int) -> None:
        self.matcher.consume_token(char)


def _words(vocab_size: int) -> int:
    return (vocab_size + 1 + 31) // 32  # the characters and the end token, 32 to a word


def _unpack(bits: np.ndarray, vocab_size: int) -> np.ndarray:
    """(rows, words) llguidance bitmasks -> (rows, vocab) booleans (the end token's bit dropped)."""
    return np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size].astype(bool)


def advance_all(matchers: list[CharMatcher], chars: list[int]) -> np.ndarray:
    """Consume each matcher's sampled character and work out its next mask, written into one array and
    unpacked at once; the masks, (rows, vocab).

    One thread: 64 rows of a regex take ~0.23 ms here, less than through llguidance's parallel
    executor (~0.34 ms), whose hand-over costs more than a 65-character mask."""
    if not matchers:
        return np.zeros((0, 0), bool)
    vocab = matchers[0].allowed.shape[0]
    words = _words(vocab)
    bits = np.zeros((len(matchers), words), np.int32)
    for i, (m, c) in enumerate(zip(matchers, chars, strict=True)):
        m.matcher.consume_token(c)
        m.matcher.unsafe_compute_mask_ptr(bits[i].ctypes.data, words * 4)
    allowed = _unpack(bits, vocab)
    some = np.asarray(allowed.any(axis=1))
    for i, m in enumerate(matchers):
        if some[i]:
            m.allowed, m.complete, m.dead_end = allowed[i], False, False
        else:
            m._read(allowed[i])
    return allowed


class ConstraintCompiler:
    """One model's compiled constraints: an LRU cache of matchers, each copied for a job."""

    def __init__(self, vocab: Sequence[str], kept: int = COMPILED_KEPT) -> None:
        self.vocab = tuple(vocab)
        self.tokenizer = llguidance.LLTokenizer(TokenizerWrapper(_CharTokens(self.vocab)))
        self.limits = llguidance.LLParserLimits(**LIMITS)  # type: ignore[arg-type]
        self._kept = kept
        self._compiled: OrderedDict[ConstraintSpec, llguidance.LLMatcher | ConstraintError] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, spec: ConstraintSpec) -> CharMatcher:
        """A fresh matcher for one job; raises ConstraintError (with the compiler's message) before any step.

        Thread-safe: the service compiles off the event loop."""
        key = ConstraintSpec(spec.kind, spec.source)
        with self._lock:
            found = self._compiled.get(key)
            if found is not None:
                self._compiled.move_to_end(key)
        if found is None:
            try:
                found = self._compile(key)
            except ConstraintError as exc:
                found = exc
            with self._lock:
                self._compiled[key] = found
                while len(self._compiled) > self._kept:
                    self._compiled.popitem(last=False)
        if isinstance(found, ConstraintError):
            raise found
        return CharMatcher(found.deep_copy(), len(self.vocab))

    @property
    def cached(self) -> int:
        return len(self._compiled)

    def _compile(self, spec: ConstraintSpec) -> llguidance.LLMatcher:
        grammar = grammar_of(spec)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        if matcher.is_error():
            raise ConstraintError(_message(matcher.get_error()))
        first = CharMatcher(matcher.deep_copy(), len(self.vocab))
        if first.matcher.is_error():  # a limit hit, or no character can start a match
            error = _message(first.matcher.get_error())
            if "NoExtension" in error:
                error = f"no text of this model's characters can match it (the vocabulary lacks a character: {error})"
            raise ConstraintError(error)
        if not first.allowed.any():
            if first.matcher.is_accepting():
                raise ConstraintError("it matches only the empty text: there is nothing to generate")
            raise ConstraintError(
                "no text made of this model's characters can match it (the vocabulary lacks a character it needs)"
            )
        _probe(first, self.vocab)
        return matcher


def _probe(first: CharMatcher, vocab: tuple[str, ...]) -> None:
    """Walk a few short random paths (fixed seed) through the constraint: refuse it when a path reaches a
    character the vocabulary lacks, or when its masks are too slow to follow.

    The median of the mask times is compared, so that one slow step on a busy machine does not
    refuse a constraint that is cheap to follow. Walks find most dead ends, not all: a generation
    that reaches one anyway ends with an error."""
    rng = np.random.default_rng(0)
    took: list[float] = []
    for _ in range(PROBE_WALKS):
        walker = CharMatcher(first.matcher.deep_copy(), len(vocab))
        text = ""
        for _ in range(PROBE_CHARS):
            allowed = np.flatnonzero(walker.allowed)
            if not allowed.size:
                break
            char = int(rng.choice(allowed))
            walker.consume(char)
            text += vocab[char]
            t0 = time.perf_counter()
            walker.refresh()
            took.append(time.perf_counter() - t0)
            if walker.dead_end:
                why = _message(walker.matcher.get_error()) if walker.matcher.is_error() else "no continuation"
                raise ConstraintError(
                    f"no text of this model's characters can match it: after {text[-40:]!r} the vocabulary lacks "
                    f"a character it needs ({why})"
                )
    typical = float(np.median(took)) if took else 0.0
    if typical > STEP_BUDGET_S:
        raise ConstraintError(
            f"too costly to follow: a character's mask takes {typical * 1000:.0f} ms (the limit is "
            f"{STEP_BUDGET_S * 1000:.0f} ms); bound its repetitions"
        )


def _message(error: str) -> str:
    """llguidance's message without its debugging suffix."""
    return error.replace("<non-verbose/>", "").strip()
