from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from training.batching import LaneBatcher, epoch_offset
from training.errors import UserError


def test_targets_are_inputs_shifted_by_one_and_lanes_continue() -> None:
    ids = torch.arange(1000)
    batcher = LaneBatcher(ids, batch_size=4, seq_len=10)
    windows = list(batcher.epoch())
    assert len(windows) == batcher.batches_per_epoch == (999 // 4) // 10
    for x, y in windows:
        assert torch.equal(y, x + 1)  # ids are consecutive integers: the target is the next one
    # Row b of window i+1 starts right where row b of window i ended: the carried state is right.
    for (x0, _), (x1, _) in pairwise(windows):
        assert torch.equal(x1[:, 0], x0[:, -1] + 1)


def test_no_leak_across_the_train_validation_split() -> None:
    train_ids = torch.arange(0, 900)
    batcher = LaneBatcher(train_ids, batch_size=3, seq_len=7)
    seen = torch.cat([torch.cat([x.flatten(), y.flatten()]) for x, y in batcher.epoch()])
    assert int(seen.max()) <= 899  # nothing from the validation part (900..) is ever read or predicted


def test_offset_shifts_windows_and_is_reproducible() -> None:
    batcher = LaneBatcher(torch.arange(500), batch_size=2, seq_len=8)
    x0, _ = next(batcher.epoch(offset=0))
    x3, _ = next(batcher.epoch(offset=3))
    assert torch.equal(x3, x0 + 3)
    assert epoch_offset(1, 0, 8) == 0
    assert epoch_offset(1, 5, 8) == epoch_offset(1, 5, 8)
    assert {epoch_offset(1, e, 8) for e in range(1, 40)} != {0}


def test_resume_mid_epoch_starts_at_the_right_window() -> None:
    batcher = LaneBatcher(torch.arange(800), batch_size=2, seq_len=5)
    all_windows = list(batcher.epoch(offset=2))
    later = list(batcher.epoch(offset=2, start=4))
    assert len(later) == len(all_windows) - 4
    assert torch.equal(later[0][0], all_windows[4][0])


@pytest.mark.parametrize(
    ("n", "batch", "seq", "message"),
    [
        (5, 1, 10, "shorter than one training window"),
        (100, 20, 10, "too short for batch_size 20"),
        (100, 0, 10, "batch_size must be at least 1"),
        (100, 2, 0, "seq_len must be at least 1"),
    ],
)
def test_too_short_or_nonsense(n: int, batch: int, seq: int, message: str) -> None:
    with pytest.raises(UserError, match=message):
        LaneBatcher(torch.arange(n), batch, seq)
