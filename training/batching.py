"""Batches for truncated BPTT with the recurrent state carried from one batch to the next.

The token stream is cut into `batch_size` contiguous lanes; batch i holds the i-th window
of `seq_len` characters of every lane, so row b of batch i+1 continues row b of batch i
and the state the model leaves at the end of one batch is the right start for the next.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from training.errors import InvalidSetting, check


class LaneBatcher:
    def __init__(self, ids: Tensor, batch_size: int, seq_len: int, what: str = "training") -> None:
        check(batch_size >= 1, "batch_size", f"must be at least 1, got {batch_size}")
        check(seq_len >= 1, "seq_len", f"must be at least 1, got {seq_len}")
        if ids.numel() < seq_len + 1:
            raise InvalidSetting(
                f"{what} text has {ids.numel()} characters, shorter than one training window (seq_len {seq_len} + 1)",
                ("seq_len",),
            )
        # Each lane needs inputs and targets shifted by one, hence the -1.
        lane_len = (ids.numel() - 1) // batch_size
        if lane_len < seq_len:
            raise InvalidSetting(
                f"{what} text of {ids.numel()} characters is too short for batch_size "
                f"{batch_size} x seq_len {seq_len}; lower one of them",
                ("batch_size", "seq_len"),
            )
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.lane_len = lane_len
        self.ids = ids

    @property
    def batches_per_epoch(self) -> int:
        return self.lane_len // self.seq_len

    def lanes(self, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Inputs and targets as (batch, lane_len - offset) tensors, targets shifted by one."""
        n = self.lane_len
        x = self.ids[: self.batch_size * n].view(self.batch_size, n)
        y = self.ids[1 : self.batch_size * n + 1].view(self.batch_size, n)
        return x[:, offset:], y[:, offset:]

    def epoch(self, offset: int = 0, start: int = 0, rows: slice = slice(None)) -> Iterator[tuple[Tensor, Tensor]]:
        """The windows of one epoch, from window `start` on; `offset` shifts where windows begin.

        Shifting the windows by a different offset each epoch lets the model see every
        character at every position of a window, not always the same cut. `rows` picks a
        share of the lanes (one process's share under torchrun).
        """
        x, y = self.lanes(offset)
        x, y = x[rows], y[rows]
        for i in range(start, x.shape[1] // self.seq_len):
            sl = slice(i * self.seq_len, (i + 1) * self.seq_len)
            yield x[:, sl], y[:, sl]


def epoch_offset(seed: int, epoch: int, seq_len: int) -> int:
    """A reproducible window shift for an epoch: the same on a resumed run as on a straight one."""
    if epoch == 0:
        return 0
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randint(0, seq_len, (1,), generator=g).item())
