"""The training side of `charstream`: train, sample, eval and export (torch).

`charstream_cli` imports this module only when one of these sub-commands runs, so a serving
install never needs torch, and a training install never needs the service.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from exports.cli import Command, add_flags, config_from, int_value, run
from training.errors import UserError


def _is_main_process() -> bool:
    """False in the other processes of a torchrun launch, which train but do not report."""
    return os.environ.get("RANK", "0") == "0"


def _train(args: argparse.Namespace) -> int:
    from training.config import TrainConfig
    from training.train import train

    result = train(config_from(TrainConfig, args))
    if _is_main_process():
        print(
            f"trained {result.step} steps in {result.seconds:.0f}s ({result.chars_per_s:,.0f} chars/s); "
            f"best val loss {result.best_val_loss:.4f} nats/char -> {result.out / 'best.pt'}"
        )
    return 0


def _sample(args: argparse.Namespace) -> int:
    from training.checkpoint import load_model
    from training.sample import generate

    model, vocab, _ = load_model(args.checkpoint)
    text = generate(model, vocab, args.prime, args.length, args.temperature, args.top_k, args.seed)
    sys.stdout.write(args.prime + text + "\n")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from training.checkpoint import load_model
    from training.corpus import read_corpus
    from training.evaluate import LN2, evaluate_loss

    model, vocab, ckpt = load_model(args.checkpoint)
    corpus = read_corpus(args.data)
    if args.split == "val":
        fraction = args.val_fraction or ckpt.get("corpus", {}).get("val_fraction", 0.1)
        _, text = corpus.split(fraction)
    else:
        text = corpus.text
    if len(text) < 2:
        raise UserError("evaluation text needs at least 2 characters")
    ids = torch.tensor(vocab.encode(text), dtype=torch.long)
    loss = evaluate_loss(model, ids, progress=sys.stderr.isatty())  # all of the text, always
    print(f"{args.split} loss: {loss:.4f} nats/char  {loss / LN2:.4f} bits/char  ({len(text):,} chars)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.export import export_many

    export_many(args.checkpoints, args.out, args.variants, args.ort, names=args.name, data=args.data)
    return 0


def _train_flags(parser: argparse.ArgumentParser) -> Command:
    from training.config import TrainConfig

    add_flags(parser, TrainConfig)
    return _train


def _sample_flags(parser: argparse.ArgumentParser) -> Command:
    parser.add_argument("checkpoint")
    parser.add_argument("--prime", default="\n")
    parser.add_argument("--length", type=int_value, default=500)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int_value, default=None)
    parser.add_argument("--seed", type=int_value, default=None)
    return _sample


def _eval_flags(parser: argparse.ArgumentParser) -> Command:
    parser.add_argument("checkpoint")
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--split", choices=("val", "all"), default="val")
    parser.add_argument("--val-fraction", type=float, default=None)
    return _eval


def _export_flags(parser: argparse.ArgumentParser) -> Command:
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", required=True, help="folder that receives one folder per model")
    parser.add_argument("--variants", default="fp32,int8", help="comma list of fp32, int8, fp16")
    parser.add_argument("--ort", action="store_true", help="also write .ort files for mobile builds")
    parser.add_argument("--data", nargs="+", default=None, help="corpus whose validation split measures each variant")
    parser.add_argument("--name", action="append", default=None, help="model folder name (one per checkpoint)")
    return _export


COMMANDS = {"train": _train_flags, "sample": _sample_flags, "eval": _eval_flags, "export": _export_flags}


def main(command: str, argv: Sequence[str], description: str) -> int:
    parser = argparse.ArgumentParser(prog=f"charstream {command}", description=description)
    func = COMMANDS[command](parser)
    return run(command, func, parser.parse_args(argv), (UserError,))
