"""The `charstream` command: train, sample, eval, export (torch side), cells, serve and generate (onnxruntime side).

Each subcommand imports its side lazily, so `charstream serve` runs where torch is absent.
Bad input ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Sequence


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    return value


def _train(args: argparse.Namespace) -> int:
    from training.config import TrainConfig
    from training.train import train

    result = train(_config(TrainConfig, args))
    if _is_main_process():
        print(
            f"trained {result.step} steps in {result.seconds:.0f}s ({result.chars_per_s:,.0f} chars/s); "
            f"best val loss {result.best_val_loss:.4f} nats/char -> {result.out / 'best.pt'}"
        )
    return 0


def _add_flags(parser: argparse.ArgumentParser, config: type) -> None:
    """One flag per field of a config dataclass, in field order: `embedding_dropout` is `--embedding-dropout`.

    Type and default come from the field, help and any further argparse keywords from its metadata
    (`positional`: an argument, not a flag; `flag: False`: none, the command fills it itself).
    """
    types = typing.get_type_hints(config)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in dataclasses.fields(config):
        keywords = dict(f.metadata)
        if not keywords.pop("flag", True):
            continue
        target: argparse._ActionsContainer = parser
        if "exclusive" in keywords:
            name = keywords.pop("exclusive")
            if name not in groups:
                groups[name] = parser.add_mutually_exclusive_group()
            target = groups[name]
        positional = keywords.pop("positional", False)
        flag = f.name if positional else "--" + f.name.replace("_", "-")
        value_type = _value_type(types[f.name])
        if value_type is bool:
            off = f.default is True  # a setting that is on by default is a flag that turns it off
            flag = "--no-" + flag[2:] if off else flag
            keywords.update(dest=f.name, action="store_false" if off else "store_true")
        else:
            parse = keywords.get("type")
            keywords["type"] = _one_line_errors(parse) if parse else _int if value_type is int else value_type
            if f.default is dataclasses.MISSING:
                if not positional:  # an argument is required by being one
                    keywords["required"] = True
            else:
                # argparse's append adds to a copy of the default, which must be a list.
                keywords["default"] = list(f.default) if keywords.get("action") == "append" else f.default
        target.add_argument(flag, **keywords)


def _one_line_errors(parse: Callable[[str], object]) -> Callable[[str], object]:
    """A library's parser for a flag, its ValueError shown by argparse as the message it carries."""

    def checked(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return checked


def _value_type(annotation: object) -> type:
    """What argparse turns one value into: `float | None` -> float, `list[str]` (nargs) -> str."""
    inner = [a for a in typing.get_args(annotation) if a is not type(None)]
    found = inner[0] if inner else annotation
    assert isinstance(found, type), annotation
    return found


C = typing.TypeVar("C")


def _config(config: type[C], args: argparse.Namespace, **given: object) -> C:
    """The config dataclass from the parsed flags (a repeated flag's list as the field's tuple) and `given`."""
    values: dict[str, object] = {}
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        if f.name in given or not f.metadata.get("flag", True):
            continue
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) and f.metadata.get("action") == "append" else value
    return config(**values, **given)


def _is_main_process() -> bool:
    """False in the other processes of a torchrun launch, which train but do not report."""
    import os

    return os.environ.get("RANK", "0") == "0"


# The library names its settings as its dataclasses do; the command line has its own flags.
FLAGS = {"num_layers": "--layers", "hidden_size": "--hidden", "embedding_size": "--embedding"}


def _in_flags(exc: BaseException) -> str:
    """An error message with the library's setting names replaced by this command's flags."""
    import re

    message = str(exc)
    for name in getattr(exc, "settings", ()):
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?!\w)", flag, message)
    return message


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
        from training.errors import UserError

        raise UserError("evaluation text needs at least 2 characters")
    ids = torch.tensor(vocab.encode(text), dtype=torch.long)
    loss = evaluate_loss(model, ids, progress=sys.stderr.isatty())  # all of the text, always
    print(f"{args.split} loss: {loss:.4f} nats/char  {loss / LN2:.4f} bits/char  ({len(text):,} chars)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.export import export_many

    export_many(args.checkpoints, args.out, args.variants, args.ort, names=args.name, data=args.data)
    return 0


def _cells(args: argparse.Namespace) -> int:
    from pathlib import Path

    from interpret import write_report

    model = Path(args.model)
    out = Path(args.out) if args.out else Path("runs") / "cells" / (model.stem if model.is_file() else model.name)
    features = [f for f in args.features.split(",") if f] if args.features else None
    try:
        report = write_report(
            model,
            args.data,
            out,
            max_chars=args.max_chars,
            offset=args.offset,
            feature_names=features,
            top=args.top,
            images=not args.no_images,
            copy_to_model=not args.no_model_copy,
        )
    except (ValueError, OSError) as exc:
        print(f"charstream cells: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    for f in report["features"]:
        if "top" not in f:
            print(f"{f['name']:<14} not scored: {f['skipped']}")
            continue
        best = f["top"][0]
        score = f"AUC {best['score']:.3f}" if f["metric"] == "auc" else f"r {best['score']:+.3f}"
        print(
            f"{f['name']:<14} layer {best['layer']} {best['state']} unit {best['unit']:<5} "
            f"{score:<9} (strength {best['strength']:.3f})"
        )
    print(f"report: {out / 'report.json'}, {out / 'index.html'}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from service.server import serve

    return serve(models=args.models, host=args.host, port=args.port, workers=args.workers)


def _constraint(args: argparse.Namespace) -> tuple[str, str] | None:
    """generate's structured-output flag as (kind, source); `@FILE` reads --json and --grammar from a file."""
    import json
    from pathlib import Path

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
    from typing import Any

    from service.batch.config import GenerateConfig
    from service.batch.run import BatchError, Summary, generate

    try:
        constraint = _constraint(args)
    except (ValueError, OSError) as exc:
        print(f"charstream generate: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    config = _config(GenerateConfig, args, constraint=constraint)
    bars: list[Any] = []  # the progress bar, opened by the first sample: a bad setting prints no bar

    def progress(summary: Summary) -> None:
        if not bars:
            from tqdm import tqdm

            bars.append(tqdm(total=summary.wanted, initial=summary.resumed, unit="sample", file=sys.stderr))
        bars[0].update(summary.samples - bars[0].n)

    try:
        summary = generate(config, on_sample=None if args.no_progress else progress)
    except (BatchError, OSError) as exc:
        print(f"charstream generate: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
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


def build_parser() -> argparse.ArgumentParser:
    # Every sub-command's flags, declared once each in the order `--help` shows them (train's come from
    # TrainConfig): long, but a list, not logic.
    parser = argparse.ArgumentParser(prog="charstream", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from service.batch.config import GenerateConfig
    from training.config import TrainConfig

    t = sub.add_parser("train", help="train a char model on UTF-8 text (under torchrun: on several processes)")
    _add_flags(t, TrainConfig)
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="sample text from a checkpoint")
    s.add_argument("checkpoint")
    s.add_argument("--prime", default="\n")
    s.add_argument("--length", type=_int, default=500)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=_int, default=None)
    s.add_argument("--seed", type=_int, default=None)
    s.set_defaults(func=_sample)

    e = sub.add_parser("eval", help="validation loss of a checkpoint in nats/char and bits/char")
    e.add_argument("checkpoint")
    e.add_argument("--data", nargs="+", required=True)
    e.add_argument("--split", choices=("val", "all"), default="val")
    e.add_argument("--val-fraction", type=float, default=None)
    e.set_defaults(func=_eval)

    x = sub.add_parser("export", help="export checkpoints to stateful ONNX graphs")
    x.add_argument("checkpoints", nargs="+")
    x.add_argument("--out", required=True, help="folder that receives one folder per model")
    x.add_argument("--variants", default="fp32,int8", help="comma list of fp32, int8, fp16")
    x.add_argument("--ort", action="store_true", help="also write .ort files for mobile builds")
    x.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="corpus whose validation split measures each variant",
    )
    x.add_argument("--name", action="append", default=None, help="model folder name (one per checkpoint)")
    x.set_defaults(func=_export)

    c = sub.add_parser("cells", help="rank a model's units by how well they track features of a text")
    c.add_argument("model", help="an exported model folder or .onnx file")
    c.add_argument("--data", nargs="+", required=True, help="file(s) or a folder of UTF-8 text to read")
    c.add_argument("--out", default=None, help="report folder (default runs/cells/MODEL)")
    c.add_argument("--max-chars", type=_int, default=50_000, help="characters to read (default: the last 50,000)")
    c.add_argument("--offset", type=_int, default=None, help="start here rather than at the last --max-chars")
    c.add_argument("--features", default=None, help="comma list (default: all)")
    c.add_argument("--top", type=_int, default=5, help="units kept per feature")
    c.add_argument("--no-images", action="store_true", help="skip the PNG images")
    c.add_argument("--no-model-copy", action="store_true", help="do not write cells.json next to the model")
    c.set_defaults(func=_cells)

    v = sub.add_parser("serve", help="serve exported models over HTTP, SSE and WebSocket")
    v.add_argument("--models", default=None, help="folder of exported models")
    v.add_argument("--host", default=None)
    v.add_argument("--port", type=_int, default=None)
    v.add_argument("--workers", type=_int, default=None, help="server processes on the port (needs a shared store)")
    v.set_defaults(func=_serve)

    g = sub.add_parser("generate", help="many samples from an exported model, written as JSONL (no torch)")
    _add_flags(g, GenerateConfig)
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    shape = g.add_mutually_exclusive_group()
    shape.add_argument("--regex", default=None, help="every sample matches this regular expression")
    shape.add_argument("--choice", action="append", default=None, help="every sample is one of these (repeatable)")
    shape.add_argument("--json", default=None, help="every sample is JSON valid under this schema (or @FILE)")
    shape.add_argument("--grammar", default=None, help="every sample is a sentence of this Lark grammar (or @FILE)")
    g.set_defaults(func=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    user_errors: tuple[type[BaseException], ...] = ()
    try:
        from training.errors import UserError as TrainingUserError

        user_errors += (TrainingUserError,)
    except ImportError:
        pass
    try:
        from service.errors import ServiceConfigError

        user_errors += (ServiceConfigError,)
    except ImportError:
        pass
    try:
        return func(args)
    except user_errors as exc:
        print(f"charstream {args.command}: error: {_in_flags(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"charstream {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
