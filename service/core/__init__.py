"""The engine room: one scheduler per model steps every active job in one onnxruntime call.

`scheduler` (continuous batching with chunked prefill) drives `jobs` (a request's lifecycle and
its mailbox of events) through `slots` (each job's recurrent state in batch arrays), `step_plan`
(what a steady batch keeps from step to step), `sampling` and `draws` (the next character and the
RNG behind it), `constraints` (structured outputs: which characters a job may sample next), and
`engine` (the onnxruntime session). `events` are what a job emits and `generation` is the
consumer's handle on them. No HTTP, no session store.
"""
