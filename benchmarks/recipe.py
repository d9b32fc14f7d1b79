"""A small regularisation sweep for the bundled model's recipe, each run on the same wall-clock budget.

Every configuration trains the bundled 2x512 LSTM on tiny-shakespeare for `--minutes` with the
learning rate decaying over that time (`--max-minutes` alone), and reports its best validation
loss. Short budgets favour weak regularisation (there is no time to overfit), so read the table
as "which recipes learn as fast", and the full-length run for which generalises best.

    flock /tmp/charstream-cpu.lock python -m benchmarks.recipe --minutes 5

Full-length runs are made with `charstream train`; `--curves` sets their validation curves
(the `metrics.jsonl` each run writes) against minutes and steps in one plot:

    python -m benchmarks.recipe --curves "dropout 0.25=docs/a.jsonl" "dropout 0.5=docs/b.jsonl" \\
        --plot docs/recipe-curves.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import save_figure, table, write_results
from training.config import TrainConfig
from training.train import train

REPO = Path(__file__).resolve().parents[1]
BASE: dict[str, Any] = dict(
    cell="lstm",
    num_layers=2,
    hidden_size=512,
    embedding_size=64,
    seq_len=128,
    batch_size=64,
    lr=3e-3,
    warmup_steps=100,
    min_lr_ratio=0.05,
    eval_interval=100,
    seed=1337,
)
CANDIDATES: dict[str, dict[str, Any]] = {
    "today (dropout 0.25, wd 0.01)": dict(dropout=0.25, weight_decay=0.01),
    "dropout 0.5, wd 0.1": dict(dropout=0.5, weight_decay=0.1),
    "dropout 0.5, emb 0.1, wd 0.1": dict(dropout=0.5, embedding_dropout=0.1, weight_decay=0.1),
}


def plot_curves(runs: dict[str, Path], path: Path) -> None:
    """Validation loss of each run against wall-clock minutes (left) and steps (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, metrics in runs.items():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        val = [r for r in rows if "val_loss" in r]
        best = min(r["val_loss"] for r in val)
        label = f"{name} (best {best:.4f})"
        by_time.plot([r["elapsed_s"] / 60 for r in val], [r["val_loss"] for r in val], marker="o", label=label)
        by_step.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", label=label)
    for ax, xlabel in ((by_time, "minutes"), (by_step, "step")):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    by_time.set_ylabel("validation loss (nats/char)")
    by_time.set_ylim(top=1.8)
    by_step.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--data", default=str(REPO / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--curves", nargs="+", metavar="NAME=METRICS", help="plot finished runs instead of training")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "recipe-curves.png")
    args = parser.parse_args()
    if args.curves:
        plot_curves({name: Path(path) for name, path in (c.split("=", 1) for c in args.curves)}, args.plot)
        print(f"plot: {args.plot}")
        return
    rows = []
    for name, settings in CANDIDATES.items():
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(data=[args.data], out=out, max_minutes=args.minutes, progress=False, **BASE, **settings)
            result = train(cfg)
        rows.append(
            {
                "recipe": name,
                "settings": settings,
                "steps": result.step,
                "best_val_loss": round(result.best_val_loss, 4),
                "chars_per_s": round(result.chars_per_s),
            }
        )
        print(f"{name}: best val {result.best_val_loss:.4f} after {result.step} steps", flush=True)
    print(f"recipe sweep: 2x512 LSTM, {args.minutes:g} min each, learning rate decayed over the time")
    print(
        table(
            ["recipe", "steps", "best val", "chars/s"],
            [[r["recipe"], r["steps"], r["best_val_loss"], r["chars_per_s"]] for r in rows],
        )
    )
    path = write_results("recipe", {"minutes": args.minutes, "base": BASE, "rows": rows})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
