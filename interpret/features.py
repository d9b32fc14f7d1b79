"""Features of a text, computed exactly from its characters: value i is what holds once character i has been read.

Binary features (inside a quotation, a string, a comment, an if block...) and continuous ones
(bracket depth, column, indentation); each knows the kinds of text, prose or code, it means
something for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

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
