"""The notebooks run top to bottom on the offline path, and are committed without outputs."""

import json
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
# What the tests run with, injected after a notebook's "parameters" cell as papermill does: the whole notebook, on
# fewer rows and steps (what it shows is a user's run; that it runs top to bottom is the test's).
QUICK = {"01_quickstart": "num_rows = 300\nepochs = 1", "02_lora_vs_full": "num_rows = 200\nmax_steps = 12",
         "04_preference_tuning": "num_rows = 200\nsft_steps = 4\nsteps = 2"}


def test_the_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_lora_vs_full", "03_reproduce_reference",
                                           "04_preference_tuning"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_outputs_are_stripped(path):
    notebook = json.loads(path.read_text())
    dirty = [i for i, cell in enumerate(notebook["cells"])
             if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; strip them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes_offline(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    if path.stem in QUICK:
        tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: one cell tagged 'parameters'"
        notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(QUICK[path.stem]))
    # Run in a scratch folder so outputs/ does not land in the repo.
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
