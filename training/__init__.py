"""Training side of charstream: corpus, model, training loop, checkpoints and ONNX export.

Importing this package does not import torch; the modules that need it do.
"""
