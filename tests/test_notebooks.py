"""The notebooks at the repo root are stored without outputs and run by `make test`.

pytest.ini collects them with nbmake, which executes each from a clean kernel; these tests keep the
stored files clean. `python tests/test_notebooks.py` clears the outputs of every root notebook.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("*.ipynb"))


def dirty_cells(notebook: dict) -> list[int]:
    """Indices of the code cells that hold outputs or an execution count."""
    return [
        index for index, cell in enumerate(notebook["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]


def test_the_notebooks_are_there():
    assert {"train_example.ipynb", "Tests.ipynb"} <= {path.name for path in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = json.loads(path.read_text())
    dirty = dirty_cells(notebook)
    assert not dirty, (
        f"{path.name}: code cells {dirty} hold outputs or execution counts; clear them with "
        f"`.venv/bin/python tests/test_notebooks.py` (or Jupyter's Clear All Outputs) before committing"
    )
    # nbmake starts the kernel the notebook names; python3 is the one of the interpreter running pytest
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"


def clear_outputs(path: Path) -> None:
    notebook = json.loads(path.read_text())
    for index in dirty_cells(notebook):
        notebook["cells"][index].update(outputs=[], execution_count=None)
    for cell in notebook["cells"]:
        cell.get("metadata", {}).pop("execution", None)  # timings some front ends record
    path.write_text(json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    for path in NOTEBOOKS:
        clear_outputs(path)
        print(f"cleared {path.relative_to(ROOT)}", file=sys.stderr)
