"""The features, computed exactly on hand-written text."""

from __future__ import annotations

import numpy as np

from interpret import features


def bits(values: np.ndarray) -> str:
    return "".join("1" if v else "0" for v in values)


def ints(values: np.ndarray) -> list[int]:
    return [int(v) for v in values]


def test_in_quotes_double_and_single_quotations() -> None:
    assert bits(features.in_quotes('a "bc" d')) == "00111000"
    text = "say 'Go home,' he"
    assert bits(features.in_quotes(text)) == "0000" + "1" * 9 + "0000"


def test_in_quotes_ignores_apostrophes_and_elisions() -> None:
    assert not features.in_quotes("don't go, 'tis late; on 't ha' me").any()


def test_in_quotes_ends_at_a_blank_line() -> None:
    assert bits(features.in_quotes("'ab\n\ncd")) == "1111" + "000"


def test_python_strings_and_comments() -> None:
    text = "x = 'a\\'b' # c'\n"
    strings, comments = features.python_lexical(text)
    assert bits(strings) == "0000" + "11111" + "0" * 7
    assert bits(comments) == "0" * 11 + "1111" + "0"
    triple = 's = """a\n"b"""+1'
    assert bits(features.in_string(triple)) == "0000" + "111" + "11" + "1111" + "0" + "00"


def test_unclosed_one_quote_string_ends_at_the_line_break() -> None:
    assert bits(features.in_string("'ab\ncd")) == "111" + "000"


def test_bracket_depth() -> None:
    assert ints(features.bracket_depth("f(a[1], {b})) x")) == [0, 1, 1, 2, 2, 1, 1, 1, 2, 2, 1, 0, 0, 0, 0]


def test_line_position_and_line_start() -> None:
    assert ints(features.line_position("ab\ncde\n\nf")) == [1, 2, 0, 1, 2, 3, 0, 0, 1]
    assert bits(features.line_start("ab\nc\n")) == "00101"


def test_in_word_and_upper_run() -> None:
    assert bits(features.in_word("a_1 b-c")) == "1110101"
    assert bits(features.upper_run("ROMEO: Hi\nKING HENRY")) == "01111" + "00000" + "0111" + "0" + "01111"


def test_indent_depth() -> None:
    assert ints(features.indent_depth("  ab\n\tc\nd")) == [1, 2, 2, 2, 0, 4, 4, 0, 0]


def test_in_if_block() -> None:
    text = (
        "x = 1\n"  # 0
        "if (a and\n"  # 0 (header, continued)
        "        b):\n"  # 0
        "    y = 2\n"  # 1
        "\n"  # 1 (blank keeps)
        "    for i in z:\n"  # 1
        "        w = 's: # (' \n"  # 1 (string holds ':' and '(')
        "else:\n"  # 0 (a header at the if's indent)
        "    v = 3\n"  # 1
        "if x: pass\n"  # 0 (one-line suite opens no block)
        "z = 4\n"  # 0
        "def f():\n"  # 0
        "    q = 5\n"  # 0 (not an if)
    )
    expected = [0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0]
    lines = text.splitlines(keepends=True)
    values = features.in_if_block(text)
    start = 0
    for line, want in zip(lines, expected, strict=True):
        got = values[start : start + len(line)]
        assert got.all() == bool(want) and got.any() == bool(want), (line, want)
        start += len(line)


def test_text_kind_picks_the_features() -> None:
    code = "def f(x):\n    if x:\n        return 1\n    return 2\n"
    prose = "ROMEO:\nI pray thee, stay.\n\nJULIET:\nNay.\n"
    assert features.text_kind(code) == "code" and features.text_kind(prose) == "prose"
    code_names = [f.name for f in features.features_for(code)]
    assert "in_if_block" in code_names and "in_string" in code_names and "in_quotes" not in code_names
    prose_names = [f.name for f in features.features_for(prose)]
    assert "in_quotes" in prose_names and "indent_depth" not in prose_names
    assert "line_position" in code_names and "line_position" in prose_names


def test_every_feature_is_as_long_as_its_text() -> None:
    text = "def f(x):\n    if x:\n        return 'a(b'\n"
    for feature in features.FEATURES.values():
        assert feature.compute(text).shape == (len(text),), feature.name
        assert feature.compute("").shape == (0,)
