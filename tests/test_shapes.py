"""Shapes derived from configs: Gemma 4 E4B as vLLM executes it, other families, bad input."""

from __future__ import annotations

import json

import pytest

from dqprof.errors import DqprofError
from dqprof.models.config import bundled_models, load_config
from dqprof.models.shapes import linear_shapes, select_shapes

GEMMA = load_config("gemma-4-e4b")


def by_name() -> dict:
    return {s.name: s for s in linear_shapes(GEMMA)}


def test_gemma4_layers_follow_the_config() -> None:
    cfg, s = GEMMA.fields, by_name()
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    sliding = cfg["layer_types"].count("sliding_attention")
    full = cfg["layer_types"].count("full_attention")
    assert sliding + full == cfg["num_hidden_layers"]
    for prefix, head_dim, count in (("sliding.", cfg["head_dim"], sliding),
                                    ("full.", cfg["global_head_dim"], full)):
        qkv = s[prefix + "qkv_proj"]
        assert qkv.shards == (heads * head_dim, kv * head_dim, kv * head_dim)
        assert (qkv.n, qkv.k) == (sum(qkv.shards), hidden)
        # vLLM builds qkv_proj on KV-shared layers too: every layer of the kind counts
        assert qkv.calls_per_token == count
        assert (s[prefix + "o_proj"].n, s[prefix + "o_proj"].k) == (hidden, heads * head_dim)
    gate_up = s["mlp.gate_up_proj"]
    assert gate_up.shards == (cfg["intermediate_size"],) * 2
    assert gate_up.calls_per_token == cfg["num_hidden_layers"]
    ple = cfg["hidden_size_per_layer_input"]
    assert (s["ple.per_layer_input_gate"].n, s["ple.per_layer_projection"].k) == (ple, ple)
    assert s["ple.per_layer_model_projection"].n == ple * cfg["num_hidden_layers"]
    head = s["lm_head"]
    assert (head.n, head.quantized, head.per_sequence) == (cfg["vocab_size"], False, True)


def test_dense_family_from_config_fields(tmp_path) -> None:
    cfg = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
           "num_hidden_layers": 3, "vocab_size": 500}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    s = {x.name: x for x in linear_shapes(load_config(tmp_path))}
    assert s["attn.qkv_proj"].shards == (128, 64, 64)
    assert s["mlp.down_proj"].k == 96 and s["mlp.down_proj"].calls_per_token == 3


def test_multimodal_config_uses_text_config(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4",
                                                      "text_config": GEMMA.fields}))
    assert [s.name for s in linear_shapes(load_config(tmp_path))] == list(by_name())


@pytest.mark.parametrize("fields, message", [
    ({"model_type": "mamba", "hidden_size": 8, "intermediate_size": 8, "num_attention_heads": 1,
      "num_hidden_layers": 1, "vocab_size": 8}, "not supported"),
    ({"model_type": "llama", "hidden_size": 8}, "lacks the fields intermediate_size"),
])
def test_unknown_architecture_names_what_it_lacks(tmp_path, fields, message) -> None:
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(DqprofError, match=message):
        linear_shapes(load_config(tmp_path))


def test_bad_model_inputs(tmp_path) -> None:
    with pytest.raises(DqprofError, match="unknown model"):
        load_config("no-such-model")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DqprofError, match="cannot read model config"):
        load_config(tmp_path)
    assert "gemma-4-e4b" in bundled_models()


def test_shape_filter() -> None:
    shapes = linear_shapes(GEMMA)
    assert {s.name for s in select_shapes(shapes, "gate_up,attn.o")} == {
        "mlp.gate_up_proj", "sliding.o_proj", "full.o_proj"}
    with pytest.raises(DqprofError, match="no shape matches"):
        select_shapes(shapes, "nothing")


def test_checkpoint_layout_agrees_with_the_shape_table() -> None:
    """The synthetic checkpoint's modules (unfused) and the executed shapes (fused) come from
    two derivations of one config: every shard of every fused shape must be a module of the
    checkpoint, as many times as the shape runs per token."""
    from collections import Counter

    from dqprof.fullmodel.layout import linear_modules

    modules = Counter((m.name.rsplit(".", 1)[-1], m.n, m.k)
                      for m in linear_modules(GEMMA.fields))
    for s in linear_shapes(GEMMA):
        if not s.quantized:
            continue  # lm_head is the tied embedding, not a module
        for shard, size in zip(s.shard_names, s.shards, strict=True):
            assert modules[(shard, size, s.k)] == s.calls_per_token, (s.name, shard)


def test_shape_rules_skip_with_a_reason() -> None:
    from dqprof.kernels import create
    from dqprof.models.shapes import LinearShape

    odd = LinearShape("odd", "odd", 100, 200, (100,), ("odd",), 1)
    assert "N % 64" in create("marlin-gptq").supports(odd)
    assert "K % 128" in create("tinygemm-int4").supports(odd)
    assert create("bf16").supports(odd) is None
