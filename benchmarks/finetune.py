"""Fine-tuning the bundled model vs training the same architecture from scratch, on a small corpus, for equal minutes.

The default corpus is two licence texts every Debian system ships (GPL-3 and LGPL-2.1, about
62 KB of English with digits, brackets and other characters tiny-shakespeare lacks). Both runs
train for `--minutes` with the learning rate decaying over the time and validate once at the
end on the whole held-out 10%; the table also shows the prior's loss on that split before any
step (its new characters at their initial rows).

    flock /tmp/charstream-cpu.lock python -m benchmarks.finetune --minutes 1
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import table, write_results
from training.config import TrainConfig
from training.corpus import read_corpus
from training.evaluate import evaluate_loss
from training.prior import extend, load_prior, vocabulary
from training.train import train

REPO = Path(__file__).resolve().parents[1]
LICENCES = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/LGPL-2.1"]


def prior_loss(prior_path: str, data: list[str]) -> tuple[float, list[str]]:
    """The prior's validation loss on the new corpus before any fine-tuning, and the characters it lacked."""
    prior = load_prior(prior_path)
    corpus = read_corpus(data)
    model, new_chars = extend(prior, corpus.text, 0.0, 0.0)
    vocab = vocabulary(prior, new_chars)
    _, val = corpus.split(0.1)
    return evaluate_loss(model.eval(), torch.tensor(vocab.encode(val))), new_chars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=1.0, help="wall-clock budget of each run")
    parser.add_argument("--data", nargs="+", default=LICENCES)
    parser.add_argument("--prior", default=str(REPO / "exports" / "shakespeare-lstm"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    zero_shot, new_chars = prior_loss(args.prior, args.data)
    common: dict[str, Any] = dict(
        data=args.data,
        seq_len=args.seq,
        batch_size=args.batch,
        max_minutes=args.minutes,
        warmup_steps=10,
        dropout=0.1,
        eval_interval=1_000_000,  # validate once, at the end, on the whole split
        precision=args.precision,
        progress=False,
        seed=1337,
    )
    prior = load_prior(args.prior).config
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "fine-tuned from the bundled model": dict(init_from=args.prior),
            "from scratch, same architecture": dict(
                cell=prior.cell,
                num_layers=prior.num_layers,
                hidden_size=prior.hidden_size,
                embedding_size=prior.embedding_size,
            ),
        }
        for name, extra in runs.items():
            cfg = TrainConfig(out=str(Path(tmp) / name.split()[0]), **common, **extra)
            result = train(cfg)
            rows.append(
                {
                    "start": name,
                    "peak_lr": cfg.peak_lr,
                    "minutes": round(result.seconds / 60, 2),
                    "steps": result.step,
                    "chars_per_s": round(result.chars_per_s),
                    "val_loss": round(result.last_val_loss, 4),
                }
            )
    corpus = read_corpus(args.data)
    print(
        f"{corpus.name}: {len(corpus.text):,} chars, {len(new_chars)} characters the prior lacks; "
        f"the prior before any step: val loss {zero_shot:.4f}"
    )
    headers = ["start", "peak lr", "minutes", "steps", "chars/s", "val loss (whole split)"]
    print(table(headers, [list(r.values()) for r in rows]))
    payload = {
        "corpus": [str(p) for p in args.data],
        "corpus_chars": len(corpus.text),
        "new_chars": new_chars,
        "prior": args.prior,
        "prior_val_loss_before_training": round(zero_shot, 4),
        "minutes_each": args.minutes,
        "batch": args.batch,
        "seq": args.seq,
        "precision": args.precision,
        "rows": rows,
    }
    path = write_results("finetune", payload)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
