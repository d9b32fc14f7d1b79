"""The finder's report on real tiny models, and the command's errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from exports import contract
from interpret import write_report
from interpret.features import FEATURES


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-lstm", "tiny-gru"])
def test_finder_on_a_tiny_model(models_dir: Path, corpus_file: Path, tmp_path: Path, name: str) -> None:
    model = tmp_path / name
    shutil.copytree(models_dir / name, model)
    out = tmp_path / "report"
    report = write_report(model, [str(corpus_file)], out, max_chars=3000, top=4)
    assert (out / "report.json").is_file() and (out / "index.html").is_file()
    assert json.loads((model / contract.CELLS_FILE).read_text()) == report  # the copy the service serves
    states = ["h", "c"] if name == "tiny-lstm" else ["h"]
    assert report["model"]["states"] == states
    assert report["model"]["units"] == 2 * 48 * len(states)
    assert 2000 < report["text"]["chars"] <= 3000  # the last 3,000 characters, from a line start
    by_name = {f["name"]: f for f in report["features"]}
    assert report["text"]["kind"] == "prose"
    assert set(by_name) == {f.name for f in FEATURES.values() if "prose" in f.texts}
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


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from charstream_cli import main

    assert main(["cells", str(tmp_path / "nope"), "--data", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("charstream cells: error:") and err.count("\n") == 1
