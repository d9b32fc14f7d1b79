"""The serving side of `charstream`: serve and generate (onnxruntime, never torch)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exports.cli import Command, add_flags, config_from, fail, int_value, run
from service.errors import ServiceConfigError


def _serve(args: argparse.Namespace) -> int:
    from service.server import serve

    return serve(models=args.models, host=args.host, port=args.port, workers=args.workers)


def _constraint(args: argparse.Namespace) -> tuple[str, str] | None:
    """generate's structured-output flag as (kind, source); `@FILE` reads --json and --grammar from a file."""

    def text(value: str) -> str:
        return Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value

    if args.regex is not None:
        return "regex", args.regex
    if args.choice:
        return "choice", json.dumps(args.choice)
    if args.json is not None:
        try:
            schema = json.loads(text(args.json))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--json is not a JSON Schema: {exc}") from None
        return "json", json.dumps(schema, sort_keys=True)
    if args.grammar is not None:
        return "grammar", text(args.grammar)
    return None


def _generate(args: argparse.Namespace) -> int:
    # The flags as a GenerateConfig, then the run and its one-line errors.
    from service.batch.config import GenerateConfig
    from service.batch.run import BatchError, Summary, generate

    try:
        constraint = _constraint(args)
    except (ValueError, OSError) as exc:
        return fail("generate", exc)
    config = config_from(GenerateConfig, args, constraint=constraint)
    bars: list[Any] = []  # the progress bar, opened by the first sample: a bad setting prints no bar

    def progress(summary: Summary) -> None:
        if not bars:
            from tqdm import tqdm

            bars.append(tqdm(total=summary.wanted, initial=summary.resumed, unit="sample", file=sys.stderr))
        bars[0].update(summary.samples - bars[0].n)

    try:
        summary = generate(config, on_sample=None if args.no_progress else progress)
    except (BatchError, OSError) as exc:
        return fail("generate", exc)
    finally:
        for bar in bars:
            bar.close()
    if summary.index:
        print(f"novelty index: {summary.index}", file=sys.stderr)
    print(summary.line(), file=sys.stderr)
    if summary.samples < summary.wanted:
        print(
            f"charstream generate: only {summary.samples:,} of {summary.wanted:,} samples after "
            f"{summary.attempts:,} attempts (raise --max-attempts)",
            file=sys.stderr,
        )
        return 1
    return 0


def _serve_flags(parser: argparse.ArgumentParser) -> Command:
    parser.add_argument("--models", default=None, help="folder of exported models")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int_value, default=None)
    parser.add_argument(
        "--workers", type=int_value, default=None, help="server processes on the port (needs a shared store)"
    )
    return _serve


def _generate_flags(parser: argparse.ArgumentParser) -> Command:
    from service.batch.config import GenerateConfig

    add_flags(parser, GenerateConfig)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--regex", default=None, help="every sample matches this regular expression")
    shape.add_argument("--choice", action="append", default=None, help="every sample is one of these (repeatable)")
    shape.add_argument("--json", default=None, help="every sample is JSON valid under this schema (or @FILE)")
    shape.add_argument("--grammar", default=None, help="every sample is a sentence of this Lark grammar (or @FILE)")
    return _generate


COMMANDS = {"serve": _serve_flags, "generate": _generate_flags}


def main(command: str, argv: Sequence[str], description: str) -> int:
    parser = argparse.ArgumentParser(prog=f"charstream {command}", description=description)
    func = COMMANDS[command](parser)
    return run(command, func, parser.parse_args(argv), (ServiceConfigError,))
