"""One batch-generation job: settings checked, samples kept or rejected in order, JSONL written, resumable.

Attempts are numbered 0, 1, 2, ... and attempt k samples with the RNG seeded by (seed, k). Shard i
of N runs attempts i, i + N, i + 2N, ..., so shards never share a seed. Attempts finish out of
order in the batch, but they are judged and written in their own order: the samples are the first
n attempts that pass `--unique` and `--novel`, whatever the batch size, and the output file is
always a prefix of that sequence. `--resume` reads the file back (a line cut short by a kill is
dropped), takes its texts as already seen and continues after its last attempt: nothing is written
twice and nothing is lost.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from exports import contract
from exports.sampling import InvalidSampling, Sampling
from service.batch.config import GenerateConfig
from service.batch.constrained import ConstraintRefused
from service.batch.loop import SampleSpec, StepLoop
from service.batch.novelty import NoveltyIndex
from service.core.engine import Engine
from service.core.sampling import ConstraintSpec

KINDS = ("regex", "choice", "json", "grammar")  # structured outputs, named as the service names them

# What a sample starts from when there is no prompt: the start of a line, as the service does.
DEFAULT_START = "\n"
RUN_SUFFIX = ".run.json"  # beside the output: the settings a --resume must match


class BatchError(ValueError):
    """A setting or file the job cannot run with; the message names the flag."""


@dataclass
class Summary:
    samples: int = 0  # in the output, earlier runs' included
    resumed: int = 0  # of them, read back from an earlier run
    unique: int = 0  # distinct texts among the samples
    novel: int | None = None  # samples not in the --novel corpus (None without --novel)
    duplicates: int = 0  # rejected by --unique
    in_corpus: int = 0  # rejected by --novel
    invalid: int = 0  # rejected: the constraint could no longer be met
    attempts: int = 0  # attempts judged in this run
    chars: int = 0  # characters sampled in this run, rejected attempts included
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time over the same span (every thread)
    wanted: int = 0
    index: str = ""  # where the --novel index was read or built
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return self.duplicates + self.in_corpus + self.invalid

    @property
    def chars_per_s(self) -> float:
        return self.chars / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        novel = "" if self.novel is None else f", {self.novel:,} novel"
        resumed = f" ({self.resumed:,} from before)" if self.resumed else ""
        invalid = f", {self.invalid:,} invalid" if self.invalid else ""
        return (
            f"{self.samples:,} samples{resumed}, {self.unique:,} unique{novel}, {self.rejected:,} rejected "
            f"({self.duplicates:,} duplicate, {self.in_corpus:,} in corpus{invalid}); {self.chars:,} chars in "
            f"{self.seconds:.1f}s = {self.chars_per_s:,.0f} chars/s"
        )


def check(config: GenerateConfig) -> None:
    """Settings that are wrong whatever the model: one message naming the flag."""
    i, shards = config.shard
    rules = [
        (config.n >= 1, f"--n must be at least 1, got {config.n}"),
        (config.max_chars >= 1, f"--max-chars must be at least 1, got {config.max_chars}"),
        (config.until != "", "--until must not be empty"),
        (all(config.stop), "--stop must not be empty"),
        (shards >= 1 and 0 <= i < shards, f"--shard must be i/N with 0 <= i < N, got {i}/{shards}"),
        (1 <= config.batch <= 65_536, f"--batch must be in 1..65536, got {config.batch}"),
        (1 <= config.threads <= 256, f"--threads must be in 1..256, got {config.threads}"),
        (config.seed >= 0, f"--seed must be at least 0, got {config.seed}"),
        (config.max_attempts is None or config.max_attempts >= 1, "--max-attempts must be at least 1"),
        (not config.resume or config.out is not None, "--resume needs --out: the file to continue"),
        (config.variant in contract.VARIANT_FILES, f"--variant must be one of {', '.join(contract.VARIANTS)}"),
        (config.novel is None or config.novel.is_file(), f"--novel: {config.novel} is not a file"),
        (config.constraint is None or config.constraint[0] in KINDS, f"constraint kind must be one of {KINDS}"),
    ]
    for ok, message in rules:
        if not ok:
            raise BatchError(message)
    sampling_of(config)


def sampling_of(config: GenerateConfig) -> Sampling:
    """The job's sampler, its bounds refused in the flags' names."""
    try:
        return Sampling(config.temperature, config.top_k, config.top_p, config.min_p)
    except InvalidSampling as exc:
        raise BatchError(f"--{exc}".replace(exc.field, exc.field.replace("_", "-"), 1)) from None


def shard_share(n: int, shard: tuple[int, int]) -> int:
    """How many of the job's n samples shard i of N writes: n split as evenly as it goes."""
    i, shards = shard
    return n // shards + (1 if i < n % shards else 0)


def generate(
    config: GenerateConfig,
    on_sample: Callable[[Summary], None] | None = None,
    stdout: IO[str] | None = None,
) -> Summary:
    """Run the job to its n samples (or its attempt bound) and return what it did."""
    check(config)
    engine, path = _open_engine(config)
    summary = Summary(wanted=shard_share(config.n, config.shard))
    seen: set[str] = set()
    start = 0
    if config.out is not None:
        start = _prepare_output(config, config.identity(contract.file_sha256(path)), seen, summary)
    index = None
    if config.novel is not None:
        index = NoveltyIndex.open(config.novel, config.until or "\n", path.parent)
        summary.index = f"{index.path or 'kept in memory (model folder not writable)'}, {index.size:,} samples"
        summary.novel = summary.samples  # what was written passed --novel
    if summary.samples >= summary.wanted:
        return summary

    i, shards = config.shard
    batch = min(config.batch, summary.wanted - summary.samples)
    loop = _step_loop(config, engine, batch)
    limit = config.max_attempts if config.max_attempts is not None else 10 * summary.wanted
    attempts: Iterator[int] = (j * shards + i for j in itertools.islice(itertools.count(start), limit))
    vocab = np.array(engine.info.vocab)
    pending: dict[int, tuple[str, float, str]] = {}
    following = start * shards + i  # the next attempt to judge, in order
    sink = config.out.open("a", encoding="utf-8") if config.out is not None else None
    judge = _Judge(config, summary, seen, index, sink or stdout or sys.stdout)
    began, began_cpu = time.perf_counter(), time.process_time()
    try:
        for done in loop.run(attempts, config.seed):
            summary.chars += done.drawn
            pending[done.attempt] = ("".join(vocab[done.ids].tolist()), done.nll, done.finish_reason)
            while following in pending:
                judge(following, *pending.pop(following))
                following += shards
                if on_sample is not None:
                    on_sample(summary)
                if summary.samples >= summary.wanted:
                    return summary
    finally:
        summary.seconds = time.perf_counter() - began
        summary.cpu_seconds = time.process_time() - began_cpu
        summary.extra = {"steps": loop.steps, "batch": batch}
        if sink is not None:
            sink.close()
    return summary


def _open_engine(config: GenerateConfig) -> tuple[Engine, Path]:
    """The model's engine and file, with a damaged or missing one reported against MODEL."""
    try:
        path = contract.model_file(config.model, config.variant)
    except contract.ContractError as exc:
        raise BatchError(f"MODEL: {exc}".replace("(variant ", "(--variant ")) from None
    try:
        return Engine(path, config.threads), path
    except Exception as exc:  # onnxruntime's own classes for a damaged file; a contract error
        raise BatchError(f"MODEL: cannot load {path}: {str(exc).strip().splitlines()[0]}") from None


def _step_loop(config: GenerateConfig, engine: Engine, batch: int) -> StepLoop:
    """The batch's step loop: the prompt, the ends and the constraint checked against the model."""
    info = engine.info
    prompt = _encode(info, config.prompt or DEFAULT_START, "--prompt")
    terminators = tuple(tuple(_encode(info, t, "--until" if t == config.until else "--stop")) for t in _ends(config))
    if config.top_k > info.vocab_size:
        raise BatchError(f"--top-k is {config.top_k}; the model has {info.vocab_size} characters")
    spec = SampleSpec(
        sampling=sampling_of(config),
        terminators=terminators,
        max_chars=config.max_chars,
        constraint=None if config.constraint is None else ConstraintSpec(*config.constraint),
    )
    try:
        return StepLoop(engine, prompt, spec, batch)
    except ConstraintRefused as exc:
        assert config.constraint is not None
        raise BatchError(f"--{config.constraint[0]} cannot be used with this model: {exc}") from None


@dataclass
class _Judge:
    """Keeps or rejects each attempt, in attempt order, and writes the kept ones as JSONL."""

    config: GenerateConfig
    summary: Summary
    seen: set[str]
    index: NoveltyIndex | None
    out: IO[str]

    def __call__(self, attempt: int, text: str, nll: float, reason: str) -> None:
        summary = self.summary
        summary.attempts += 1
        if reason == "invalid":
            summary.invalid += 1
        elif self.config.unique and text in self.seen:
            summary.duplicates += 1
        elif self.index is not None and text in self.index:
            summary.in_corpus += 1
        else:
            record = {"text": text, "nll": round(nll, 4), "finish_reason": reason, "sample": attempt}
            self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.out.flush()  # a kill loses at most the line being written, which --resume drops
            summary.samples += 1
            summary.unique += text not in self.seen
            self.seen.add(text)
            if summary.novel is not None:
                summary.novel += 1


def _ends(config: GenerateConfig) -> list[str]:
    return ([config.until] if config.until else []) + list(config.stop)


def _encode(info: contract.ModelInfo, text: str, flag: str) -> list[int]:
    index = info.vocab_index
    missing = sorted({ch for ch in text if ch not in index})
    if missing:
        shown = ", ".join(repr(ch) for ch in missing[:10])
        raise BatchError(f"{flag} has {len(missing)} character(s) outside the model's vocabulary: {shown}")
    return [index[ch] for ch in text]


def _prepare_output(config: GenerateConfig, identity: dict[str, object], seen: set[str], summary: Summary) -> int:
    """Check (or start) the output file; on --resume read it back. The first attempt left to run."""
    assert config.out is not None
    out = config.out
    run_file = out.with_name(out.name + RUN_SUFFIX)
    has_lines = out.exists() and out.stat().st_size > 0
    if has_lines and not config.resume:
        raise BatchError(f"--out: {out} exists; pass --resume to continue it, or remove it")
    if has_lines:
        if not run_file.exists():
            raise BatchError(f"--resume: {run_file} is missing, so {out} cannot be continued")
        before = json.loads(run_file.read_text(encoding="utf-8"))
        changed = sorted(k for k in identity.keys() | before.keys() if identity.get(k) != before.get(k))
        if changed:
            raise BatchError(f"--resume: {out} was made with other settings (changed: {', '.join(changed)})")
        return _read_back(out, config.shard, seen, summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("", encoding="utf-8")
    run_file.write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
    return 0


def _read_back(out: Path, shard: tuple[int, int], seen: set[str], summary: Summary) -> int:
    """Read the samples a killed run wrote; drop a last line cut short. The first attempt after them."""
    data = out.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with out.open("r+b") as f:
            f.truncate(len(whole))
    last = -1
    for n, line in enumerate(whole.decode("utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            text, attempt = record["text"], int(record["sample"])
        except (ValueError, KeyError, TypeError):
            raise BatchError(f"--resume: line {n} of {out} is not a sample this command wrote") from None
        summary.samples += 1
        summary.unique += text not in seen
        seen.add(text)
        last = max(last, attempt)
    summary.resumed = summary.samples
    i, shards = shard
    return 0 if last < 0 else (last - i) // shards + 1
