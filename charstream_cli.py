"""The `charstream` command: a dispatcher that imports one side, the one its sub-command belongs to.

training/cli.py owns train, sample, eval and export (torch); service/cli.py owns serve and
generate (onnxruntime); interpret/cli.py owns cells. A serving install runs `charstream serve`
without torch, a training install runs `charstream train` without the service, and a broken
import on one side leaves the other side's commands working. Bad input ends in one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each sub-command: the module that runs it (its side), what the side needs installed, its help line.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("training.cli", "train", "train a char model on UTF-8 text (under torchrun: on several processes)"),
    "sample": ("training.cli", "train", "sample text from a checkpoint"),
    "eval": ("training.cli", "train", "validation loss of a checkpoint in nats/char and bits/char"),
    "export": ("training.cli", "train", "export checkpoints to stateful ONNX graphs"),
    "cells": ("interpret.cli", "train", "rank a model's units by how well they track features of a text"),
    "serve": ("service.cli", "serve", "serve exported models over HTTP, SSE and WebSocket"),
    "generate": ("service.cli", "serve", "many samples from an exported model, written as JSONL (no torch)"),
}


def _overview() -> argparse.ArgumentParser:
    """`charstream --help` and the refusal of an unknown sub-command, with no side imported."""
    parser = argparse.ArgumentParser(prog="charstream", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, _, help) in COMMANDS.items():
        sub.add_parser(name, help=help, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        _overview().parse_args(args)  # prints the overview or the one-line refusal, and exits
        return 2
    command, rest = args[0], args[1:]
    module_name, extra, help = COMMANDS[command]
    try:
        side = importlib.import_module(module_name)
    except ImportError as exc:
        print(
            f"charstream {command}: error: this install cannot run it ({exc}); install the {extra!r} extra",
            file=sys.stderr,
        )
        return 2
    code: int = side.main(command, rest, help)
    return code


if __name__ == "__main__":
    sys.exit(main())
