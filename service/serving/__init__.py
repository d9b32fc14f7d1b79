"""The serving logic: the models loaded (`registry`) and the generation service (`facade`).

The service is the one place a request is checked, leased, turned into a job for a scheduler and
written back; the API layer above it speaks HTTP only. No HTTP and no onnxruntime here.
"""
