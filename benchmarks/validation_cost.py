"""What one periodic validation costs with the bundled 2x512 LSTM: the whole split against the --eval-chars sample.

Reading a whole validation split costs time in proportion to its length: the script times
`--full-chars` characters of tiny-shakespeare read the old way (8 lanes, the whole text) and
scales that to a `--split-chars` split (default 5.8 million, the held-out 10% of a 58-million
character corpus); then it times the default --eval-chars sample (250,000 characters in 32
lanes spread over the text). `--train-s` is the training time between two validations (default:
250 steps of 64 x 128 characters of the 2x512 model measured on this CPU, 206 s) and gives the
fraction of a run spent validating, before and after.

    flock /tmp/charstream-cpu.lock python -m benchmarks.validation_cost
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import table, write_results
from training.config import EVAL_CHARS
from training.corpus import read_corpus
from training.evaluate import evaluate
from training.model import CharRNN
from training.prior import load_prior

REPO = Path(__file__).resolve().parents[1]


def timed(model: CharRNN, ids: torch.Tensor, max_chars: int | None) -> tuple[float, int]:
    t0 = time.perf_counter()
    _, chars = evaluate(model, ids, max_chars=max_chars)
    return time.perf_counter() - t0, chars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(REPO / "exports" / "shakespeare-lstm"))
    parser.add_argument("--full-chars", type=int, default=300_000, help="characters timed the old way")
    parser.add_argument("--split-chars", type=int, default=5_800_000, help="validation split to scale to")
    parser.add_argument("--train-s", type=float, default=206.0, help="training seconds between validations")
    args = parser.parse_args()
    prior = load_prior(args.model)
    model = CharRNN(prior.config)
    model.load_state_dict(prior.state)
    model.eval()
    corpus = read_corpus([REPO / "data" / "tinyshakespeare.txt"])
    ids = torch.tensor(prior.vocab.encode(corpus.text))
    full_s, full_chars = timed(model, ids[: args.full_chars + 1], None)
    sample_s, sample_chars = timed(model, ids, EVAL_CHARS)
    before_s = full_s * args.split_chars / full_chars
    rows = [
        {
            "validation": f"whole split, 8 lanes (scaled from {full_chars:,} chars)",
            "chars": args.split_chars,
            "seconds": round(before_s, 1),
            "chars_per_s": round(full_chars / full_s),
            "fraction_of_run": round(before_s / (before_s + args.train_s), 3),
        },
        {
            "validation": f"--eval-chars sample ({EVAL_CHARS:,}, 32 lanes)",
            "chars": sample_chars,
            "seconds": round(sample_s, 1),
            "chars_per_s": round(sample_chars / sample_s),
            "fraction_of_run": round(sample_s / (sample_s + args.train_s), 3),
        },
    ]
    print(
        f"one validation of {args.model} ({torch.get_num_threads()} threads, fp32), "
        f"against {args.train_s:g} s of training between validations"
    )
    print(table(["validation", "chars", "seconds", "chars/s", "fraction of run"], [list(r.values()) for r in rows]))
    path = write_results("validation_cost", {"split_chars": args.split_chars, "train_s": args.train_s, "rows": rows})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
