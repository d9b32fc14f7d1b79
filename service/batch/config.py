"""A batch-generation job's settings: each one a flag of `charstream generate`, declared here only.

Standard library and exports/ only, so the command line can build its flags without loading onnxruntime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from exports.cli import setting


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard i/N` as (i, N)."""
    i, slash, n = text.partition("/")
    if not slash or not i.isdigit() or not n.isdigit():
        raise ValueError(f"{text!r} is not i/N (e.g. 0/4)")
    return int(i), int(n)


@dataclass(frozen=True)
class GenerateConfig:
    """One job's settings; each field is a flag of `charstream generate` (`top_k` is `--top-k`)."""

    model: Path = field(metadata={"help": "an exported model folder or .onnx file", "positional": True})
    n: int = field(metadata={"help": "samples to write"})
    variant: str = setting("fp32", "the file of a model folder: fp32, int8 or fp16")
    prompt: str = setting("", "text every sample continues (default: a line start)")
    temperature: float = setting(1.0, "divides the logits before sampling")
    top_k: int = setting(0, "sample among the k likeliest characters; 0: off")
    top_p: float = setting(1.0, "sample among the likeliest characters holding this much probability; 1: off")
    min_p: float = setting(0.0, "drop characters under min-p times the likeliest; 0: off")
    seed: int = setting(0, "the same command and seed write the same samples")
    # Ends a sample and is cut from its text; it also cuts the --novel corpus into samples.
    until: str | None = setting(None, "a string that ends a sample, e.g. $'\\n' for one per line")
    stop: tuple[str, ...] = setting((), "another string that ends a sample (repeatable)", action="append")
    max_chars: int = setting(200, "a sample ends here without --until")
    unique: bool = setting(False, "never write the same text twice")
    novel: Path | None = field(
        default=None, metadata={"help": "reject samples that are samples of this corpus", "metavar": "CORPUS"}
    )
    out: Path | None = field(
        default=None, metadata={"help": "JSONL file (text, nll, finish_reason, sample); default stdout"}
    )
    resume: bool = setting(False, "continue the --out file of a killed run")
    # (i, N): this process runs attempts i, i + N, ...
    shard: tuple[int, int] = setting((0, 1), "this process's part of an N-way split", type=parse_shard, metavar="i/N")
    batch: int = setting(256, "samples stepped together")
    threads: int = setting(1, "onnxruntime intra-op threads")
    max_attempts: int | None = setting(None, "give up after this many (default 10 x n)")
    # Structured outputs: (regex, choice, json or grammar; its source). One field, four flags: the CLI's.
    constraint: tuple[str, str] | None = field(default=None, metadata={"flag": False})

    def identity(self, sha256: str) -> dict[str, object]:
        """What must match for --resume to continue a file: the model's bytes and every sampling setting.

        n may grow (a resume that asks for more continues the same sequence); how the job is run
        (batch, threads, attempt bound) does not change which samples it writes."""
        ignored = ("out", "resume", "batch", "threads", "model", "n", "max_attempts")
        keep = {k: v for k, v in asdict(self).items() if k not in ignored}
        keep["novel"] = None if self.novel is None else str(self.novel)
        keep["stop"] = list(self.stop)
        keep["shard"] = list(self.shard)
        keep["constraint"] = None if self.constraint is None else list(self.constraint)
        return {"model_sha256": sha256, **keep}
