"""Synthetic checkpoints: names and shapes from the config, exact int4 contents, pre-flight.

Only 2-layer, 4096-token checkpoints are written (about 0.4 GB bf16, 0.13 GB int4), once per
format for the whole module.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dqprof.cli import app
from dqprof.errors import DqprofError
from dqprof.fullmodel import layout
from dqprof.fullmodel.packing import quantize_pack, unpack_awq, unpack_gptq
from dqprof.fullmodel.preflight import verify_checkpoint
from dqprof.fullmodel.runner import check_quant
from dqprof.fullmodel.stio import read_tensors
from dqprof.fullmodel.synth import (
    SynthOptions,
    kv_shared_valid,
    source_tensor,
    synth_fields,
    synthesize,
)
from dqprof.models.config import load_config
from dqprof.models.shapes import linear_shapes

BASE = load_config("gemma-4-e4b").fields
LAYERS, VOCAB = 2, 4096


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for fmt in ("bf16", "gptq", "awq"):
        out[fmt] = root / fmt
        res = CliRunner().invoke(app, ["model", "synth", "gemma-4-e4b", "--format", fmt,
                                       "--layers", str(LAYERS), "--vocab", str(VOCAB),
                                       "--device", "cpu", "-o", str(out[fmt])])
        assert res.exit_code == 0, res.output
    return out


def _header_table(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    table = {}
    for fname in set(index["weight_map"].values()):
        for name, info in layout.read_header(folder / fname).items():
            assert index["weight_map"][name] == fname
            table[name] = (tuple(info["shape"]), info["dtype"])
    assert set(table) == set(index["weight_map"])
    return table


def _expected(cfg: dict, fmt: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Written out from the config here, independently of dqprof.fullmodel.layout."""
    h, inter, ple = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_size_per_layer_input"]
    layers, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    exp: dict[str, tuple[tuple[int, ...], str]] = {
        "model.embed_tokens.weight": ((vocab, h), "BF16"),
        "model.embed_tokens_per_layer.weight": ((cfg["vocab_size_per_layer_input"],
                                                 layers * ple), "BF16"),
        "model.per_layer_projection_norm.weight": ((ple,), "BF16"),
        "model.norm.weight": ((h,), "BF16"),
    }
    linears = {"model.per_layer_model_projection": (layers * ple, h)}
    for i, kind in enumerate(cfg["layer_types"]):
        hd = cfg["global_head_dim"] if kind == "full_attention" else cfg["head_dim"]
        p = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):
            exp[f"{p}.{norm}.weight"] = ((h,), "BF16")
        exp[f"{p}.self_attn.q_norm.weight"] = ((hd,), "BF16")
        exp[f"{p}.self_attn.k_norm.weight"] = ((hd,), "BF16")
        exp[f"{p}.layer_scalar"] = ((1,), "BF16")
        linears.update({f"{p}.self_attn.q_proj": (heads * hd, h),
                        f"{p}.self_attn.k_proj": (kv * hd, h),
                        f"{p}.self_attn.v_proj": (kv * hd, h),
                        f"{p}.self_attn.o_proj": (h, heads * hd),
                        f"{p}.mlp.gate_proj": (inter, h), f"{p}.mlp.up_proj": (inter, h),
                        f"{p}.mlp.down_proj": (h, inter),
                        f"{p}.per_layer_input_gate": (ple, h),
                        f"{p}.per_layer_projection": (h, ple)})
    for name, (n, k) in linears.items():
        if fmt == "bf16":
            exp[f"{name}.weight"] = ((n, k), "BF16")
        elif fmt == "gptq":
            exp.update({f"{name}.qweight": ((k // 8, n), "I32"),
                        f"{name}.qzeros": ((k // 128, n // 8), "I32"),
                        f"{name}.scales": ((k // 128, n), "F16"), f"{name}.g_idx": ((k,), "I32")})
        else:
            exp.update({f"{name}.qweight": ((k, n // 8), "I32"),
                        f"{name}.qzeros": ((k // 128, n // 8), "I32"),
                        f"{name}.scales": ((k // 128, n), "F16")})
    return exp


@pytest.mark.parametrize("fmt", ["bf16", "gptq", "awq"])
def test_names_and_shapes_follow_the_config(ckpts: dict[str, Path], fmt: str) -> None:
    cfg = json.loads((ckpts[fmt] / "config.json").read_text())
    assert cfg["num_hidden_layers"] == LAYERS and cfg["vocab_size"] == VOCAB
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"]
    assert cfg["num_kv_shared_layers"] == 0  # a full layer cannot share with a sliding one
    assert cfg["architectures"] == ["Gemma4ForCausalLM"] and cfg["model_type"] == "gemma4_text"
    assert _header_table(ckpts[fmt]) == _expected(cfg, fmt)


def test_quantization_config(ckpts: dict[str, Path]) -> None:
    g = json.loads((ckpts["gptq"] / "config.json").read_text())["quantization_config"]
    assert (g["quant_method"], g["bits"], g["group_size"], g["sym"], g["desc_act"]) == (
        "gptq", 4, 128, True, False)
    a = json.loads((ckpts["awq"] / "config.json").read_text())["quantization_config"]
    assert (a["quant_method"], a["bits"], a["group_size"], a["zero_point"], a["version"]) == (
        "awq", 4, 128, True, "gemm")
    # AWQ's skip list is matched by substring: it must not hit any quantized linear
    linears = [lin.name for lin in layout.linear_modules(load_config(ckpts["awq"]).fields)]
    assert not [n for n in linears for skip in a["modules_to_not_convert"] if skip in n]
    b = json.loads((ckpts["bf16"] / "config.json").read_text())
    assert "quantization_config" not in b and b["dqprof_synth"]["quantized"] == []


def test_config_round_trips_to_shapes(ckpts: dict[str, Path]) -> None:
    cfg = load_config(ckpts["bf16"])
    assert cfg.name == f"gemma-4-e4b-L{LAYERS}-V{VOCAB}"
    got = {s.name: s for s in linear_shapes(cfg)}
    full = {s.name: s for s in linear_shapes(load_config("gemma-4-e4b"))}
    types = cfg.get("layer_types")
    for name, s in got.items():
        ref = full[name]
        if name == "lm_head":
            assert (s.n, s.k) == (VOCAB, ref.k)
        elif name == "ple.per_layer_model_projection":
            assert (s.n, s.k) == (LAYERS * cfg.get("hidden_size_per_layer_input"), ref.k)
        else:
            assert (s.n, s.k, s.shards) == (ref.n, ref.k, ref.shards)
        expected_calls = {"sliding.qkv_proj": types.count("sliding_attention"),
                          "sliding.o_proj": types.count("sliding_attention"),
                          "full.qkv_proj": types.count("full_attention"),
                          "full.o_proj": types.count("full_attention")}.get(
            name, 1 if name in ("lm_head", "ple.per_layer_model_projection") else LAYERS)
        assert s.calls_per_token == expected_calls


@pytest.mark.parametrize("fmt", ["bf16", "gptq", "awq"])
def test_contents_are_the_seeded_source(ckpts: dict[str, Path], fmt: str) -> None:
    folder = ckpts[fmt]
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    lin = "model.layers.1.self_attn.k_proj"  # full layer: head_dim 512
    n, k = 2 * 512, 2560
    src = source_tensor(layout.TensorSpec(f"{lin}.weight", (n, k), "BF16", "normal"), 0, 0.02,
                        "cpu")
    assert abs(float(src.float().std()) - 0.02) < 1e-3
    if fmt == "bf16":
        t = read_tensors(folder / index[f"{lin}.weight"], [f"{lin}.weight"])
        assert torch.equal(t[f"{lin}.weight"], src)
        norm = read_tensors(folder / index["model.norm.weight"], ["model.norm.weight"])
        assert torch.all(norm["model.norm.weight"] == 1)
        return
    names = [s.name for s in layout.linear_tensors(layout.Linear(lin, n, k, 1), fmt)]
    t = read_tensors(folder / index[names[0]], names)
    _, rtn = quantize_pack(src, fmt)
    args = [t[f"{lin}.{x}"] for x in ("qweight", "qzeros", "scales")]
    unpacked = unpack_gptq(*args, t[f"{lin}.g_idx"]) if fmt == "gptq" else unpack_awq(*args)
    assert torch.equal(unpacked.dequantize(), rtn.dequantize())
    assert (unpacked.dequantize() - src.float()).abs().max() < 0.02


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                    reason="the safetensors package is not installed")
def test_files_read_with_the_safetensors_package(ckpts: dict[str, Path]) -> None:
    from safetensors import safe_open

    folder = ckpts["gptq"]
    fname = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.0.mlp.down_proj.qweight"]
    ours = read_tensors(folder / fname)
    with safe_open(str(folder / fname), framework="pt") as f:
        assert set(f.keys()) == set(ours)
        for name in ("model.layers.0.mlp.down_proj.qweight", "model.layers.0.mlp.down_proj.scales",
                     "model.embed_tokens.weight"):
            assert torch.equal(f.get_tensor(name), ours[name])


def test_preflight_accepts_and_rejects(ckpts: dict[str, Path], tmp_path: Path) -> None:
    info = verify_checkpoint(ckpts["gptq"])
    assert info.format == "gptq" and info.quantized == len(
        layout.linear_modules(info.fields)) and not info.warnings
    check_quant("gptq_marlin", info)
    with pytest.raises(DqprofError, match="awq checkpoint"):
        check_quant("awq_marlin", info)
    with pytest.raises(DqprofError, match="bf16 checkpoint.*GPTQ"):
        check_quant("bitsandbytes", info)
    # a config cut to one layer no longer explains the weights of layer 1
    bad = tmp_path / "bad"
    shutil.copytree(ckpts["gptq"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(num_hidden_layers=1, layer_types=["full_attention"])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DqprofError, match=r"does not match.*model\.layers\.1\."):
        verify_checkpoint(bad)
    # a bf16 config over int4 weights
    cfg.update(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DqprofError, match="missing"):
        verify_checkpoint(bad)
    (bad / "model.safetensors.index.json").unlink()
    with pytest.raises(DqprofError, match="no model.safetensors"):
        verify_checkpoint(bad)


def test_synth_refuses_a_used_folder(ckpts: dict[str, Path]) -> None:
    with pytest.raises(DqprofError, match="--force"):
        synthesize("gemma-4-e4b", ckpts["bf16"], SynthOptions(layers=1, vocab=512))


def test_synth_fields_cut_consistently() -> None:
    two = synth_fields(BASE, layers=2)
    assert two["layer_types"] == ["sliding_attention", "full_attention"]
    assert two["num_kv_shared_layers"] == 0
    twelve = synth_fields(BASE, layers=12)
    assert twelve["num_kv_shared_layers"] == 5 and kv_shared_valid(twelve["layer_types"], 5)
    full = synth_fields(BASE)
    assert full["num_kv_shared_layers"] == 18 and full["layer_types"] == BASE["layer_types"]
    with pytest.raises(DqprofError, match="not valid"):
        synth_fields(BASE, layers=6, kv_shared=1)  # the last (full) layer has no full source
    with pytest.raises(DqprofError, match="below"):
        synth_fields(BASE, vocab=2)


def test_layout_of_kv_shared_layers() -> None:
    fields = synth_fields(BASE, layers=12)
    with_kv = layout.expected_tensors(fields, "bf16")
    without = layout.expected_tensors(fields, "bf16", shared_kv_weights=False)
    dropped = set(with_kv) - set(without)
    first_shared = 12 - fields["num_kv_shared_layers"]
    assert dropped == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(first_shared, 12)
                       for m in ("k_proj", "v_proj", "k_norm")}
    full_model = layout.expected_tensors(BASE, "bf16")
    params = sum(torch.Size(s.shape).numel() for s in full_model.values())
    assert 7.0e9 < params < 8.5e9  # E4B text stack incl. PLE tables: ~7.5 G parameters


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed")
def test_transformers_reads_the_config_and_names(ckpts: dict[str, Path]) -> None:
    from transformers import AutoConfig

    try:
        from transformers import Gemma4ForCausalLM
    except ImportError:
        pytest.skip("this transformers has no Gemma 4")
    cfg = AutoConfig.from_pretrained(ckpts["bf16"])
    assert cfg.model_type == "gemma4_text" and cfg.num_hidden_layers == LAYERS
    with torch.device("meta"):
        model = Gemma4ForCausalLM(cfg)
    names = set(model.state_dict()) - {"lm_head.weight"}  # tied, never saved
    assert names == set(_header_table(ckpts["bf16"]))
    # with KV sharing, transformers drops exactly the k/v/k_norm tensors we keep for vLLM
    fields = synth_fields(BASE, layers=12, vocab=VOCAB)
    cfg12 = type(cfg)(**{k: v for k, v in fields.items() if k != "model_type"})
    with torch.device("meta"):
        names12 = set(Gemma4ForCausalLM(cfg12).state_dict()) - {"lm_head.weight"}
    ours = set(layout.expected_tensors(fields, "bf16", shared_kv_weights=False))
    assert names12 == ours
