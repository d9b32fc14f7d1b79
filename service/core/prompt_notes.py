"""How likely the model found each character of a prompt it read (OpenAI's echo logprobs, ranks).

A prompt read in chunks is scored a chunk at a time from that call's logits; a prompt stepped
one character per step (to annotate each) is scored before each character is read. Either way
the entries wait in the job's `Notes` until the whole prompt is read and sent as one event.
"""

from __future__ import annotations

import numpy as np

from service.core.events import TopLogprobs
from service.core.jobs import Job
from service.core.sampling import log_softmax, top_alternatives


def note_chunk(job: Job, first: np.ndarray, logits: np.ndarray, n: int, vocab: tuple[str, ...]) -> None:
    """A chunk of a prompt read teacher-forced: how likely the model found each of its n characters.

    `first` (vocab,) predicted the chunk's first character, `logits` (n, vocab) the rest: one
    log-softmax over the chunk, as scoring a text needs (no per-character step)."""
    notes, params = job.notes, job.params
    assert notes is not None
    ids = job.prompt[job.read : job.read + n]
    lps = log_softmax(np.concatenate([first[None], logits[: n - 1]]))  # (n, vocab)
    chosen = lps[np.arange(n), ids]
    unpredicted = job.read == 0 and job.logits is None  # nothing read before the first character
    if params.prompt_logprobs:
        values: list[float | None] = list(chosen.tolist())
        tops: list[TopLogprobs | None] = []
        if params.top_logprobs:
            tops = list(top_alternatives(lps, params.top_logprobs, vocab))
        if unpredicted:
            values[0] = None
            tops[:1] = [None] if tops else []
        notes.prompt_logprobs.extend(values)
        notes.prompt_top.extend(tops)
    if params.prompt_ranks:
        ranks: list[int | None] = list((lps > chosen[:, None]).sum(axis=1).tolist())
        if unpredicted:
            ranks[0] = None
        notes.prompt_ranks.extend(ranks)


def note_prompt_logprobs(jobs: list[Job], logits: np.ndarray, vocab: tuple[str, ...]) -> None:
    """Before each job reads its next prompt character: how likely the model found it, from the
    logits (len(jobs), vocab) that predict it."""
    for job, row in zip(jobs, logits, strict=True):
        notes = job.notes
        if notes is None or not job.params.prompt_logprobs:
            continue
        if job.read == 0 and job.logits is None:  # nothing read before the first character
            notes.prompt_logprobs.append(None)
            notes.prompt_top.append(None)
            continue
        lps = log_softmax(row[None])
        notes.prompt_logprobs.append(float(lps[0, job.prompt[job.read]]))
        if job.params.top_logprobs:
            notes.prompt_top.append(top_alternatives(lps, job.params.top_logprobs, vocab)[0])
