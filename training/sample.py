"""Sampling text from a trained checkpoint with PyTorch: the model steps in torch, the next character
is picked by the same sampler the service and the edge runner use (exports/sampling.py)."""

from __future__ import annotations

import numpy as np
import torch

from exports.sampling import InvalidSampling, Sampling
from training.corpus import Vocabulary
from training.errors import InvalidSetting, check
from training.model import CharRNN


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
    check(top_k is None or top_k >= 1, "top_k", f"must be at least 1, got {top_k}")
    check(bool(prime), "prime", "must hold at least one character")
    try:
        sampling = Sampling(temperature=temperature, top_k=top_k or 0)
    except InvalidSampling as exc:
        raise InvalidSetting(str(exc), (exc.field,)) from None
    ids = vocab.encode(prime)
    rng = np.random.default_rng(seed)
    model.eval()
    # Prime the whole prompt in one call, then step one character at a time.
    logits, state = model(torch.tensor([ids]), None)
    last = logits[0, -1]
    out: list[int] = []
    for _ in range(length):
        nxt = sampling.sample(last.float().numpy(), rng)
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]]), state)
        last = logits[0, -1]
    return vocab.decode(out)
