"""Training throughput (chars/s) of 2x256 and 2x512 LSTM, GRU and vanilla RNN on this machine's CPU.

Each configuration runs a few warm-up steps, then times full optimizer steps
(forward, backward, clip, AdamW) at batch 64 x seq 128, as the training loop does.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

from benchmarks.common import table, write_results
from training.model import CharRNN, ModelConfig


def chars_per_second(cell: str, layers: int, hidden: int, batch: int, seq: int, steps: int) -> float:
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=65, cell=cell, num_layers=layers, hidden_size=hidden))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 65, (batch, seq))
    y = torch.randint(0, 65, (batch, seq))
    state = model.init_state(batch)

    def one_step() -> None:
        nonlocal state
        logits, state = model(x, state)
        state = tuple(s.detach() for s in state)
        loss = F.cross_entropy(logits.reshape(-1, 65), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(3):
        one_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    return steps * batch * seq / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    rows = []
    for cell in ("lstm", "gru", "rnn"):
        for hidden in (256, 512):
            cps = chars_per_second(cell, 2, hidden, args.batch, args.seq, args.steps)
            rows.append({"cell": cell, "layers": 2, "hidden": hidden, "chars_per_s": round(cps)})
    print(f"training throughput, batch {args.batch} x seq {args.seq}, {torch.get_num_threads()} threads")
    print(table(["cell", "layers", "hidden", "chars/s"], [list(r.values()) for r in rows]))
    path = write_results("train_speed", {"batch": args.batch, "seq": args.seq, "rows": rows})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
