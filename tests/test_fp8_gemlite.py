"""The FP8 (fp8, fp8-channel) and gemlite-int4 paths on CPU: the quantization math their
correctness checks rely on (torch's float8_e4m3fn emulation), byte counts, options, and why
they skip where they cannot run. Their kernels run in tests/test_gpu_paths.py."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch

from dqprof import bytemodel
from dqprof.errors import DqprofError
from dqprof.kernels import backend_names, create
from dqprof.kernels import fp8 as fp8mod
from dqprof.kernels import gemlite as glmod
from dqprof.models.config import load_config
from dqprof.models.shapes import LinearShape, linear_shapes
from dqprof.sweep import REL_TOL

SHAPES = {s.name: s for s in linear_shapes(load_config("gemma-4-e4b"))}
QUANTIZED = [s for s in SHAPES.values() if s.quantized]
NEW = ("gemlite-int4", "fp8", "fp8-channel")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def per_tensor_state(w: torch.Tensor) -> fp8mod.Fp8State:
    """fp8's weight as vLLM's dynamic_scaled_fp8_quant leaves it (amax / 448), in torch."""
    scale = (w.float().abs().amax() / fp8mod.FP8_MAX).reshape(1)
    q = (w.float() / scale).clamp(-fp8mod.FP8_MAX, fp8mod.FP8_MAX).to(torch.float8_e4m3fn)
    return fp8mod.Fp8State(q.t(), scale)


def emulated_call(st: fp8mod.Fp8State, x: torch.Tensor) -> torch.Tensor:
    """What the CUDA path computes: fp8 x fp8 products summed in fp32, scaled, bf16 out."""
    xq, xs = fp8mod.quantize_per_token(x)
    acc = xq.float() @ st.weight.float()
    ws = st.weight_scale.reshape(1, -1)
    return (acc * xs * ws).to(torch.bfloat16)


# -- FP8 ---------------------------------------------------------------------------------------
def test_activation_rounding_exceeds_the_sweep_tolerance_so_the_reference_includes_it():
    """fp8 e4m3 keeps 3 mantissa bits: on Gaussian activations the per-token quantized product
    sits ~2.6 % from x @ W, over REL_TOL; with the activation quantized in the reference only
    bf16 output rounding is left."""
    torch.manual_seed(0)
    shape = SHAPES["mlp.down_proj"]
    w = (torch.randn(shape.n, shape.k) * 0.02).to(torch.bfloat16)
    st = per_tensor_state(w)
    b = create("fp8")
    for m in (1, 7, 64):
        x = torch.randn(m, shape.k).to(torch.bfloat16)
        out = emulated_call(st, x)
        plain = x.float() @ b.reference(st).t()
        assert 0.015 < rel(out, plain) < 0.04  # the activation rounding, not a bug
        assert rel(out, plain) > REL_TOL
        assert rel(out, b.expected(st, x)) < REL_TOL / 5


def test_per_token_quantization_is_vllms():
    x = torch.tensor([[0.5, -2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3e-3, 1e-3, -7e-3, 0.0]])
    q, s = fp8mod.quantize_per_token(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 1) and s.dtype == torch.float32
    assert float(s[0]) == pytest.approx(2.0 / 448)
    assert float(q[0, 1].float()) == -448.0  # each row's amax lands on the fp8 maximum
    assert float(s[1]) == pytest.approx(fp8mod.MIN_SCALE)  # zero row: floor scale, no NaN
    assert torch.all(q[1].float() == 0)
    back = q.float() * s
    assert torch.isfinite(back).all() and rel(back, x) < 0.05


@pytest.mark.parametrize("name", ("fp8", "fp8-channel"))
def test_fp8_reference_dequantizes_the_stored_layout(name):
    torch.manual_seed(1)
    shape = LinearShape("t", "t", 96, 128, (96,), ("t",), 1)
    w = (torch.randn(96, 128) * 0.02).to(torch.bfloat16)
    if name == "fp8-channel":
        w[5] *= 40  # one loud row: per-channel scales keep the quiet rows precise
        st = create(name).prepare(w, shape)  # pure torch: no vLLM needed for the weight
        assert st.weight_scale.shape == (96, 1)
    else:
        st = per_tensor_state(w)
    assert st.weight.shape == (128, 96) and st.weight.stride() == (1, 128)  # [k, n] col major
    ref = create(name).reference(st)
    assert ref.shape == (96, 128) and ref.dtype == torch.float32
    assert rel(ref, w) < 0.04
    if name == "fp8-channel":
        quiet = torch.arange(96) != 5
        assert rel(ref[quiet], w[quiet]) < 0.04
        clone = create(name).clone(st)
        assert clone.weight.stride() == st.weight.stride()
        assert clone.weight.data_ptr() != st.weight.data_ptr()
        assert torch.equal(clone.weight.float(), st.weight.float())


def test_fp8_byte_model_counts_the_activation_round_trip():
    shape = SHAPES["mlp.gate_up_proj"]
    n, k, m = shape.n, shape.k, 16
    bf16 = bytemodel.bf16_gemm(m, n, k)
    t = create("fp8").traffic(shape, m)
    c = create("fp8-channel").traffic(shape, m)
    assert 2 * t.weight == bf16.weight == 2 * n * k
    assert t.scales == 4 and c.scales == 4 * n
    assert t.act_in == bf16.act_in and t.act_out == bf16.act_out
    # the quantize kernel writes m x k fp8 and m fp32 scales, the GEMM reads both back
    assert t.intermediate == 2 * (m * k + 4 * m)
    assert t.total == t.weight + t.scales + t.act_in + t.act_out + t.intermediate
    assert create("fp8").resident_bytes(shape) == n * k + 4
    assert create("fp8").flops(shape, m) == 2 * m * n * k


# -- gemlite-int4 ------------------------------------------------------------------------------
def test_hqq_rtn_codes_and_the_kernels_dequantization():
    torch.manual_seed(2)
    w = (torch.randn(64, 256) * 0.02).to(torch.bfloat16)
    q, s, z = glmod.quantize_hqq_rtn(w)
    assert q.dtype == torch.uint8 and q.shape == (64, 256)
    assert s.shape == z.shape == (64, 4) and s.dtype == z.dtype == torch.bfloat16
    groups = q.reshape(64, 4, 64)
    assert int(groups.amin(-1).max()) == 0 and int(groups.amax(-1).min()) == 15  # min/max RTN
    ref = glmod.dequantize_gemlite(q, s, z)
    assert rel(ref, w) < 0.12  # 4 bits, group 64
    # gemlite's FMA form (q * s + bf16(-z * s)) is HQQ's (q - z) * s up to one bf16 rounding
    hqq = (q.float() - z.float().repeat_interleave(64, 1)) * s.float().repeat_interleave(64, 1)
    assert rel(ref, hqq) < 5e-3


def test_hqq_rtn_flat_group_stays_finite():
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    w[1] = 0.5
    q, s, z = glmod.quantize_hqq_rtn(w)
    ref = glmod.dequantize_gemlite(q, s, z)
    assert torch.isfinite(ref).all()
    assert float((ref - w.float()).abs().max()) < 1e-2


def test_gemlite_byte_model_is_int4_with_group_64_scales_and_zeros():
    shape = SHAPES["mlp.down_proj"]
    n, k = shape.n, shape.k
    t = create("gemlite-int4").traffic(shape, 1)
    assert t.weight == n * k // 2
    assert t.scales == 2 * 2 * n * (k // 64)  # bf16 scale and bf16 (-zero * scale) per group
    marlin = bytemodel.int4_grouped(1, n, k, None)
    assert t.scales == 4 * marlin.scales  # twice the groups, and zeros as well as scales
    assert t.intermediate == 0


def test_gemlite_tune_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("DQPROF_CACHE_DIR", str(tmp_path))
    assert glmod.cache_path("NVIDIA H200") == tmp_path / "gemlite" / "nvidia_h200.json"
    monkeypatch.delenv("DQPROF_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert glmod.cache_path("NVIDIA H100 80GB HBM3") == (
        tmp_path / "xdg" / "dqprof" / "gemlite" / "nvidia_h100_80gb_hbm3.json")


def test_gemlite_tune_cache_loads_once_and_saves_as_it_grows(monkeypatch, tmp_path):
    monkeypatch.setenv("DQPROF_CACHE_DIR", str(tmp_path))
    calls: list[tuple[str, str]] = []
    fake = types.SimpleNamespace(
        load_config=lambda f, print_error=True: calls.append(("load", f)),
        cache_config=lambda f: calls.append(("save", f)) or open(f, "w").write("{}"))
    monkeypatch.setitem(sys.modules, "gemlite", fake)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    exits: list = []
    monkeypatch.setattr(glmod.atexit, "register", exits.append)
    path = tmp_path / "gemlite" / "nvidia_h200.json"

    cache = glmod._TuneCache()
    cache.open(fake, torch.device("cpu"))
    assert calls == [] and exits == [cache.save]  # nothing to load yet; saved at exit
    cache.open(fake, torch.device("cpu"))  # the next weight: what was tuned so far is kept
    assert calls == [("save", str(path))] and json.loads(path.read_text()) == {}

    second = glmod._TuneCache()  # a later sweep on the same GPU reads it back
    second.open(fake, torch.device("cpu"))
    assert calls[-1] == ("load", str(path))

    # a machine without its own table starts from the bundled one of its GPU model
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    (bundled / "nvidia_h200.json").write_text("{}")
    monkeypatch.setattr(glmod, "BUNDLED_DIR", bundled)
    monkeypatch.setenv("DQPROF_CACHE_DIR", str(tmp_path / "fresh"))
    third = glmod._TuneCache()
    third.open(fake, torch.device("cpu"))
    assert calls[-1] == ("load", str(bundled / "nvidia_h200.json"))


@pytest.mark.parametrize("k, ok", ((2560, True), (256, True), (96, False), (100, False)))
def test_gemlite_shape_rule(k, ok):
    shape = LinearShape("t", "t", 512, k, (512,), ("t",), 1)
    reason = create("gemlite-int4").supports(shape)
    assert (reason is None) == ok
    if not ok:
        assert "K % 64" in reason and str(k) in reason


# -- all three: registration, options, skips -------------------------------------------------
def test_registered_in_the_default_order():
    names = backend_names()
    assert [n for n in names if n in NEW] == list(NEW)
    assert names.index("triton-nf4") < names.index("gemlite-int4")


def test_options():
    assert create("gemlite-int4").variant == ""
    assert create("gemlite-int4[tune_cache=false]").variant == "tune_cache=False"
    with pytest.raises(DqprofError, match="no option"):
        create("fp8[per_channel=true]")


@pytest.mark.parametrize("name", NEW)
def test_every_quantized_gemma_shape_is_supported_and_lm_head_is_not(name):
    b = create(name)
    assert all(b.supports(s) is None for s in QUANTIZED)
    assert "stays bf16" in b.supports(SHAPES["lm_head"])


@pytest.mark.parametrize("name, package", (("fp8", "vllm"), ("fp8-channel", "vllm"),
                                           ("gemlite-int4", "gemlite")))
def test_missing_package_is_a_skip_reason(monkeypatch, name, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod == package else real(mod, *a))
    assert create(name).unavailable("cuda") == f"python package '{package}' is not installed"
    assert "runs on cuda only" in create(name).unavailable("cpu")


@pytest.mark.parametrize("cap, ok", (((8, 0), False), ((8, 6), False), ((8, 9), True),
                                     ((9, 0), True), ((10, 0), True)))
def test_fp8_needs_fp8_tensor_cores(monkeypatch, cap, ok):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: object() if mod == "vllm" else real(mod, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    for name in ("fp8", "fp8-channel"):
        reason = create(name).unavailable("cuda")
        assert (reason is None) == ok
        if not ok:
            assert "8.9" in reason and f"{cap[0]}.{cap[1]}" in reason
