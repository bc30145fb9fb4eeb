"""GPU tests: every backend on real Gemma 4 shapes, the energy meter, a short sweep.

Run on the GPU machine: ``pytest -m gpu``. They skip cleanly without CUDA.
"""

from __future__ import annotations

import json

import pytest
import torch

from dqprof.kernels import backend_names, create
from dqprof.models.config import load_config
from dqprof.models.shapes import linear_shapes
from dqprof.sweep import REL_TOL, Sweep, SweepConfig, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES = {s.name: s for s in linear_shapes(load_config("gemma-4-e4b"))}
QUANTIZED = ("bnb-nf4", "bnb-dequant", "marlin-gptq", "marlin-awq", "machete-gptq", "machete-awq",
             "tinygemm-int4", "triton-nf4")


@pytest.mark.parametrize("backend", ("bf16",) + QUANTIZED)
@pytest.mark.parametrize("layer", ("sliding.qkv_proj", "mlp.down_proj", "ple.per_layer_projection"))
@pytest.mark.parametrize("m", (1, 16, 600))
def test_backend_matches_reference(backend: str, layer: str, m: int) -> None:
    if backend not in backend_names():
        pytest.skip(f"{backend} is not registered")
    b = create(backend)
    if why := b.unavailable("cuda"):
        pytest.skip(why)
    shape = SHAPES[layer]
    assert b.supports(shape) is None
    w = (torch.randn(shape.n, shape.k, device="cuda") * 0.02).to(torch.bfloat16)
    state = b.prepare(w, shape)
    x = torch.randn(m, shape.k, device="cuda", dtype=torch.bfloat16)
    err = rel_error(b(state, x), b.expected(state, x))
    assert err <= REL_TOL
    # the quantized weight is close to the source weight (4-bit: about 10% error)
    ref = b.reference(state)
    assert float((ref - w.float()).norm() / w.float().norm()) < 0.2


def test_wrong_backend_is_caught() -> None:
    """A path returning wrong numbers must fail the check, not be timed."""
    b = create("bf16")
    shape = SHAPES["mlp.down_proj"]
    state = b.prepare(torch.randn(shape.n, shape.k, device="cuda").to(torch.bfloat16), shape)
    x = torch.randn(4, shape.k, device="cuda", dtype=torch.bfloat16)
    wrong = b(state, x).roll(1, dims=1)
    assert not rel_error(wrong, b.expected(state, x)) <= REL_TOL


def _copy_replay():
    """(NVML, a replay of a copy far past L2, its timing): a copy stays under the power cap,
    so sustained and burst speed agree."""
    from dqprof.measure.nvml import open_nvml
    from dqprof.measure.timing import Replay, time_replay

    nvml, why = open_nvml(0)
    if nvml is None or not nvml.energy_supported:
        pytest.skip(why or "no energy counter")
    src = torch.randn(64 << 20, device="cuda")
    dst = torch.empty_like(src)
    replay = Replay([lambda: dst.copy_(src)], "cuda")
    return nvml, replay, time_replay(replay, 5)


def test_energy_counter_ticks() -> None:
    from dqprof.measure.energy import measure_energy

    nvml, replay, t = _copy_replay()
    e = measure_energy(replay, nvml, t.median_s, 0.5, None, None)
    assert e.flag is None, e
    assert e.ticks >= 3 and e.calls > 0 and e.j_per_call > 0
    assert e.gpu_idle_frac is not None and e.gpu_idle_frac < 0.02, e
    # calls counted in the window agree with the timed median
    assert abs(e.s_per_call_in_window / t.median_s - 1) < 0.1, (e, t)


def test_energy_window_on_the_counters_period() -> None:
    """The sweep's reader thread, with a few seconds of history: the counter's period is
    bounded and the window placed on it, with the GPU kept fed."""
    import time

    from dqprof.measure.energy import TickReader, measure_energy

    nvml, replay, t = _copy_replay()
    reader = TickReader(nvml.energy_mj).start()
    try:
        time.sleep(3.0)
        e = measure_energy(replay, nvml, t.median_s, 1.0, None, None, reader=reader)
    finally:
        reader.stop()
    assert e.flag is None and e.reader == "thread", e
    assert e.period_s is not None and 0.005 < e.period_s[0] <= e.period_s[1] < 1.0, e
    assert e.tick_fit, e  # the counter updates on a period within 0.5 ms
    assert e.gpu_idle_frac < 0.02 and len(e.tick_log) > e.ticks, e


def test_short_sweep_records_everything(tmp_path) -> None:
    cfg = SweepConfig(shapes="mlp.down_proj", m=(1, 256), repeats=3, window_s=0.3,
                      backends="bf16,bnb-nf4,bnb-dequant,tinygemm-int4")
    counts = Sweep(cfg, tmp_path).run()
    assert counts["failed"] == 0
    recs = [json.loads(line) for line in (tmp_path / "kernels.jsonl").read_text().splitlines()]
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(ok) == 7
    for r in ok:
        assert r["method"]["timing"] == "cuda-graph"
        method = r["method"]
        assert method["rotation_bytes"] >= 3 * method["l2_bytes"] or method["rotation"] == 1
        assert r["kernels"], r["key"]
        assert set(r["wall_s"]) == {"check", "capture", "timing", "attribution", "energy"}
        assert r["gpu_state"]["sm_clock_mhz"]
    cats = {r["key"]: {k["category"] for k in r["kernels"]} for r in ok}
    assert any("dequant" in c for k, c in cats.items() if "bnb-dequant" in k)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["ceilings"]["copy_bytes_per_s"] > 0 and run["ceilings"]["bf16_flop_per_s"] > 0


def test_machete_is_timed_and_metered(tmp_path) -> None:
    """Machete stalled the GPU under the old chunked energy feeder (profiles/h200/machete/);
    under the batch-sync feeder it is metered like every path, without hanging."""
    b = create("machete-gptq")
    if why := b.unavailable("cuda"):
        pytest.skip(why)
    cfg = SweepConfig(shapes="mlp.down_proj", m=(1, 16), repeats=3, window_s=0.5,
                      backends="machete-gptq", point_timeout_s=60)
    assert Sweep(cfg, tmp_path).run()["ok"] == 2
    for r in (json.loads(line) for line in (tmp_path / "kernels.jsonl").read_text().splitlines()):
        assert r["method"]["timing"] == "cuda-graph" and r["time"]["median_s"] > 0
        e = r["energy"]
        assert e["feed"] == "batch-sync" and e["j_per_call"] > 0 and e["flag"] is None, e
        assert e["gpu_idle_frac"] < 0.02, e
