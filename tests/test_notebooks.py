"""The analysis notebooks: stored without outputs, and they run (on a small synthetic run)."""

from __future__ import annotations

from pathlib import Path

import analysis_fixtures as fx
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
REQUIRED = ("dequant_tax.ipynb", "roofline.ipynb", "per_layer_breakdown.ipynb")


def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_required_notebooks_exist():
    assert set(REQUIRED) <= {p.name for p in _notebooks()}


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return fx.write_run(tmp_path_factory.mktemp("nb") / "run", fx.records(fx.TINY))


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_notebook_runs(path, small_run, monkeypatch):
    monkeypatch.setenv("DQPROF_RUN", str(small_run))  # the kernel inherits it
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS.parent)}})
    client.execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no figure"
