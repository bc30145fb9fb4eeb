"""int4 RTN and the GPTQ / AWQ packings: exact round trips and vLLM's bit layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dqprof.fullmodel import packing as P


def _weight(n: int = 192, k: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)


# Reference packers copied from vLLM 0.20.2 (model_executor/layers/quantization/utils/
# quant_utils.py: pack_rows = gptq_pack, pack_cols, awq_pack), the layout its loaders read.
def _vllm_pack_rows(q: np.ndarray) -> np.ndarray:
    k, n = q.shape
    res = np.zeros((k // 8, n), dtype=np.uint32)
    for i in range(8):
        res |= q[i::8, :].astype(np.uint32) << (4 * i)
    return res.astype(np.int32)


def _vllm_pack_cols(q: np.ndarray) -> np.ndarray:
    k, n = q.shape
    res = np.zeros((k, n // 8), dtype=np.uint32)
    for i in range(8):
        res |= q[:, i::8].astype(np.uint32) << (4 * i)
    return res.astype(np.int32)


def _vllm_awq_pack(q: np.ndarray) -> np.ndarray:
    k, n = q.shape
    q = q.reshape((-1, 8))[:, np.array([0, 2, 4, 6, 1, 3, 5, 7])].ravel().reshape((-1, n))
    return _vllm_pack_cols(q)


def test_rtn_sym_is_gptq_uint4b8() -> None:
    w = _weight()
    r = P.rtn_sym(w)
    assert r.scales.dtype == torch.float16 and r.codes.dtype == torch.uint8
    assert int(r.codes.max()) <= 15 and torch.all(r.zeros == 8)
    err = (r.dequantize() - w.float()).abs()
    step = r.scales.float().repeat_interleave(128, dim=1)
    # half a step of rounding; a full step only where the group's extreme hits the clamp
    assert torch.all(err <= step + 1e-7)
    assert float((err > step * 0.5 + 1e-7).float().mean()) < 0.01


def test_rtn_asym_covers_each_group() -> None:
    w = _weight(seed=1)
    r = P.rtn_asym(w)
    deq = r.dequantize()
    step = r.scales.float().repeat_interleave(128, dim=1)
    err = (deq - w.float()).abs()
    assert torch.all(err <= step + 1e-7)
    assert float((err > step * 0.5 + 1e-7).float().mean()) < 0.01
    assert int(r.zeros.max()) <= 15


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_pack_unpack_is_exact(fmt: str) -> None:
    w = _weight(n=256, k=384, seed=2)
    tensors, r = P.quantize_pack(w, fmt)
    if fmt == "gptq":
        u = P.unpack_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                          tensors["g_idx"])
        assert tensors["qweight"].shape == (384 // 8, 256)
        assert tensors["g_idx"].tolist() == [i // 128 for i in range(384)]
    else:
        u = P.unpack_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"])
        assert tensors["qweight"].shape == (384, 256 // 8)
    assert tensors["qzeros"].shape == (3, 256 // 8) and tensors["scales"].shape == (3, 256)
    assert all(t.dtype == torch.int32 for k, t in tensors.items() if k != "scales")
    assert torch.equal(u.codes, r.codes) and torch.equal(u.zeros.to(torch.uint8), r.zeros)
    assert torch.equal(u.dequantize(), r.dequantize())


def test_gptq_bits_match_vllm_layout() -> None:
    r = P.rtn_sym(_weight(n=64, k=256, seed=3))
    t = P.pack_gptq(r)
    assert np.array_equal(t["qweight"].numpy(), _vllm_pack_rows(r.codes.t().numpy()))
    # v1 checkpoints store zero - 1: 7 in every nibble for symmetric int4
    assert np.array_equal(t["qzeros"].numpy(),
                          _vllm_pack_cols(r.zeros.t().numpy().astype(np.int64) - 1))
    assert set(t["qzeros"].flatten().tolist()) == {0x77777777}


def test_awq_bits_match_vllm_layout() -> None:
    r = P.rtn_asym(_weight(n=64, k=256, seed=4))
    t = P.pack_awq(r)
    assert np.array_equal(t["qweight"].numpy(), _vllm_awq_pack(r.codes.t().numpy()))
    assert np.array_equal(t["qzeros"].numpy(), _vllm_awq_pack(r.zeros.t().numpy()))


def test_awq_nibble_order_by_hand() -> None:
    # one row, columns 0..7 hold codes 0..7: nibble p holds column AWQ_ORDER[p]
    codes = torch.arange(8, dtype=torch.uint8)[:, None].repeat(1, 128)  # [n=8, k=128]
    r = P.Rtn(codes, torch.ones(8, 1, dtype=torch.float16), torch.zeros(8, 1, dtype=torch.uint8))
    packed = P.pack_awq(r)["qweight"]  # [k=128, n/8=1]
    assert packed[0, 0].item() == 0x75316420
    packed = P.pack_gptq(r)["qweight"]  # [k/8=16, n=8]: column j holds code j in all nibbles
    assert [packed[0, j].item() for j in range(8)] == [0x11111111 * j for j in range(8)]


def test_sign_bit_wraps_to_negative_int32() -> None:
    r = P.Rtn(torch.full((8, 128), 15, dtype=torch.uint8), torch.ones(8, 1, dtype=torch.float16),
              torch.zeros(8, 1, dtype=torch.uint8))
    q = P.pack_gptq(r)["qweight"]
    assert q.dtype == torch.int32 and torch.all(q == -1)
    assert torch.equal(P.unpack_gptq(q, P.pack_gptq(r)["qzeros"], r.scales.t()).codes, r.codes)
