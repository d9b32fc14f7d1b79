"""The cell finder: features computed exactly on hand-written text, the scores, and a run on real tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from exports import cells
from exports.cells_report import colour, display_values


def bits(values: np.ndarray) -> str:
    return "".join("1" if v else "0" for v in values)


def ints(values: np.ndarray) -> list[int]:
    return [int(v) for v in values]


# ---- features ---------------------------------------------------------------------------------


def test_in_quotes_double_and_single_quotations() -> None:
    assert bits(cells.in_quotes('a "bc" d')) == "00111000"
    text = "say 'Go home,' he"
    assert bits(cells.in_quotes(text)) == "0000" + "1" * 9 + "0000"


def test_in_quotes_ignores_apostrophes_and_elisions() -> None:
    assert not cells.in_quotes("don't go, 'tis late; on 't ha' me").any()


def test_in_quotes_ends_at_a_blank_line() -> None:
    assert bits(cells.in_quotes("'ab\n\ncd")) == "1111" + "000"


def test_python_strings_and_comments() -> None:
    text = "x = 'a\\'b' # c'\n"
    strings, comments = cells.python_lexical(text)
    assert bits(strings) == "0000" + "11111" + "0" * 7
    assert bits(comments) == "0" * 11 + "1111" + "0"
    triple = 's = """a\n"b"""+1'
    assert bits(cells.in_string(triple)) == "0000" + "111" + "11" + "1111" + "0" + "00"


def test_unclosed_one_quote_string_ends_at_the_line_break() -> None:
    assert bits(cells.in_string("'ab\ncd")) == "111" + "000"


def test_bracket_depth() -> None:
    assert ints(cells.bracket_depth("f(a[1], {b})) x")) == [0, 1, 1, 2, 2, 1, 1, 1, 2, 2, 1, 0, 0, 0, 0]


def test_line_position_and_line_start() -> None:
    assert ints(cells.line_position("ab\ncde\n\nf")) == [1, 2, 0, 1, 2, 3, 0, 0, 1]
    assert bits(cells.line_start("ab\nc\n")) == "00101"


def test_in_word_and_upper_run() -> None:
    assert bits(cells.in_word("a_1 b-c")) == "1110101"
    assert bits(cells.upper_run("ROMEO: Hi\nKING HENRY")) == "01111" + "00000" + "0111" + "0" + "01111"


def test_indent_depth() -> None:
    assert ints(cells.indent_depth("  ab\n\tc\nd")) == [1, 2, 2, 2, 0, 4, 4, 0, 0]


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
    values = cells.in_if_block(text)
    start = 0
    for line, want in zip(lines, expected, strict=True):
        got = values[start : start + len(line)]
        assert got.all() == bool(want) and got.any() == bool(want), (line, want)
        start += len(line)


def test_text_kind_picks_the_features() -> None:
    code = "def f(x):\n    if x:\n        return 1\n    return 2\n"
    prose = "ROMEO:\nI pray thee, stay.\n\nJULIET:\nNay.\n"
    assert cells.text_kind(code) == "code" and cells.text_kind(prose) == "prose"
    code_names = [f.name for f in cells.features_for(code)]
    assert "in_if_block" in code_names and "in_string" in code_names and "in_quotes" not in code_names
    prose_names = [f.name for f in cells.features_for(prose)]
    assert "in_quotes" in prose_names and "indent_depth" not in prose_names
    assert "line_position" in code_names and "line_position" in prose_names


def test_every_feature_is_as_long_as_its_text() -> None:
    text = "def f(x):\n    if x:\n        return 'a(b'\n"
    for feature in cells.FEATURES.values():
        assert feature.compute(text).shape == (len(text),), feature.name
        assert feature.compute("").shape == (0,)


# ---- scores -------------------------------------------------------------------------------------


def test_correlation_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(200, 5)).astype(np.float32)
    acts[:, 4] = 3.0  # constant: scored 0, not NaN
    feature = acts[:, 0] * 2 + rng.normal(size=200) * 0.1
    r = cells.correlation(acts, feature)
    for u in range(4):
        assert r[u] == pytest.approx(np.corrcoef(acts[:, u], feature)[0, 1], abs=1e-9)
    assert r[4] == 0.0


def test_average_ranks_share_ties() -> None:
    assert list(cells.average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0]))) == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_auc_matches_pair_counting() -> None:
    rng = np.random.default_rng(1)
    acts = np.round(rng.normal(size=(60, 3)), 1)  # rounded: ties happen
    labels = rng.random(60) < 0.3
    got = cells.auc(acts, labels)
    for u in range(3):
        pos, neg = acts[labels, u], acts[~labels, u]
        wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        assert got[u] == pytest.approx(wins / (pos.size * neg.size))
    perfect = np.c_[labels.astype(np.float32), -labels.astype(np.float32)]
    assert list(cells.auc(perfect, labels)) == [1.0, 0.0]
    assert list(cells.strength("binary", np.array([1.0, 0.0, 0.5]))) == [1.0, 1.0, 0.0]


def test_colour_scale() -> None:
    assert colour(-1) == (33, 102, 172)
    assert colour(0) == (255, 255, 255)
    assert colour(1) == (178, 24, 43)
    assert colour(7) == colour(1)
    assert list(display_values(np.array([-5.0, 0.5]), "h")) == [-1.0, 0.5]
    assert display_values(np.array([2.0]), "c")[0] == pytest.approx(np.tanh(2.0))
    assert display_values(np.array([5.0]), "c", center=4.0)[0] == pytest.approx(np.tanh(1.0))


def test_a_planted_unit_is_found() -> None:
    """Activations built by hand: the unit that copies a feature ranks first with a perfect score."""
    text = 'ab "cd" e\nfg "h" ij\n' * 5
    info = cells.contract.ModelInfo(tuple(sorted(set(text))), "lstm", 1, 4, 1, "", None, "fp32")
    rng = np.random.default_rng(2)
    noise = rng.normal(size=(len(text), 4)).astype(np.float32)
    h, c = noise.copy(), noise.copy() * 0.5
    c[:, 2] = cells.in_quotes(text) * 2.0 - 1.0
    h[:, 1] = cells.line_position(text) / 10
    acts = cells.Activations(info, {cells.UnitGroup(0, "h"): h, cells.UnitGroup(0, "c"): c})
    found = {r.feature.name: r for r in cells.find_cells(acts, text, top=3)}
    # c sits at -1 outside the quotes, most of the text: that is its center for colouring.
    expected = {"layer": 0, "state": "c", "unit": 2, "score": 1.0, "strength": 1.0, "center": -1.0}
    assert found["in_quotes"].top[0].to_json() == expected
    best = found["line_position"].top[0]
    assert (best.state, best.unit, best.score) == ("h", 1, pytest.approx(1.0))
    assert found["bracket_depth"].skipped == "constant on this text"
    assert "indent_depth" not in found  # prose: the code features are not asked


# ---- real tiny models ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-lstm", "tiny-gru"])
def test_finder_on_a_tiny_model(models_dir: Path, corpus_file: Path, tmp_path: Path, name: str) -> None:
    model = tmp_path / name
    shutil.copytree(models_dir / name, model)
    out = tmp_path / "report"
    report = cells.write_report(model, [str(corpus_file)], out, max_chars=3000, top=4)
    assert (out / "report.json").is_file() and (out / "index.html").is_file()
    assert json.loads((model / cells.CELLS_FILE).read_text()) == report  # the copy the service serves
    states = ["h", "c"] if name == "tiny-lstm" else ["h"]
    assert report["model"]["states"] == states
    assert report["model"]["units"] == 2 * 48 * len(states)
    assert 2000 < report["text"]["chars"] <= 3000  # the last 3,000 characters, from a line start
    by_name = {f["name"]: f for f in report["features"]}
    assert report["text"]["kind"] == "prose"
    assert set(by_name) == {f.name for f in cells.FEATURES.values() if "prose" in f.texts}
    assert by_name["bracket_depth"]["skipped"] == "constant on this text"  # no brackets in Shakespeare
    for feature in ("line_position", "line_start", "in_word", "upper_run"):
        top = by_name[feature]["top"]
        assert len(top) == 4
        assert [t["strength"] for t in top] == sorted((t["strength"] for t in top), reverse=True)
        assert all(t["state"] in states and 0 <= t["layer"] < 2 and 0 <= t["unit"] < 48 for t in top)
        assert (out / f"{feature}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Even a model trained for seconds knows where lines start.
    assert by_name["line_start"]["top"][0]["strength"] > 0.9
    page = (out / "index.html").read_text()
    assert "<script" not in page and "http" not in page  # self-contained, nothing fetched
    assert page.count("<pre>") == 3 * sum(1 for f in report["features"] if "top" in f)


@pytest.mark.slow
def test_the_units_values_are_the_graphs_states(models_dir: Path) -> None:
    """Stepping keeps exactly the h_out/c_out the graph returns after each character."""
    session, info, _ = cells.open_model(models_dir / "tiny-lstm")
    text = "ROMEO:\nAy."
    acts = cells.run_states(session, info, text, keep_logits=True)
    ids = np.array([[info.vocab_index[ch] for ch in text]], np.int64)
    zeros = np.zeros((2, 1, 48), np.float32)
    logits, h, c = session.run(None, {"tokens": ids, "h": zeros, "c": zeros})
    assert np.allclose(acts.values[cells.UnitGroup(1, "h")][-1], h[1, 0], atol=1e-5)
    assert np.allclose(acts.values[cells.UnitGroup(0, "c")][-1], c[0, 0], atol=1e-5)
    assert acts.logits is not None and np.allclose(acts.logits, logits[0], atol=1e-4)


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from charstream_cli import main

    assert main(["cells", str(tmp_path / "nope"), "--data", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("charstream cells: error:") and err.count("\n") == 1
