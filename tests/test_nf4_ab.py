"""scripts/nf4_ab.py: which specs the GPU A/B times after its tests, and its table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dqprof.kernels import parse_backends

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "nf4_ab.py"
_spec = importlib.util.spec_from_file_location("nf4_ab", SCRIPT)
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)

SPECS = ["bf16", "triton-nf4", "triton-nf4[decode=table4]", "triton-nf4[decode=shfl]",
         "triton-nf4[decode=shfl,block_n=16]"]


@pytest.mark.parametrize(("text", "decode"), [
    ("test_gpu_gemma_shapes[triton-nf4[decode=shfl]-mlp.gate_up_proj-1]", "shfl"),
    ("test_gpu_gemma_shapes[triton-nf4[decode=shfl,stats=fp16]-mlp.down_proj-4]", "shfl"),
    ("test_gpu_cuda_graph_capture[table4-1]", "table4"),
    ("test_gpu_identity_gives_the_bf16_weight[shfl-nested]", "shfl"),
    ("test_gpu_bitsandbytes_bytes[table-mlp.down_proj-1]", "table"),
    ("test_gpu_gemma_shapes[triton-nf4[stats=fp16]-mlp.down_proj-1]", "table"),
    ("triton-nf4[block_n=16,decode=shfl]", "shfl"),
    ("triton-nf4", "table"),
])
def test_decode_of(text: str, decode: str) -> None:
    assert ab.decode_of(text) == decode


def _junit(path: Path, failing: list[str], passing: list[str]) -> Path:
    cases = [f'<testcase name="{n}"><failure message="x"/></testcase>' for n in failing]
    cases += [f'<testcase name="{n}"/>' for n in passing]
    path.write_text(f"<testsuites><testsuite>{''.join(cases)}</testsuite></testsuites>")
    return path


def test_a_failing_decode_is_not_timed(tmp_path: Path) -> None:
    xml = _junit(tmp_path / "t.xml", ["test_gpu_identity_gives_the_bf16_weight[shfl-fp16]"],
                 ["test_gpu_cuda_graph_capture[table4-1]", "test_x[triton-nf4-a-1]"])
    kept = ab.passed(xml, SPECS)
    assert kept == ["bf16", "triton-nf4", "triton-nf4[decode=table4]"]
    # what the script hands the bench parses back into those backends
    assert [b.variant for b in parse_backends(",".join(kept))] == ["", "", "decode=table4"]
    every = ab.passed(_junit(tmp_path / "ok.xml", [], ["test_x[shfl-1]"]), SPECS)
    assert every == SPECS
    # no results (the tests were cut short): the bench's own fp32 check is the gate
    assert ab.passed(tmp_path / "missing.xml", SPECS) == SPECS


def test_table(tmp_path: Path) -> None:
    def rec(backend: str, variant: str, m: int, us: float | None) -> str:
        r = {"backend": backend, "variant": variant, "layer": "mlp.gate_up_proj", "m": m,
             "status": "ok" if us else "failed"}
        if us:
            r["time"] = {"median_s": us * 1e-6}
        return json.dumps(r)

    path = tmp_path / "kernels.jsonl"
    path.write_text("\n".join([
        rec("triton-nf4", "", 1, 27.0), rec("triton-nf4", "decode=shfl", 1, 13.5),
        rec("triton-nf4", "block_n=16,decode=shfl", 1, None), rec("bf16", "", 1, 30.0),
        rec("triton-nf4", "", 2, 40.0), rec("triton-nf4", "decode=shfl", 2, 10.0)]))
    text = ab.table([path], ["bf16", "triton-nf4", "triton-nf4[decode=shfl]",
                             "triton-nf4[decode=shfl,block_n=16]"])
    lines = text.splitlines()
    assert lines[0].split()[2:] == ["bf16", "nf4", "nf4[shfl]", "nf4[bn16,shfl]"]
    assert lines[1].split()[1:] == ["1", "30.00", "27.00", "13.50", "fail"]
    assert "nf4[shfl]: M=1: 2.00x, M=2: 4.00x" in text
    assert "nf4[bn16,shfl]: no common points" in text


def test_table_with_energy(tmp_path: Path) -> None:
    path = tmp_path / "kernels.jsonl"
    path.write_text("\n".join(json.dumps({
        "backend": b, "variant": "", "layer": "mlp.down_proj", "m": 4096, "status": "ok",
        "time": {"median_s": us * 1e-6}, "energy": e}) for b, us, e in (
            ("bf16", 264.0, {"j_per_call": 0.2154}), ("triton-nf4", 290.0, None))))
    row = ab.table([path], ["bf16", "triton-nf4"], energy=True).splitlines()[1]
    assert row.split()[1:] == ["4096", "264.00", "(215)", "290.00", "(-)"]
