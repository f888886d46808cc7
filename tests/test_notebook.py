"""Executes notebooks/oto_quickstart.ipynb end to end in a fresh kernel of this interpreter."""

import sys
from pathlib import Path

import pytest


nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "oto_quickstart.ipynb"


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "store the notebook without outputs"


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The `python3` kernel spec starts `python -m ipykernel_launcher`; jupyter_client replaces `python` with
    # sys.executable, so the kernel runs in this environment. Its working directory and its temporary folders (the
    # notebook's `tempfile.mkdtemp`) are in tmp_path.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    client = nbclient.NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError with the traceback if a cell fails

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [output for cell in code_cells for output in cell.outputs if output.output_type == "error"]
    assert not errors, errors
    assert all(cell.execution_count is not None for cell in code_cells)

    def text(cell) -> str:
        return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")

    assert "group sparsity:" in "".join(text(cell) for cell in code_cells)
    assert list(tmp_path.glob("oto-quickstart-*/pruned/model.safetensors")), "the slim model is saved under TMPDIR"
    assert text(code_cells[-1]).strip().endswith("outputs equal: True"), text(code_cells[-1])


def test_kernel_is_this_interpreter():
    """Guards the assumption above: the notebook must run with the interpreter (and hf_oto) of the tests."""
    from jupyter_client.manager import KernelManager

    manager = KernelManager(kernel_name="python3")
    command = manager.format_kernel_cmd()
    assert command[0] == sys.executable or Path(command[0]).resolve() == Path(sys.executable).resolve(), command
