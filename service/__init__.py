"""charstream's serving side: FastAPI + onnxruntime, never torch.

A request travels down the layers, and imports point the same way:

    api/        HTTP, SSE, WebSocket and OpenAI framing; schemas; error responses   (HTTP only)
    serving/    the generation service (check, lease, job, write back); the models loaded
    core/       the scheduler and what it steps: jobs, slots, sampling, the onnxruntime engine
    sessions/   where sessions live between requests: memory or Redis, and the record format

Beside them, `batch/` is `charstream generate`: core's engine and sampler stepping a large batch
of samples with no server, no HTTP and no session store.

The modules here are the process around them: `server` (charstream serve: one uvicorn process or
a supervisor of `workers`), `settings` (CHARSTREAM_* read once), `logs`, `metrics` and `errors`
(every error a client can be answered with), which every layer may use.
"""
