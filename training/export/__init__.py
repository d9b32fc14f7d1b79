"""Export checkpoints to stateful ONNX graphs, one module per job.

graph.py     torch -> fp32 ONNX graph, its declared shapes, parity with torch
variants.py  int8, fp16 and .ort files made from the fp32 graph
measure.py   validation loss, top-1 agreement, step latency and hash of one file
package.py   one checkpoint -> one model folder with its manifest, written atomically
"""

from training.errors import ExportError
from training.export.graph import OPSET, PARITY_TOLERANCE, export_fp32, verify_parity
from training.export.package import ExportRequest, default_name, export_many, export_one, parse_variants

__all__ = [
    "OPSET",
    "PARITY_TOLERANCE",
    "ExportError",
    "ExportRequest",
    "default_name",
    "export_fp32",
    "export_many",
    "export_one",
    "parse_variants",
    "verify_parity",
]
