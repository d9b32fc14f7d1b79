"""charstream's serving side: FastAPI + onnxruntime, never torch."""
