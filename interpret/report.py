"""The cell finder's run and its report: report.json, index.html and <feature>.png in a folder.

    charstream cells exports/shakespeare-lstm --data data/tinyshakespeare.txt

runs write_report; the report is also copied next to the model as cells.json, where the service finds it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exports import contract
from interpret.activations import open_model, run_states
from interpret.features import FEATURES, features_for, text_kind
from interpret.pictures import html_page, write_images
from interpret.scoring import FeatureResult, find_cells

REPORT_FORMAT_VERSION = 1


def report_json(
    results: Sequence[FeatureResult],
    info: contract.ModelInfo,
    model_file: Path,
    source: str,
    offset: int,
    text: str,
) -> dict[str, Any]:
    """The report: model facts, the text read, and per feature its top units (strongest first)."""
    features = []
    for r in results:
        entry: dict[str, Any] = {
            "name": r.feature.name,
            "kind": r.feature.kind,
            "metric": r.feature.metric,
            "description": r.feature.description,
        }
        if r.skipped:
            entry["skipped"] = r.skipped
        else:
            entry["mean"] = round(float(r.values.mean()), 4)
            entry["top"] = [s.to_json() for s in r.top]
            entry["image"] = f"{r.feature.name}.png"
            entry["excerpt"] = {"start": offset + r.excerpt[0], "end": offset + r.excerpt[1]}
        features.append(entry)
    return {
        "format_version": REPORT_FORMAT_VERSION,
        "model": {
            "name": model_file.parent.name,
            "file": model_file.name,
            "sha256": contract.file_sha256(model_file),
            "cell": info.cell,
            "num_layers": info.num_layers,
            "hidden_size": info.hidden_size,
            "states": list(info.state_names),
            "units": info.num_layers * info.hidden_size * len(info.state_names),
        },
        "text": {"source": source, "offset": offset, "chars": len(text), "kind": text_kind(text)},
        "scores": {
            "binary": "ROC AUC (0.5 chance; 0 or 1 perfect)",
            "continuous": "Pearson correlation",
            "strength": "|r| or |AUC - 0.5| * 2",
        },
        "features": features,
    }


def read_text(paths: Sequence[str], max_chars: int, offset: int | None) -> tuple[str, int, str]:
    """(text, its offset in the joined files, a name for it): by default the last `max_chars` characters,
    from a line start, which is where the training split keeps its held-out text."""
    chunks = []
    for name in paths:
        p = Path(name)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            try:
                chunks.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise ValueError(f"{f} is not UTF-8 text") from None
    whole = "".join(chunks)
    if not whole:
        raise ValueError("the text is empty")
    if offset is None:
        offset = max(0, len(whole) - max_chars)
        if offset > 0:
            nl = whole.find("\n", offset)
            offset = nl + 1 if 0 <= nl < len(whole) - 1 else offset
    if not 0 <= offset < len(whole):
        raise ValueError(f"--offset {offset} is outside the text ({len(whole)} characters)")
    text = whole[offset : offset + max_chars]
    return text, offset, ", ".join(Path(p).name for p in paths)


def write_report(
    model: Path,
    data: Sequence[str],
    out: Path,
    max_chars: int = 50_000,
    offset: int | None = None,
    feature_names: Sequence[str] | None = None,
    top: int = 5,
    images: bool = True,
    copy_to_model: bool = True,
) -> dict[str, Any]:
    """Run the finder and write out/report.json, out/index.html and out/<feature>.png; return the report.

    With copy_to_model, the report is also written next to the model as cells.json, where the
    service finds it (GET /v1/models/{id}/cells) for the playground's unit picker.
    """
    if max_chars < 2:
        raise ValueError("--max-chars must be at least 2")
    if top < 1:
        raise ValueError("--top must be at least 1")
    unknown = [n for n in feature_names or () if n not in FEATURES]
    if unknown:
        raise ValueError(f"unknown feature(s) {', '.join(unknown)}; choose from {', '.join(FEATURES)}")
    session, info, model_file = open_model(model)
    text, start, source = read_text(data, max_chars, offset)
    acts = run_states(session, info, text)
    features = [FEATURES[n] for n in feature_names] if feature_names else features_for(text)
    results = find_cells(acts, text, features, top=top)
    report = report_json(results, info, model_file, source, start, text)
    out.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
    (out / "report.json").write_text(payload, encoding="utf-8")
    (out / "index.html").write_text(html_page(report, results, acts, text), encoding="utf-8")
    if images:
        write_images(out, report, results, acts, text)
    if copy_to_model and model_file.name == contract.MODEL_FILE:
        (model_file.parent / contract.CELLS_FILE).write_text(payload, encoding="utf-8")
    return report
