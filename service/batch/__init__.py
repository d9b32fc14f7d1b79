"""Batch generation: many samples from one exported model, with no server (`charstream generate`).

The scheduler without a server: `loop` steps the model's one-character graph at a large batch,
each row one sample with its own seeded RNG, and hands finished samples back; `run` orders them,
keeps or rejects each (`--unique`, `--novel`), writes JSONL and resumes a killed run; `novelty`
is the corpus index that `--novel` checks against, built once and kept beside the model.

onnxruntime and numpy only: it reuses `service.core`'s engine, sampler and draws, never torch,
FastAPI or a session store.
"""
