"""The interpretable-cell finder: rank every unit of an exported charstream graph by how well it tracks a text feature.

features (exact functions of the text) -> activations (the graph stepped one character at a time)
-> scoring (units ranked against features) -> report (report.json, the page and images, and
cells.json next to the model). It reads exported graphs through exports.contract and needs
onnxruntime and numpy only (matplotlib for the images), never torch.
"""

from interpret.activations import open_model, run_states
from interpret.features import FEATURES
from interpret.report import write_report
from interpret.scoring import find_cells

__all__ = ["FEATURES", "find_cells", "open_model", "run_states", "write_report"]
