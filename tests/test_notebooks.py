"""Every notebook under notebooks/ runs top to bottom from notebooks/ (as CI executes them), its
first code cell installing the repository where `llm` is not importable (Colab)."""

import os
import pathlib

import nbclient
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_from_notebooks_dir(path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    setup = next(cell for cell in notebook.cells if cell.cell_type == "code")
    first = setup.source
    assert 'importlib.util.find_spec("llm") is None' in first and "pip" in first, first
    assert "REPO = pathlib.Path(llm.__file__).resolve().parents[1]" in first
    # The kernel imports this checkout (not another installed copy); paths must not need the cwd.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    printed = "".join(o.get("text", "") for o in setup.outputs)
    assert printed.strip() == f"llm from {REPO}"
