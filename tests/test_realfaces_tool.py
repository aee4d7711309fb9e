"""tools/realfaces.py --quick on the real LFW: every row through the real commands, at a size a
test affords, and the markdown it writes; a missing --lfw folder is one line."""

import re
from importlib.util import find_spec

import pytest

from cli import UserError
from tests.conftest import REAL_LFW
from tools import realfaces


def expected(name: str) -> str:
    """What a row's first measured cell holds: a percentage, or why the row cannot run here."""
    if name == "eigenfaces" and find_spec("sklearn") is None:
        return "not available: needs scikit-learn"
    return r"\d+\.\d%"


def test_quick_run_writes_every_requested_row_with_numbers(tmp_path):
    if not REAL_LFW.is_dir():
        pytest.skip(f"LFW absent (expected it at {REAL_LFW})")
    out = tmp_path / "bench.md"
    assert realfaces.main(["--lfw", str(REAL_LFW), "--quick", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    text = out.read_text()
    assert "[realfaces.md](realfaces.md)" in text and "--quick" in text
    assert "not measured yet" not in text and "not in this run" not in text
    for name in realfaces.ROWS:
        row = re.search(rf"^\| {name} \| [^\n]*$", text, re.MULTILINE)
        assert row, f"no row {name} in\n{text}"
        first = row.group().split(" | ")[2]
        assert re.match(expected(name), first), row.group()
        if re.match(r"\d", first):  # measured: every cell a number, the minutes included
            assert all(re.match(r"\d", cell) for cell in row.group().strip("| ").split(" | ")[2:]), row.group()
    assert text.count("20 people;") == 2  # both splits, cut to --quick's people


def test_an_arcface_row_needs_its_ce_row_and_a_missing_lfw_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        realfaces.parse_args(["--lfw", "x", "--rows", "verify-arcface"])  # fine-tunes verify-ce's checkpoint
    assert "fine-tunes the checkpoint of verify-ce" in capsys.readouterr().err
    with pytest.raises(UserError, match="nowhere: no images") as error:
        realfaces.main(["--lfw", str(tmp_path / "nowhere"), "--out", str(tmp_path / "bench.md")])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "bench.md").exists()


def test_rows_picks_the_rows_measured_and_the_others_say_so(tmp_path):
    if not REAL_LFW.is_dir():
        pytest.skip(f"LFW absent (expected it at {REAL_LFW})")
    out = tmp_path / "bench.md"
    realfaces.main(["--lfw", str(REAL_LFW), "--quick", "--rows", "eigenfaces", "--out", str(out)])
    rows = dict(re.findall(r"^\| (\S+) \| .*? \| ([^|]*) \|", out.read_text(), re.MULTILINE))
    assert list(rows) == ["row", *realfaces.ROWS]  # every row, those not asked for saying so
    assert {name for name, first in rows.items() if first == "not in this run's --rows"} == set(realfaces.ROWS) - {"eigenfaces"}
