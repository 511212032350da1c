"""The Colab notebook: it only imports and calls, it is committed without outputs, and it runs end to end in
smoke mode on real images without a warning."""

from __future__ import annotations

import ast
import base64
import json
import re
from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).resolve().parents[1] / "colab" / "resnet18_cifar10.ipynb"
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def code_cells() -> list[str]:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def python_of(source: str) -> str:
    """The cell without IPython magics/shell lines (kept as ``pass`` so indentation stays valid)."""
    return re.sub(r"^(\s*)[%!].*$", r"\1pass", source, flags=re.M)


def test_notebook_defines_nothing_and_imports_jaxcifar():
    sources = code_cells()
    assert sources
    for index, source in enumerate(sources):
        tree = ast.parse(python_of(source))
        defined = [type(node).__name__ for node in ast.walk(tree) if isinstance(node, DEFINITIONS)]
        assert not defined, f"code cell {index} defines {defined}"
    imported = {
        alias.name.split(".")[0]
        for source in sources
        for node in ast.walk(ast.parse(python_of(source)))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert "jaxcifar" in imported
    assert any("jaxcifar.fit(" in source for source in sources)
    assert any("make_report(" in source for source in sources)


def test_committed_notebook_has_no_outputs():
    """Saved outputs would show the machine that ran it (temporary paths, versions) and go stale with the
    next release: the notebook is committed clean (no outputs, counts, run times or Python version)."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"code cell {index} has saved outputs"
            assert "execution" not in cell.metadata, f"code cell {index} keeps its run times"
    assert "version" not in notebook.metadata.get("language_info", {})
    assert "/tmp/" not in NOTEBOOK.read_text(encoding="utf-8")


def test_notebook_runs_in_smoke_mode_on_real_images(shared_data_dir, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("JAXCIFAR_SMOKE", "1")
    monkeypatch.setenv("JAXCIFAR_DATA_DIR", str(shared_data_dir))
    monkeypatch.setenv("JAXCIFAR_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # the kernel compiles faster; numbers unchecked
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, errors
    pngs = [base64.b64decode(out["data"]["image/png"]) for out in outputs if "image/png" in out.get("data", {})]
    workdir = tmp_path / "run"
    expected = {name: (workdir / f"{name}.png").read_bytes() for name in ("curves", "misclassified", "gradcam", "cam")}
    for name, data in expected.items():
        assert data in pngs, f"the notebook did not display {name}.png"
    summary = json.loads((workdir / "report.json").read_text())
    assert len(summary["misclassified"]) == 10  # the gallery and the Grad-CAM figure show these 10
    assert summary["layer"] == "layer3, 8x8"
    assert list(summary["cam"]["methods"]) == ["gradcam++", "layercam"]  # the cam.png rows, in this order
    for metrics in summary["cam"]["methods"].values():
        assert len(metrics["road_morf"]["per_image"]) == 10
    text = "".join(out.get("text", "") for out in outputs)
    assert "smoke mode: True" in text and "final test accuracy:" in text
    assert "ROAD most relevant first" in text
    stderr = "".join(out.get("text", "") for out in outputs if out.get("name") == "stderr")
    assert not re.search("warn", stderr, re.I), stderr  # orbax's read-only notices, tqdm's missing ipywidgets
    assert len(json.loads((workdir / "history.json").read_text())) == 1
