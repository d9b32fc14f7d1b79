"""The interpretable-cell finder: rank every unit of a charstream graph by how well it tracks a text feature.

    charstream cells exports/shakespeare-lstm --data data/tinyshakespeare.txt

The graph is stepped one character at a time (onnxruntime + numpy only, so this runs wherever the
.onnx file does) and every layer's state after each character is kept: for an LSTM both h and c,
for a GRU h. Each feature below is a function of the text read so far (value at position i = what
is true once character i has been read), computed exactly from the characters. A unit's score is
the Pearson correlation with a continuous feature, or the ROC AUC with a binary one (how often a
position where the feature holds gets a higher value than one where it does not; 0.5 is chance,
0 and 1 are perfect, so strength = |AUC - 0.5| * 2). This is the experiment of Karpathy, Johnson
and Fei-Fei, "Visualizing and Understanding Recurrent Networks" (2015), done by search rather than
by eye.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from exports import contract

REPORT_FORMAT_VERSION = 1
CELLS_FILE = "cells.json"  # the report, copied next to the model so the service can offer its units

Kind = Literal["binary", "continuous"]

# Words that follow an apostrophe in elisions ('tis, 'twas, on 't...): that apostrophe opens no quotation.
ELISIONS = frozenset(
    (
        *("tis", "twas", "twere", "twill", "twould", "em", "gainst", "tween", "twixt", "pon", "neath", "bout"),
        *("bove", "scape", "mong", "fore", "cause", "gan", "d", "s", "t", "ll", "st", "rt", "re", "ve", "m", "n"),
    )
)
BLOCK_KEYWORDS = frozenset(
    ("if", "elif", "else", "for", "while", "with", "def", "class", "try", "except", "finally", "async", "match")
)
IF_KEYWORDS = frozenset(("if", "elif", "else"))
BRACKETS_OPEN = "([{"
BRACKETS_CLOSE = ")]}"
TAB_WIDTH = 4


# ---- features: exact functions of the text; value i holds once character i has been read ----------


def in_quotes(text: str) -> np.ndarray:
    """Inside a quotation: between `"` and `"`, or between a `'` that opens a word and a `'` that ends one.

    The opening quote counts as inside, the closing quote as outside. An apostrophe inside a word
    (don't), at a word's end without an open quotation (ha'), or before an elision ('tis, on 't)
    opens nothing. A quotation still open at a blank line ends there.
    """
    out = np.zeros(len(text), dtype=bool)
    open_by: str | None = None
    for i, ch in enumerate(text):
        if ch == "\n" and i > 0 and text[i - 1] == "\n":
            open_by = None
        elif ch == '"' and open_by != "'":
            open_by = None if open_by == '"' else '"'
        elif ch == "'" and open_by == "'" and _quote_closes(text, i):
            open_by = None
        elif ch == "'" and open_by is None and _quote_opens(text, i):
            open_by = "'"
        out[i] = open_by is not None
    return out


def _quote_opens(text: str, i: int) -> bool:
    if i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_"):
        return False
    j = i + 1
    while j < len(text) and text[j].isalpha():
        j += 1
    word = text[i + 1 : j].lower()
    return bool(word) and word not in ELISIONS


def _quote_closes(text: str, i: int) -> bool:
    before_ok = i > 0 and not text[i - 1].isspace()
    after_ok = i + 1 >= len(text) or not text[i + 1].isalnum()
    return before_ok and after_ok


def python_lexical(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(inside a string literal, inside a comment) for Python source.

    Strings open with ', ", ''' or \"\"\" (prefixes such as r or f are ordinary letters before them),
    a backslash escapes the next character, a one-quote string ends at a line break if unclosed.
    The opening delimiter counts as inside, the last character of the closing one as outside.
    """
    n = len(text)
    in_string = np.zeros(n, dtype=bool)
    in_comment = np.zeros(n, dtype=bool)
    delimiter: str | None = None
    comment = False
    i = 0
    while i < n:
        ch = text[i]
        if comment:
            comment = ch != "\n"
            in_comment[i] = comment
            i += 1
        elif delimiter is None:
            if ch == "#":
                comment = in_comment[i] = True
            elif ch in "'\"":
                delimiter = ch * 3 if text.startswith(ch * 3, i) else ch
                in_string[i : i + len(delimiter)] = True
                i += len(delimiter)
                continue
            i += 1
        elif ch == "\\":
            in_string[i : i + 2] = True
            i += 2
        elif text.startswith(delimiter, i):
            in_string[i : i + len(delimiter) - 1] = True
            i += len(delimiter)
            delimiter = None
        elif ch == "\n" and len(delimiter) == 1:
            delimiter = None
            i += 1
        else:
            in_string[i] = True
            i += 1
    return in_string, in_comment


def in_string(text: str) -> np.ndarray:
    """Inside a Python string literal (see python_lexical)."""
    return python_lexical(text)[0]


def in_comment(text: str) -> np.ndarray:
    """Inside a Python # comment, up to (not including) the line break."""
    return python_lexical(text)[1]


def bracket_depth(text: str) -> np.ndarray:
    """How many (, [ or { are open; a closing bracket with none open is ignored."""
    out = np.zeros(len(text), dtype=np.float64)
    depth = 0
    for i, ch in enumerate(text):
        if ch in BRACKETS_OPEN:
            depth += 1
        elif ch in BRACKETS_CLOSE and depth > 0:
            depth -= 1
        out[i] = depth
    return out


def line_position(text: str) -> np.ndarray:
    """Characters read since the last line break (0 at the line break itself)."""
    out = np.zeros(len(text), dtype=np.float64)
    column = 0
    for i, ch in enumerate(text):
        column = 0 if ch == "\n" else column + 1
        out[i] = column
    return out


def in_word(text: str) -> np.ndarray:
    """The character is a letter, a digit or an underscore."""
    return np.array([ch.isalnum() or ch == "_" for ch in text], dtype=bool)


def line_start(text: str) -> np.ndarray:
    """A line break was just read: the next character starts a line."""
    return np.array([ch == "\n" for ch in text], dtype=bool)


def upper_run(text: str) -> np.ndarray:
    """An upper-case letter right after another (ROMEO, KING HENRY): a run of capitals of two or more."""
    return np.array([ch.isupper() and i > 0 and text[i - 1].isupper() for i, ch in enumerate(text)], dtype=bool)


def indent_depth(text: str) -> np.ndarray:
    """Columns of leading white space on the current line read so far (a tab counts 4)."""
    out = np.zeros(len(text), dtype=np.float64)
    indent = 0
    leading = True
    for i, ch in enumerate(text):
        if ch == "\n":
            indent, leading = 0, True
        elif leading and ch == " ":
            indent += 1
        elif leading and ch == "\t":
            indent += TAB_WIDTH
        else:
            leading = False
        out[i] = indent
    return out


def in_if_block(text: str) -> np.ndarray:
    """The line lies in the body of a Python if/elif/else block (at any depth), by indentation.

    A header is a line starting with a block keyword; it opens its block when a line ends with ':'
    outside strings, comments and brackets (headers may span lines). Lines indented no deeper than
    an open header close it. Blank and comment-only lines keep the previous line's value. Every
    character of a line (its line break included) gets the line's value; a header line takes the
    value of the blocks around it.
    """
    strings, comments = python_lexical(text)
    out = np.zeros(len(text), dtype=bool)
    stack: list[tuple[int, bool]] = []  # (indent of the header, is an if/elif/else)
    pending: tuple[int, bool] | None = None  # a header read, its ':' not yet
    depth = 0
    value = False
    start = 0
    for line in _lines(text):
        end = start + len(line)
        keep = ~(strings[start:end] | comments[start:end])
        code = "".join(ch for ch, k in zip(line, keep, strict=True) if k)
        body = code.strip()
        if body and depth == 0 and pending is None:
            leading = len(line) - len(line.lstrip(" \t"))
            indent = sum(TAB_WIDTH if ch == "\t" else 1 for ch in line[:leading])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            value = any(is_if for _, is_if in stack)
            first = re.match(r"[A-Za-z_]+", body)
            word = first.group(0) if first else ""
            if word in BLOCK_KEYWORDS:
                pending = (indent, word in IF_KEYWORDS)
        out[start:end] = value
        for ch in code:
            if ch in BRACKETS_OPEN:
                depth += 1
            elif ch in BRACKETS_CLOSE and depth > 0:
                depth -= 1
        if pending is not None and depth == 0 and body:
            if body.endswith(":"):
                stack.append(pending)
            pending = None
        start = end
    return out


def _lines(text: str) -> Iterator[str]:
    """The lines of text, each with its line break (split on \\n only, as every feature here counts lines)."""
    start = 0
    while start < len(text):
        nl = text.find("\n", start)
        end = len(text) if nl < 0 else nl + 1
        yield text[start:end]
        start = end


@dataclass(frozen=True)
class Feature:
    name: str
    kind: Kind
    description: str
    compute: Callable[[str], np.ndarray]
    texts: frozenset[str] = frozenset(("prose", "code"))  # the kinds of text it means something for

    @property
    def metric(self) -> str:
        return "auc" if self.kind == "binary" else "correlation"


PROSE = frozenset(("prose",))
CODE = frozenset(("code",))
FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature("in_quotes", "binary", "inside a quotation (\"...\" or '...')", in_quotes, PROSE),
        Feature("in_string", "binary", "inside a Python string literal", in_string, CODE),
        Feature("in_comment", "binary", "inside a Python # comment", in_comment, CODE),
        Feature("bracket_depth", "continuous", "(, [ and { nesting depth", bracket_depth),
        Feature("line_position", "continuous", "characters since the line began", line_position),
        Feature("in_word", "binary", "inside a word (letters, digits, _)", in_word),
        Feature("line_start", "binary", "a line break was just read", line_start),
        Feature("upper_run", "binary", "within a run of capitals (speaker names)", upper_run),
        Feature("indent_depth", "continuous", "leading white space of the line", indent_depth, CODE),
        Feature("in_if_block", "binary", "inside the body of an if/elif/else block", in_if_block, CODE),
    )
}


def text_kind(text: str) -> str:
    """ "code" when at least a fifth of the non-blank lines are indented (Python, C...), else "prose"."""
    lines = [line for line in text.split("\n") if line.strip()]
    indented = sum(1 for line in lines if line[:1] in (" ", "\t"))
    return "code" if lines and indented >= 0.2 * len(lines) else "prose"


def features_for(text: str) -> list[Feature]:
    """The features that mean something for this kind of text (quotations in prose, strings in code...)."""
    kind = text_kind(text)
    return [f for f in FEATURES.values() if kind in f.texts]


# ---- scores --------------------------------------------------------------------------------


def correlation(acts: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """Pearson r of each column of acts (T, units) with feature (T,); 0 for a constant column."""
    x = acts.astype(np.float64)
    x -= x.mean(axis=0)
    y = feature.astype(np.float64) - feature.mean()
    denom = np.sqrt((x * x).sum(axis=0) * float((y * y).sum()))
    r = (x.T @ y) / np.where(denom > 0, denom, 1.0)
    return np.where(denom > 0, r, 0.0)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-d array, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # Positions where a new value starts; each tie group gets the mean of its ordinal ranks.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    group_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def auc(acts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC AUC of each column of acts (T, units) for the binary labels (T,) (Mann-Whitney U / n+ n-)."""
    labels = labels.astype(bool)
    return np.array([_auc_from_ranks(average_ranks(acts[:, u]), labels) for u in range(acts.shape[1])])


def _auc_from_ranks(ranks: np.ndarray, labels: np.ndarray) -> float:
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return 0.5
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def strength(kind: Kind, scores: np.ndarray) -> np.ndarray:
    """How well a unit tracks the feature whatever its sign: |r|, or |AUC - 0.5| * 2."""
    return np.abs(scores) if kind == "continuous" else np.abs(scores - 0.5) * 2.0


# ---- running the graph -------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitGroup:
    """One layer's h or c: `hidden` units."""

    layer: int
    state: str  # "h" or "c"


@dataclass
class Activations:
    """Every unit's value after each character: values[group] is (T, hidden) float32."""

    info: contract.ModelInfo
    values: dict[UnitGroup, np.ndarray]
    logits: np.ndarray | None = None  # (T, vocab): the distribution for the character after each one

    def unit(self, layer: int, state: str, unit: int) -> np.ndarray:
        return self.values[UnitGroup(layer, state)][:, unit]


def open_model(path: Path) -> tuple[Any, contract.ModelInfo, Path]:
    """An onnxruntime session for a model folder (its model.onnx) or an .onnx file, with its metadata."""
    import onnxruntime as ort

    file = path / contract.MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path} is neither an .onnx file nor a model folder holding {contract.MODEL_FILE}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own classes for missing or damaged files
        raise ValueError(f"cannot load {file}: {str(exc).splitlines()[0]}") from None
    try:
        info = contract.parse_metadata(session.get_modelmeta().custom_metadata_map)
    except contract.ContractError as exc:
        raise ValueError(f"{file}: {exc}") from None
    return session, info, file


def run_states(session: Any, info: contract.ModelInfo, text: str, keep_logits: bool = False) -> Activations:
    """Step the graph over `text` one character at a time from a zero state, keeping every state."""
    index = info.vocab_index
    unknown = sorted({ch for ch in text if ch not in index})
    if unknown:
        raise ValueError(f"the text has {len(unknown)} character(s) outside the model's vocabulary: {unknown[:20]}")
    state_names = info.state_names  # h[, c]
    out_names = [contract.OUTPUT_LOGITS, *info.state_out_names]
    shape = (info.num_layers, 1, info.hidden_size)  # (layers, batch, hidden)
    state = [np.zeros(shape, np.float32) for _ in state_names]
    n = len(text)
    # (T, layers, hidden) per state kind, filled one character at a time.
    kept = {name: np.empty((n, info.num_layers, info.hidden_size), np.float32) for name in state_names}
    logits = np.empty((n, info.vocab_size), np.float32) if keep_logits else None
    token = np.zeros((1, 1), np.int64)
    for i, ch in enumerate(text):
        token[0, 0] = index[ch]
        feeds = {contract.INPUT_TOKENS: token, **dict(zip(state_names, state, strict=True))}
        outputs = session.run(out_names, feeds)
        state = outputs[1:]
        for name, value in zip(state_names, state, strict=True):
            kept[name][i] = value[:, 0, :]
        if logits is not None:
            logits[i] = outputs[0][0, -1]
    values = {
        UnitGroup(layer, name): np.ascontiguousarray(kept[name][:, layer, :])
        for layer in range(info.num_layers)
        for name in state_names
    }
    return Activations(info, values, logits)


# ---- the search ----------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitScore:
    layer: int
    state: str
    unit: int
    score: float
    strength: float
    center: float = 0.0  # where a c unit sits on this text (its median): colours show tanh(c - center)

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "state": self.state,
            "unit": self.unit,
            "score": round(self.score, 4),
            "strength": round(self.strength, 4),
            "center": round(self.center, 4),
        }


@dataclass
class FeatureResult:
    feature: Feature
    values: np.ndarray
    top: list[UnitScore] = field(default_factory=list)
    skipped: str | None = None  # why no unit was scored (the feature is constant on this text)
    excerpt: tuple[int, int] = (0, 0)  # [start, end) of the text shown for this feature


def score_group(matrix: np.ndarray, features: Sequence[tuple[Kind, np.ndarray]]) -> list[np.ndarray]:
    """Each feature's scores for every column of matrix (T, units): r or AUC.

    A unit's ranks are computed once and serve every binary feature: ranking is the costly part.
    """
    scores = [correlation(matrix, v) if kind == "continuous" else np.empty(matrix.shape[1]) for kind, v in features]
    binary = [(i, v.astype(bool)) for i, (kind, v) in enumerate(features) if kind == "binary"]
    if binary:
        for u in range(matrix.shape[1]):
            ranks = average_ranks(matrix[:, u])
            for i, labels in binary:
                scores[i][u] = _auc_from_ranks(ranks, labels)
    return scores


def rank_units(acts: Activations, features: Sequence[tuple[Kind, np.ndarray]], top: int) -> list[list[UnitScore]]:
    """Per feature, the `top` units that track it best, strongest first."""
    found: list[list[UnitScore]] = [[] for _ in features]
    for group, matrix in acts.values.items():
        for (kind, _), scores, kept in zip(features, score_group(matrix, features), found, strict=True):
            strengths = strength(kind, scores)
            for u in np.argsort(-strengths, kind="stable")[:top]:
                center = float(np.median(matrix[:, u])) if group.state == "c" else 0.0
                kept.append(UnitScore(group.layer, group.state, int(u), float(scores[u]), float(strengths[u]), center))
    for kept in found:
        kept.sort(key=lambda s: (-s.strength, s.layer, s.state, s.unit))
        del kept[top:]
    return found


def choose_excerpt(text: str, values: np.ndarray, kind: Kind, length: int) -> tuple[int, int]:
    """A stretch of whole lines, about `length` characters, where the feature changes most."""
    if len(text) <= length:
        return 0, len(text)
    last = len(text) - length  # every window is a full one
    starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 <= last]
    changes = np.r_[0, np.cumsum(values[1:] != values[:-1])] if kind == "binary" else None
    best, best_score = (0, length), -1.0
    for start in starts:
        end = min(len(text), start + length)
        nl = text.rfind("\n", start, end)
        if nl > start + length // 2:
            end = nl + 1
        score = float(changes[end - 1] - changes[start]) if changes is not None else float(values[start:end].std())
        if score > best_score:
            best, best_score = (start, end), score
    return best


def find_cells(
    acts: Activations,
    text: str,
    features: Iterable[Feature] | None = None,
    top: int = 5,
    excerpt_chars: int = 600,
) -> list[FeatureResult]:
    """Score every unit against every feature (by default those for this kind of text); a feature
    constant on the text is skipped, with the reason."""
    results = [FeatureResult(f, f.compute(text)) for f in (features if features is not None else features_for(text))]
    scored = []
    for r in results:
        if r.values.size == 0 or np.all(r.values == r.values[0]):
            r.skipped = "constant on this text"
        else:
            scored.append(r)
    tops = rank_units(acts, [(r.feature.kind, r.values) for r in scored], top)
    for r, best in zip(scored, tops, strict=True):
        r.top = best
        r.excerpt = choose_excerpt(text, r.values, r.feature.kind, excerpt_chars)
    return results


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
            "sha256": file_sha256(model_file),
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
    from exports import cells_report

    (out / "index.html").write_text(cells_report.html_page(report, results, acts, text), encoding="utf-8")
    if images:
        cells_report.write_images(out, report, results, acts, text)
    if copy_to_model and model_file.name == contract.MODEL_FILE:
        (model_file.parent / CELLS_FILE).write_text(payload, encoding="utf-8")
    return report
