"""Every notebook in notebooks/ runs from a clean kernel without an error.

The kernel is ipykernel's ``python3``, started with this interpreter (checked:
a first cell, added here, fails if the kernel runs another Python), the
source tree first on its path, and the test session's environment, so under
``NUMBA_ENABLE_CUDASIM=1`` (set by conftest.py when there is no GPU) the
notebooks run the GPU kernels in the simulator. Matplotlib draws with Agg.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(
    path.relative_to(ROOT).as_posix() for path in NOTEBOOK_DIR.glob("*.ipynb")
)
CELL_TIMEOUT_S = 600


def test_there_are_notebooks():
    # An empty notebooks/ would make the test below pass by running nothing.
    assert NOTEBOOKS, f"no *.ipynb in {NOTEBOOK_DIR}"


def kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    # The kernel starts in notebooks/: import softkern from this source tree.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


def same_interpreter_cell() -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(
        "import sys\n"
        f"assert sys.prefix == {sys.prefix!r}, (\n"
        f"    'kernel python3 runs ' + sys.executable + ', not ' + {sys.executable!r}\n"
        ")"
    )


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_notebook_runs(path):
    nb = nbformat.read(ROOT / path, as_version=4)
    nb.cells.insert(0, same_interpreter_cell())
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str((ROOT / path).parent)}},
    )
    # Raises CellExecutionError, naming the cell and its traceback, on failure.
    client.execute(env=kernel_env())
