"""Training throughput (chars/s) in fp32 and under bf16 autocast, 2x512 and 2x1024 LSTM, on this CPU,
and beside them what `--precision auto` chooses for each shape (measured afresh, as a first run does).

Each configuration starts from the same seed on the same windows of tiny-shakespeare, runs a few
warm-up steps, then times full optimizer steps (forward and loss under the precision's autocast,
backward, clip, AdamW on fp32 weights) at batch 64 x seq 128, as the training loop does. The mean
training loss of the timed steps shows that both precisions learn alike step for step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.nn import functional as F

from benchmarks.common import table, write_results
from training.batching import LaneBatcher
from training.calibrate import calibrate
from training.corpus import Vocabulary, read_corpus
from training.model import CharRNN, ModelConfig
from training.precision import cpu_bf16_flags, resolve

CORPUS = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"


def measure(
    batcher: LaneBatcher, vocab_size: int, cell: str, hidden: int, precision: str, warmup: int, steps: int
) -> tuple[float, float]:
    """chars/s and mean training loss over `steps` timed optimizer steps."""
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=vocab_size, cell=cell, num_layers=2, hidden_size=hidden))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    mixed = resolve(precision, torch.device("cpu"))
    state = model.init_state(batcher.batch_size)
    windows = batcher.epoch()
    losses = []

    def one_step() -> None:
        nonlocal state
        x, y = next(windows)
        with mixed.autocast():
            logits, state = model(x, state)
            loss = F.cross_entropy(logits.reshape(-1, vocab_size).float(), y.reshape(-1))
        state = tuple(s.detach().float() for s in state)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())

    for _ in range(warmup):
        one_step()
    losses.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    seconds = time.perf_counter() - t0
    return steps * batcher.batch_size * batcher.seq_len / seconds, sum(losses) / len(losses)


def auto_choice(vocab_size: int, cell: str, hidden: int, batch: int, seq: int) -> dict[str, object]:
    """What `--precision auto` picks for this shape, measured as a run would (never from the cache)."""
    model = CharRNN(ModelConfig(vocab_size=vocab_size, cell=cell, num_layers=2, hidden_size=hidden))
    with tempfile.TemporaryDirectory() as fresh, env_set("CHARSTREAM_CACHE_DIR", fresh):
        result = calibrate(model, cell, vocab_size, torch.device("cpu"), batch, seq)
    return {
        "hidden": hidden,
        "chosen": result.chosen,
        "seconds_per_step": result.seconds_per_step,
        "reason": result.reason(),
    }


@contextlib.contextmanager
def env_set(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--cell", default="lstm")
    parser.add_argument("--hidden", default="512,1024", help="comma list of hidden sizes (2 layers each)")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16")
    args = parser.parse_args()
    corpus = read_corpus([CORPUS])
    vocab = Vocabulary.from_text(corpus.text)
    batcher = LaneBatcher(torch.tensor(vocab.encode(corpus.text)), args.batch, args.seq)
    rows = []
    choices: list[dict[str, object]] = []
    for hidden in (int(h) for h in args.hidden.split(",")):
        base = None
        for precision in args.precisions.split(","):
            cps, loss = measure(batcher, len(vocab), args.cell, hidden, precision, args.warmup, args.steps)
            base = base or cps
            rows.append(
                {
                    "cell": args.cell,
                    "layers": 2,
                    "hidden": hidden,
                    "precision": precision,
                    "chars_per_s": round(cps),
                    "ms_per_step": round(1000 * args.batch * args.seq / cps),
                    "speedup": round(cps / base, 2),
                    "mean_train_loss": round(loss, 4),
                }
            )
        choices.append(auto_choice(len(vocab), args.cell, hidden, args.batch, args.seq))
    flags = cpu_bf16_flags()
    print(
        f"training throughput, batch {args.batch} x seq {args.seq}, {torch.get_num_threads()} threads, "
        f"{args.warmup} warm-up + {args.steps} timed steps each; native bf16: {', '.join(flags) or 'none'}"
    )
    headers = ["cell", "layers", "hidden", "precision", "chars/s", "ms/step", "speedup", "mean train loss"]
    print(table(headers, [list(r.values()) for r in rows]))
    for choice in choices:
        print(f"2x{choice['hidden']}: --precision auto chose {choice['chosen']} ({choice['reason']})")
    payload = {
        "batch": args.batch,
        "seq": args.seq,
        "threads": torch.get_num_threads(),
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "cpu_bf16_flags": flags,
        "rows": rows,
        "auto": choices,
    }
    path = write_results("train_speed", payload)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
