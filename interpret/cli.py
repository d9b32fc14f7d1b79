"""The interpretation side of `charstream`: cells (onnxruntime and numpy, no torch)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from exports.cli import Command, fail, int_value, run


def _cells(args: argparse.Namespace) -> int:
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
        return fail("cells", exc)
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


def _cells_flags(parser: argparse.ArgumentParser) -> Command:
    parser.add_argument("model", help="an exported model folder or .onnx file")
    parser.add_argument("--data", nargs="+", required=True, help="file(s) or a folder of UTF-8 text to read")
    parser.add_argument("--out", default=None, help="report folder (default runs/cells/MODEL)")
    parser.add_argument(
        "--max-chars", type=int_value, default=50_000, help="characters to read (default: the last 50,000)"
    )
    parser.add_argument("--offset", type=int_value, default=None, help="start here rather than at the last --max-chars")
    parser.add_argument("--features", default=None, help="comma list (default: all)")
    parser.add_argument("--top", type=int_value, default=5, help="units kept per feature")
    parser.add_argument("--no-images", action="store_true", help="skip the PNG images")
    parser.add_argument("--no-model-copy", action="store_true", help="do not write cells.json next to the model")
    return _cells


COMMANDS = {"cells": _cells_flags}


def main(command: str, argv: Sequence[str], description: str) -> int:
    parser = argparse.ArgumentParser(prog=f"charstream {command}", description=description)
    func = COMMANDS[command](parser)
    return run(command, func, parser.parse_args(argv), ())
