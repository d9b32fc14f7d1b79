"""The report's pictures: a self-contained HTML page and PNG images of text coloured by a unit.

Each character's background is the unit's value after reading it, blue (-1) through white (0) to
red (+1), as in Karpathy et al.'s figures. h is already in -1..1; an LSTM's c is not bounded and
often sits far from 0, so it is shown as tanh(c - center), the cell's own squashing applied to
its departure from where it usually sits on the text (its median there, kept in the report).
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from interpret.activations import Activations
from interpret.scoring import FeatureResult, UnitScore

NEGATIVE = (33, 102, 172)  # blue at -1
POSITIVE = (178, 24, 43)  # red at +1
WHITE = (255, 255, 255)
WRAP = 100  # columns per row in the images
HTML_UNITS = 3  # units shown per feature on the page


def display_values(values: np.ndarray, state: str, center: float = 0.0) -> np.ndarray:
    """A unit's values squashed into -1..1 for colouring: tanh(c - center) for c, a clip for h."""
    v = values.astype(np.float64)
    return np.tanh(v - center) if state == "c" else np.clip(v, -1.0, 1.0)


def colour(v: float) -> tuple[int, int, int]:
    """-1 blue, 0 white, +1 red, linear in between."""
    v = max(-1.0, min(1.0, float(v)))
    end = POSITIVE if v >= 0 else NEGATIVE
    a = abs(v)
    return (
        round(WHITE[0] + (end[0] - WHITE[0]) * a),
        round(WHITE[1] + (end[1] - WHITE[1]) * a),
        round(WHITE[2] + (end[2] - WHITE[2]) * a),
    )


def unit_label(s: UnitScore) -> str:
    return f"layer {s.layer} {s.state} unit {s.unit}"


def score_label(metric: str, score: float) -> str:
    return f"AUC {score:.3f}" if metric == "auc" else f"r {score:+.3f}"


def _coloured_html(text: str, values: np.ndarray) -> str:
    parts = []
    for ch, v in zip(text, values, strict=True):
        r, g, b = colour(v)
        shown = "↵\n" if ch == "\n" else html.escape(ch)
        parts.append(f'<span style="background:rgb({r},{g},{b})" title="{v:+.2f}">{shown}</span>')
    return "".join(parts)


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 70rem; padding: 0 1rem; color: #222; }
pre { font: 13px/1.45 ui-monospace, 'DejaVu Sans Mono', monospace; white-space: pre-wrap; word-break: break-all;
      border: 1px solid #ddd; padding: .6rem; margin: .3rem 0 1.2rem; }
pre span { border-radius: 2px; }
table { border-collapse: collapse; margin: .4rem 0; }
td, th { border: 1px solid #ddd; padding: .15rem .5rem; text-align: left; font-variant-numeric: tabular-nums; }
.scale { display: inline-block; width: 12rem; height: .8rem; vertical-align: middle;
         background: linear-gradient(to right, rgb(33,102,172), #fff, rgb(178,24,43)); }
.skipped { color: #777; }
"""


def html_page(report: dict[str, Any], results: Sequence[FeatureResult], acts: Activations, text: str) -> str:
    """One self-contained page: per feature, its best units and the text coloured by each."""
    model = report["model"]
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>cells of {html.escape(model['name'])}</title><style>{PAGE_STYLE}</style></head><body>",
        f"<h1>Interpretable cells of {html.escape(model['name'])}</h1>",
        f"<p>{model['cell'].upper()}, {model['num_layers']} layers x {model['hidden_size']} units, "
        f"{model['units']} units searched over {report['text']['chars']:,} characters of "
        f"{html.escape(report['text']['source'])}. Scores: AUC for yes/no features, Pearson r for the others. "
        "Colour: the unit's value after reading each character (for c: tanh(c - its median on this text)): "
        "<span class='scale'></span> -1 .. +1.</p>",
    ]
    for r in results:
        f = r.feature
        out.append(f"<h2 id='{f.name}'>{f.name}</h2><p>{html.escape(f.description)}</p>")
        if r.skipped:
            out.append(f"<p class='skipped'>not scored: {html.escape(r.skipped)}</p>")
            continue
        rows = "".join(
            f"<tr><td>{i + 1}</td><td>{unit_label(s)}</td><td>{score_label(f.metric, s.score)}</td>"
            f"<td>{s.strength:.3f}</td></tr>"
            for i, s in enumerate(r.top)
        )
        out.append(f"<table><tr><th>#</th><th>unit</th><th>score</th><th>strength</th></tr>{rows}</table>")
        start, end = r.excerpt
        for s in r.top[:HTML_UNITS]:
            values = display_values(acts.unit(s.layer, s.state, s.unit)[start:end], s.state, s.center)
            out.append(f"<h3>{unit_label(s)} ({score_label(f.metric, s.score)})</h3>")
            out.append(f"<pre>{_coloured_html(text[start:end], values)}</pre>")
    out.append("</body></html>")
    return "\n".join(out)


def _rows(text: str, values: np.ndarray, wrap: int) -> list[list[tuple[str, float]]]:
    """The text cut into display rows of at most `wrap` characters; a line break ends a row."""
    rows: list[list[tuple[str, float]]] = [[]]
    for ch, v in zip(text, values, strict=True):
        if ch == "\n":
            rows[-1].append((" ", v))  # the line break's own value, shown as one cell
            rows.append([])
            continue
        if len(rows[-1]) >= wrap:
            rows.append([])
        rows[-1].append((ch, v))
    if not rows[-1]:
        rows.pop()
    return rows


def render_png(path: Path, text: str, values: np.ndarray, title: str, wrap: int = WRAP) -> None:
    """Text on coloured cells, one cell per character, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(text, values, wrap)
    width = max(len(r) for r in rows)
    grid = np.ones((len(rows), width, 3))
    for y, row in enumerate(rows):
        for x, (_, v) in enumerate(row):
            grid[y, x] = np.array(colour(v)) / 255.0
    cell_w, cell_h = 0.085, 0.19  # inches per character cell
    head = 0.5  # inches for the title (two lines at most)
    height = len(rows) * cell_h + head
    fig = plt.figure(figsize=(width * cell_w + 0.2, height), dpi=110)
    ax = fig.add_axes((0.01, 0.01, 0.98, 1 - head / height))
    ax.imshow(grid, aspect="auto", interpolation="nearest", extent=(0, width, len(rows), 0))
    for y, row in enumerate(rows):
        for x, (ch, _) in enumerate(row):
            if not ch.isspace():
                ax.text(x + 0.5, y + 0.55, ch, ha="center", va="center", family="DejaVu Sans Mono", fontsize=8.5)
    ax.set_axis_off()
    fig.suptitle("\n".join(textwrap.wrap(title, int(width * 1.25))), fontsize=9, x=0.01, ha="left", y=0.995, va="top")
    fig.savefig(path)
    plt.close(fig)


def write_images(
    out: Path, report: dict[str, Any], results: Sequence[FeatureResult], acts: Activations, text: str
) -> None:
    """<feature>.png: the feature's excerpt coloured by its best unit."""
    name = report["model"]["name"]
    for r in results:
        if r.skipped or not r.top:
            continue
        best = r.top[0]
        start, end = r.excerpt
        values = display_values(acts.unit(best.layer, best.state, best.unit)[start:end], best.state, best.center)
        title = f"{name}: {r.feature.name} ({r.feature.description}) - {unit_label(best)}, " + score_label(
            r.feature.metric, best.score
        )
        render_png(out / f"{r.feature.name}.png", text[start:end], values, title)
