"""The quantization math the correctness checks rely on, against bitsandbytes and torch on CPU,
and the byte model's accounting."""

from __future__ import annotations

import pytest
import torch

from dqprof import bytemodel
from dqprof.kernels import create
from dqprof.kernels.nf4 import bnb_absmax, dequantize_nf4
from dqprof.kernels.tinygemm import dequantize_int4_grouped, quantize_int4_grouped
from dqprof.models.config import load_config
from dqprof.models.shapes import LinearShape, linear_shapes

bnbf = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("nested", (False, True))
def test_our_nf4_decoder_matches_bitsandbytes(nested: bool) -> None:
    w = torch.randn(384, 512) * 0.02
    packed, qs = bnbf.quantize_4bit(w.to(torch.bfloat16), blocksize=64, quant_type="nf4",
                                    compress_statistics=nested)
    ours = dequantize_nf4(packed, bnb_absmax(qs), tuple(qs.shape), qs.blocksize)
    theirs = bnbf.dequantize_4bit(packed, qs).float()
    # bitsandbytes rounds its output to bf16; ours stays fp32
    assert torch.allclose(ours, theirs, rtol=1e-2, atol=1e-6)
    assert float((ours - w).norm() / w.norm()) < 0.15


def test_int4_grouped_math_matches_torch_tinygemm_on_cpu() -> None:
    w = (torch.randn(256, 512) * 0.02).to(torch.bfloat16)
    q, scale, zero = quantize_int4_grouped(w)
    assert q.min() >= 0 and q.max() <= 15
    ref = dequantize_int4_grouped(q, scale, zero)
    assert float((ref - w.float()).norm() / w.float().norm()) < 0.15
    b = create("tinygemm-int4")
    shape = LinearShape("t", "t", 256, 512, (256,), ("t",), 1)
    state = b.prepare(w, shape)
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    y = b(state, x).float()
    exp = x.float() @ ref.t()
    assert float((y - exp).norm() / exp.norm()) < 1e-2


def test_bnb_backend_is_vllm_shaped() -> None:
    """One matmul_4bit per shard, results in shard order in the fused output; the statistics
    plain fp32 absmax, as vLLM's loader leaves them (it undoes bitsandbytes' nesting)."""
    b = create("bnb-nf4")
    shape = LinearShape("qkv", "attn.qkv", 384, 256, (256, 64, 64), ("q", "k", "v"), 1)
    w = (torch.randn(384, 256) * 0.02).to(torch.bfloat16)
    state = b.prepare(w, shape)
    assert [qs.shape[0] for _, qs in state] == [256, 64, 64]
    assert all(not qs.nested and qs.blocksize == 64 and qs.absmax.dtype == torch.float32
               for _, qs in state)
    # the same absmax bitsandbytes' nested form decodes to, block for block
    for (_, qs), start, size in zip(state, (0, 256, 320), (256, 64, 64), strict=True):
        _, nested = bnbf.quantize_4bit(w[start:start + size].contiguous(), blocksize=64,
                                       quant_type="nf4", compress_statistics=True)
        assert torch.allclose(qs.absmax, bnb_absmax(nested), rtol=1e-6)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    y = b(state, x).float()
    exp = b.expected(state, x)
    assert float((y - exp).norm() / exp.norm()) < 2e-2


def test_byte_model_accounts_for_the_tax() -> None:
    gate_up = {s.name: s for s in linear_shapes(load_config("gemma-4-e4b"))}["mlp.gate_up_proj"]
    n, k = gate_up.n, gate_up.k
    bf16 = bytemodel.bf16_gemm(1, n, k)
    fused = bytemodel.bnb_nf4_layer(1, gate_up.shards, k, fused=True)
    unfused = bytemodel.bnb_nf4_layer(1, gate_up.shards, k, fused=False)
    assert bf16.weight == 4 * fused.weight  # 16 bits vs 4 bits per weight
    # unfused: the dequantized bf16 weight is written then read back
    assert unfused.intermediate == 2 * bf16.weight
    assert unfused.total - fused.total == unfused.intermediate
    # every layer copies its result into the fused output once more (read + write)
    assert fused.act_out == 3 * 2 * n
    marlin = bytemodel.int4_grouped(1, n, k, None)
    awq = bytemodel.int4_grouped(1, n, k, "int4")
    assert awq.scales > marlin.scales and awq.weight == marlin.weight == n * k // 2
    dq = create("bnb-dequant").traffic(gate_up, 0)
    assert dq.intermediate == bf16.weight and create("bnb-dequant").flops(gate_up, 0) == 0
