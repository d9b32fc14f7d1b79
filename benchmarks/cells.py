"""Vanilla RNN vs GRU vs LSTM on tiny-shakespeare, on this CPU, and why the gates matter.

Every run trains for the same wall-clock budget (`--minutes`, the learning rate decaying over
it). Two groups share the LSTM 2x256:

- equal parameters: LSTM 2x256, and a GRU and an RNN widened to the same parameter count;
- equal state width: LSTM, GRU and RNN all 2x256 (the RNN is then the cheapest per step);

plus the LSTM with its forget-gate bias initialised to 1 (Jozefowicz et al. 2015).

Per run: best validation loss, validation loss at a step every run reached (equal data),
training chars/s, onnxruntime step latency at batch 1 and 64 (fp32, one thread, the service's
session options), file sizes (fp32, int8), and the norm of d loss_t / d h_{t-k} against k,
after training and at initialisation: the vanishing-gradient plot.

    flock /tmp/charstream-cpu.lock python -m benchmarks.cells --minutes 3
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from benchmarks.common import save_figure, table, write_results
from exports import contract
from training.checkpoint import load_model
from training.config import TrainConfig
from training.corpus import Vocabulary, read_corpus
from training.export import export_many
from training.export.graph import open_session
from training.export.measure import step_latency_us
from training.model import CharRNN, ModelConfig
from training.train import train

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
LAYERS, EMBEDDING, WIDTH = 2, 64, 256
K_MAX = 120  # how far back the gradient is followed
COLORS = {"rnn": "tab:red", "gru": "tab:green", "lstm": "tab:blue"}


@dataclass
class Run:
    name: str
    cell: str
    hidden: int
    group: str
    forget_bias: float | None = None
    result: dict[str, Any] = field(default_factory=dict)


def parameters(cell: str, hidden: int, vocab: int) -> int:
    return CharRNN(ModelConfig(vocab, cell, LAYERS, hidden, EMBEDDING)).num_parameters()


def width_for(cell: str, target: int, vocab: int) -> int:
    """The hidden size (a multiple of 8) whose parameter count is closest to `target`."""
    return min(range(8, 2049, 8), key=lambda h: abs(parameters(cell, h, vocab) - target))


def plan(vocab: int) -> list[Run]:
    target = parameters("lstm", WIDTH, vocab)
    return [
        Run("LSTM 2x256", "lstm", WIDTH, "both"),
        Run("LSTM 2x256, forget bias 1", "lstm", WIDTH, "forget bias", forget_bias=1.0),
        Run(f"GRU 2x{width_for('gru', target, vocab)}", "gru", width_for("gru", target, vocab), "equal parameters"),
        Run(f"RNN 2x{width_for('rnn', target, vocab)}", "rnn", width_for("rnn", target, vocab), "equal parameters"),
        Run("GRU 2x256", "gru", WIDTH, "equal width"),
        Run("RNN 2x256", "rnn", WIDTH, "equal width"),
    ]


def gradient_norms(model: CharRNN, ids: torch.Tensor, batch: int = 64, warmup: int = 64, seed: int = 0) -> list[float]:
    """Mean over `batch` positions of |d loss_t / d h_{t-k}| for k = 1..K_MAX (h: every layer's hidden state).

    The model reads `warmup` characters without a graph to reach a typical state, then K_MAX + 1
    characters one at a time, keeping each step's state in the graph; the loss is the
    cross-entropy of the last prediction. One backward pass gives the gradient at every k.
    """
    model.eval()  # no dropout: the gradient of the function itself
    g = torch.Generator().manual_seed(seed)
    length = warmup + K_MAX + 1
    starts = torch.randint(0, ids.numel() - length - 1, (batch,), generator=g)
    x = torch.stack([ids[s : s + length] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + length + 1] for s in starts.tolist()])
    with torch.no_grad():
        _, state = model(x[:, :warmup])
    states = []
    logits = torch.empty(0)
    for t in range(warmup, length):
        logits, state = model(x[:, t : t + 1], state)
        states.append(state[0])  # h after reading character t: (layers, batch, hidden)
    loss = F.cross_entropy(logits[:, -1], y[:, -1], reduction="sum")
    # states[-1] is the state after the last character; the last loss is read from the step before it.
    grads = torch.autograd.grad(loss, states[:-1])
    norms = []
    for k in range(1, K_MAX + 1):
        per_position = grads[-k].permute(1, 0, 2).reshape(batch, -1).norm(dim=1)
        norms.append(float(per_position.mean()))
    return norms


def measure_files(checkpoint: Path, name: str, data: Path, out: Path) -> dict[str, Any]:
    folder = export_many([str(checkpoint)], str(out), "fp32,int8", names=[name], data=[str(data)])[0]
    manifest = json.loads((folder / contract.MANIFEST_NAME).read_text())
    fp32, int8 = manifest["variants"]["fp32"], manifest["variants"]["int8"]
    session = open_session(folder / fp32["file"])
    cell, layers, hidden = manifest["cell"], manifest["num_layers"], manifest["hidden_size"]
    return {
        "ort_step_us_batch1": round(step_latency_us(session, cell, layers, hidden, batch=1), 1),
        "ort_step_us_batch64": round(step_latency_us(session, cell, layers, hidden, batch=64, runs=100), 1),
        "fp32_bytes": fp32["bytes"],
        "int8_bytes": int8["bytes"],
        "int8_val_loss_change": int8.get("val_loss_change"),
    }


def run_one(run: Run, data: Path, minutes: float, lr: float, seed: int, work: Path) -> None:
    out = work / run.name.replace(" ", "_").replace(",", "")
    cfg = TrainConfig(
        data=[str(data)],
        out=str(out),
        cell=run.cell,
        num_layers=LAYERS,
        hidden_size=run.hidden,
        embedding_size=EMBEDDING,
        dropout=0.1,
        forget_bias=run.forget_bias,
        lr=lr,
        warmup_steps=50,
        min_lr_ratio=0.05,
        max_minutes=minutes,
        eval_interval=100,
        seed=seed,
        progress=False,
    )
    result = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = sorted(r["chars_per_s"] for r in rows if "val_loss" not in r)
    model, _, ckpt = load_model(out / "best.pt")
    run.result = {
        "parameters": model.num_parameters(),
        "steps": result.step,
        "best_val_loss": round(result.best_val_loss, 4),
        "best_step": ckpt["step"],
        "curve": [[r["step"], r["elapsed_s"], r["val_loss"]] for r in rows if "val_loss" in r],
        "train_chars_per_s": round(speeds[len(speeds) // 2]) if speeds else round(result.chars_per_s),
    }
    run.result |= measure_files(out / "best.pt", out.name, data, work / "exports")
    ids = torch.tensor(Vocabulary.from_json(ckpt["vocab"]).encode(read_corpus([data]).split(0.1)[1]))
    run.result["grad_norms_trained"] = gradient_norms(model, ids)
    torch.manual_seed(seed)
    fresh = CharRNN(model.config)
    if run.forget_bias is not None:
        fresh.set_forget_bias(run.forget_bias)
    run.result["grad_norms_init"] = gradient_norms(fresh, ids)


def val_at(curve: list[list[float]], step: int) -> float | None:
    return next((v for s, _, v in curve if s == step), None)


def plot(runs: list[Run], path_grad: Path, path_curves: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = np.arange(1, K_MAX + 1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in (
        (axes[0], "grad_norms_init", "at initialisation"),
        (axes[1], "grad_norms_trained", "after training"),
    ):
        for run in runs:
            style = ":" if run.forget_bias is not None else ("--" if run.group == "equal width" else "-")
            ax.semilogy(ks, run.result[key], style, color=COLORS[run.cell], label=run.name)
        ax.set_title(f"|d loss_t / d h_(t-k)| {title}")
        ax.set_xlabel("k (characters back)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("gradient norm (mean over 64 positions)")
    axes[1].legend(fontsize=8)
    save_figure(fig, path_grad)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        curve = run.result["curve"]
        style = ":" if run.forget_bias is not None else ("--" if run.group == "equal width" else "-")
        ax.plot([c[1] / 60 for c in curve], [c[2] for c in curve], style, color=COLORS[run.cell], label=run.name)
    ax.set_xlabel("minutes")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_ylim(top=2.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path_curves)


def main() -> None:
    # One run read top to bottom (arguments, the runs side by side, the table, the results file):
    # its steps share the run's servers and numbers, so they stay in one function.
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget of every run")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "tinyshakespeare.txt")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--only", default=None, help="comma list of cells to run (a quick look)")
    args = parser.parse_args()
    vocab = len(set(args.data.read_text(encoding="utf-8")))
    runs = [r for r in plan(vocab) if args.only is None or r.cell in args.only.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            run_one(run, args.data, args.minutes, args.lr, args.seed, Path(tmp))
            print(f"{run.name}: best val {run.result['best_val_loss']} after {run.result['steps']} steps", flush=True)

    common_step = min(max(s for s, _, _ in r.result["curve"]) // 100 * 100 for r in runs)
    rows = []
    for run in runs:
        r = run.result
        g_t, g_0 = r["grad_norms_trained"], r["grad_norms_init"]
        rows.append(
            [
                run.name,
                run.group,
                f"{r['parameters'] / 1e6:.2f}M",
                r["steps"],
                r["best_val_loss"],
                val_at(r["curve"], common_step),
                r["train_chars_per_s"],
                r["ort_step_us_batch1"],
                r["ort_step_us_batch64"],
                f"{r['fp32_bytes'] / 1e6:.2f}",
                f"{r['int8_bytes'] / 1e6:.2f}",
                f"{g_0[49] / g_0[0]:.1e}",
                f"{g_t[49] / g_t[0]:.1e}",
            ]
        )
        r["grad_ratio_k50_init"] = g_0[49] / g_0[0] if g_0[0] else math.nan
        r["grad_ratio_k50_trained"] = g_t[49] / g_t[0] if g_t[0] else math.nan
    headers = [
        "model",
        "group",
        "params",
        "steps",
        "best val",
        f"val @ step {common_step}",
        "train chars/s",
        "ort step b1 (us)",
        "ort step b64 (us)",
        "fp32 MB",
        "int8 MB",
        "|g(50)|/|g(1)| init",
        "trained",
    ]
    print(f"cells on tiny-shakespeare, {args.minutes:g} min of training each, {torch.get_num_threads()} threads")
    print(table(headers, rows))
    DOCS.mkdir(exist_ok=True)
    plot(runs, DOCS / "cells-gradient.png", DOCS / "cells-curves.png")
    payload = {
        "minutes": args.minutes,
        "lr": args.lr,
        "layers": LAYERS,
        "embedding": EMBEDDING,
        "common_step": common_step,
        "k_max": K_MAX,
        "runs": [{"name": r.name, "cell": r.cell, "hidden": r.hidden, "group": r.group, **r.result} for r in runs],
    }
    path = write_results("cells", payload)
    print(f"results: {path}; plots: docs/cells-gradient.png, docs/cells-curves.png")


if __name__ == "__main__":
    main()
