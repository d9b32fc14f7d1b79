"""Sampling text from a trained checkpoint with PyTorch (the service does the same with onnxruntime)."""

from __future__ import annotations

import torch
from torch import Tensor

from training.corpus import Vocabulary
from training.errors import check
from training.model import CharRNN


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """One token id from logits (vocab,): greedy at temperature 0, else softmax(logits / T) over the top k."""
    if temperature == 0.0:
        return int(torch.argmax(logits).item())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


@torch.no_grad()
def generate(
    model: CharRNN,
    vocab: Vocabulary,
    prime: str,
    length: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> str:
    check(length >= 0, "length", f"must be at least 0, got {length}")
    check(temperature >= 0, "temperature", f"must be at least 0, got {temperature}")
    check(top_k is None or top_k >= 1, "top_k", f"must be at least 1, got {top_k}")
    check(bool(prime), "prime", "must hold at least one character")
    ids = vocab.encode(prime)
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else torch.seed())
    model.eval()
    # Prime the whole prompt in one call, then step one character at a time.
    logits, state = model(torch.tensor([ids]), None)
    last = logits[0, -1]
    out: list[int] = []
    for _ in range(length):
        nxt = sample_next(last, temperature, top_k, generator)
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]]), state)
        last = logits[0, -1]
    return vocab.decode(out)
