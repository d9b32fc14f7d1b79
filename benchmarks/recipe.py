"""A small regularisation sweep for the bundled model's recipe, each run on the same wall-clock budget.

Every configuration trains the bundled 2x512 LSTM on tiny-shakespeare for `--minutes` with the
learning rate decaying over that time (`--max-minutes` alone), and reports its best validation
loss. Short budgets favour weak regularisation (there is no time to overfit), so read the table
as "which recipes learn as fast", and the full-length run for which generalises best.

    flock /tmp/charstream-cpu.lock python -m benchmarks.recipe --minutes 5
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import table, write_results
from training.config import TrainConfig
from training.train import train

REPO = Path(__file__).resolve().parents[1]
BASE: dict[str, Any] = dict(
    cell="lstm",
    layers=2,
    hidden=512,
    embedding=64,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--data", default=str(REPO / "data" / "tinyshakespeare.txt"))
    args = parser.parse_args()
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
