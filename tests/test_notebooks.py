"""The analysis notebooks: stored without outputs, and they run (on a small synthetic run)."""

from __future__ import annotations

from pathlib import Path

import analysis_fixtures as fx
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
REQUIRED = ("dequant_tax.ipynb", "roofline.ipynb", "per_layer_breakdown.ipynb",
            "full_model.ipynb")


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


def _model_record(quant: str, batch: int, j: float) -> dict:
    from dqprof.fullmodel.records import base_record

    return {**base_record("tiny", quant, "decode", 128, 512, batch), "status": "ok",
            "engine": {"max_num_batched_tokens": 8192}, "idle_power_w": 100.0,
            "j_per_output_token": j,
            "decode": {"j_per_token": j, "j_per_token_above_idle": j / 2, "s_per_token": 0.01,
                       "tokens_per_s": 100.0 / j},
            "prefill": {"j_per_token": j / 10, "j_per_token_above_idle": j / 20,
                        "s_per_token": 1e-3}}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from dqprof.fullmodel.records import ModelRecordWriter

    backends = (*fx.BACKENDS, "triton-nf4", "tinygemm-int4")  # the format/path split's paths
    run = fx.write_run(tmp_path_factory.mktemp("nb") / "run",
                       fx.records(fx.TINY, backends=backends), fx.run_info(model=fx.TINY))
    with ModelRecordWriter(run) as w:  # the full-model notebook's vLLM results
        for quant, j in (("bf16", 2.0), ("bitsandbytes", 2.4), ("dqprof_nf4", 1.8),
                         ("gptq_marlin", 1.5)):
            w.write(_model_record(quant, 1, j))
    return run


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
