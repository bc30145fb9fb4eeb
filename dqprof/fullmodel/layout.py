"""The tensors of a Gemma 4 text checkpoint, derived from its config: names, shapes, dtypes.

One table serves the synthetic writer, the tests and the runner's pre-flight check. Names are
transformers' Gemma4ForCausalLM (``model.layers.{i}.self_attn.q_proj.weight``,
``model.embed_tokens_per_layer.weight``, ...), which vLLM 0.20.2's Gemma4ForCausalLM reads
(it strips ``language_model.`` so multimodal checkpoints map onto the same names).

Quantized (GPTQ/AWQ): every linear vLLM builds with the quant config: q/k/v/o_proj,
gate/up/down_proj, per_layer_input_gate, per_layer_projection (each layer) and
model.per_layer_model_projection. Kept bf16: embed_tokens (and the lm_head tied to it: vLLM's
ParallelLMHead stays unquantized unless ``lm_head`` is set), embed_tokens_per_layer
(an embedding gather, not a GEMM), every norm and layer_scalar.

KV-shared layers (the last ``num_kv_shared_layers``): transformers builds no k_proj, v_proj,
k_norm there and lists exactly those names in ``_keys_to_ignore_on_load_unexpected``, so the
released checkpoints carry them. vLLM builds qkv_proj and k_norm on every layer; its bf16
loader is strict (k_norm.weight must be in the checkpoint) and its bitsandbytes path sizes the
fused qkv output from the shards it quantized (a missing k/v shard breaks the q/k/v split).
So the layout includes them by default (``shared_kv_weights=False`` leaves them out).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dqprof.errors import DqprofError

GROUP = 128  # int4 group size of the GPTQ/AWQ checkpoints written here
PACK = 8  # int4 values per int32
FORMATS = ("bf16", "gptq", "awq")
GEMMA4_TYPES = ("gemma4_text", "gemma4")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "post_per_layer_input_norm")
# vLLM's Gemma4ForCausalLM skips these when it loads a multimodal checkpoint's text model
MULTIMODAL_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.",
                       "model.embed_audio.", "vision_tower.", "audio_tower.")


@dataclass(frozen=True)
class Linear:
    """One linear module as the checkpoint stores it (unfused): weight [n, k]."""

    name: str  # module prefix, e.g. model.layers.0.self_attn.q_proj
    n: int  # out_features
    k: int  # in_features
    layer: int | None  # decoder layer index, None for model-level modules


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype: BF16, F16, I32
    init: str  # how synth fills it: normal (std), ones, or derived (from a quantized linear)

    @property
    def nbytes(self) -> int:
        size = {"BF16": 2, "F16": 2, "I32": 4, "F32": 4}[self.dtype]
        n = 1
        for d in self.shape:
            n *= d
        return n * size


def _get(fields: dict[str, Any], key: str) -> Any:
    value = fields.get(key)
    if value is None:
        raise DqprofError(f"Gemma 4 config lacks '{key}'")
    return value


def check_gemma4(fields: dict[str, Any]) -> None:
    if fields.get("model_type") not in GEMMA4_TYPES:
        raise DqprofError(f"model_type '{fields.get('model_type')}' is not Gemma 4: synthetic "
                          f"checkpoints and the pre-flight check cover gemma4_text only")
    for flag in ("enable_moe_block", "use_double_wide_mlp", "attention_k_eq_v"):
        if fields.get(flag):
            raise DqprofError(f"Gemma 4 config sets {flag}: not supported here (E2B/E4B "
                              f"layouts only)")
    if len(_get(fields, "layer_types")) != _get(fields, "num_hidden_layers"):
        raise DqprofError("layer_types and num_hidden_layers disagree")


def first_shared_layer(fields: dict[str, Any]) -> int:
    return fields["num_hidden_layers"] - (fields.get("num_kv_shared_layers") or 0)


def linear_modules(fields: dict[str, Any], shared_kv_weights: bool = True) -> list[Linear]:
    """Every linear module of the checkpoint, in file order."""
    check_gemma4(fields)
    hidden, heads = _get(fields, "hidden_size"), _get(fields, "num_attention_heads")
    kv_heads, inter = _get(fields, "num_key_value_heads"), _get(fields, "intermediate_size")
    ple = fields.get("hidden_size_per_layer_input") or 0
    layers = fields["num_hidden_layers"]
    first_shared = first_shared_layer(fields)
    out: list[Linear] = []
    for i, kind in enumerate(fields["layer_types"]):
        hd = head_dim(fields, kind)
        p = f"model.layers.{i}"
        out.append(Linear(f"{p}.self_attn.q_proj", heads * hd, hidden, i))
        if shared_kv_weights or i < first_shared:
            out += [Linear(f"{p}.self_attn.k_proj", kv_heads * hd, hidden, i),
                    Linear(f"{p}.self_attn.v_proj", kv_heads * hd, hidden, i)]
        out += [Linear(f"{p}.self_attn.o_proj", hidden, heads * hd, i),
                Linear(f"{p}.mlp.gate_proj", inter, hidden, i),
                Linear(f"{p}.mlp.up_proj", inter, hidden, i),
                Linear(f"{p}.mlp.down_proj", hidden, inter, i)]
        if ple:
            out += [Linear(f"{p}.per_layer_input_gate", ple, hidden, i),
                    Linear(f"{p}.per_layer_projection", hidden, ple, i)]
    if ple:
        out.append(Linear("model.per_layer_model_projection", ple * layers, hidden, None))
    return out


def head_dim(fields: dict[str, Any], layer_type: str) -> int:
    if layer_type == "full_attention":
        return fields.get("global_head_dim") or _get(fields, "head_dim")
    return _get(fields, "head_dim")


def other_tensors(fields: dict[str, Any], shared_kv_weights: bool = True) -> list[TensorSpec]:
    """Embeddings, norms and scalars: never quantized."""
    hidden, vocab = _get(fields, "hidden_size"), _get(fields, "vocab_size")
    ple = fields.get("hidden_size_per_layer_input") or 0
    layers = fields["num_hidden_layers"]
    first_shared = first_shared_layer(fields)
    out = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), "BF16", "normal")]
    if ple:
        ple_vocab = fields.get("vocab_size_per_layer_input") or vocab
        out += [TensorSpec("model.embed_tokens_per_layer.weight", (ple_vocab, ple * layers),
                           "BF16", "normal"),
                TensorSpec("model.per_layer_projection_norm.weight", (ple,), "BF16", "ones")]
    for i, kind in enumerate(fields["layer_types"]):
        p, hd = f"model.layers.{i}", head_dim(fields, kind)
        out.append(TensorSpec(f"{p}.self_attn.q_norm.weight", (hd,), "BF16", "ones"))
        if shared_kv_weights or i < first_shared:
            out.append(TensorSpec(f"{p}.self_attn.k_norm.weight", (hd,), "BF16", "ones"))
        norms = LAYER_NORMS if ple else LAYER_NORMS[:-1]
        out += [TensorSpec(f"{p}.{n}.weight", (hidden,), "BF16", "ones") for n in norms]
        out.append(TensorSpec(f"{p}.layer_scalar", (1,), "BF16", "ones"))
    out.append(TensorSpec("model.norm.weight", (hidden,), "BF16", "ones"))
    if not fields.get("tie_word_embeddings", True):
        out.append(TensorSpec("lm_head.weight", (vocab, hidden), "BF16", "normal"))
    return out


def linear_tensors(lin: Linear, fmt: str) -> list[TensorSpec]:
    """The tensors one linear module becomes in format ``fmt``."""
    n, k = lin.n, lin.k
    if fmt == "bf16":
        return [TensorSpec(f"{lin.name}.weight", (n, k), "BF16", "normal")]
    if k % GROUP or n % PACK:
        raise DqprofError(f"{lin.name}: {n}x{k} does not fit int4 group {GROUP} packing")
    g = k // GROUP
    if fmt == "gptq":  # packed along k; g_idx maps each input row to its group
        return [TensorSpec(f"{lin.name}.qweight", (k // PACK, n), "I32", "derived"),
                TensorSpec(f"{lin.name}.qzeros", (g, n // PACK), "I32", "derived"),
                TensorSpec(f"{lin.name}.scales", (g, n), "F16", "derived"),
                TensorSpec(f"{lin.name}.g_idx", (k,), "I32", "derived")]
    if fmt == "awq":  # packed along n in AWQ's interleaved nibble order
        return [TensorSpec(f"{lin.name}.qweight", (k, n // PACK), "I32", "derived"),
                TensorSpec(f"{lin.name}.qzeros", (g, n // PACK), "I32", "derived"),
                TensorSpec(f"{lin.name}.scales", (g, n), "F16", "derived")]
    raise DqprofError(f"unknown checkpoint format '{fmt}' (formats: {', '.join(FORMATS)})")


def expected_tensors(fields: dict[str, Any], fmt: str, shared_kv_weights: bool = True
                     ) -> dict[str, TensorSpec]:
    specs = other_tensors(fields, shared_kv_weights)
    for lin in linear_modules(fields, shared_kv_weights):
        specs += linear_tensors(lin, fmt)
    return {s.name: s for s in specs}


def checkpoint_format(raw_config: dict[str, Any]) -> str:
    """bf16, gptq or awq, from config.json's quantization_config."""
    qc = raw_config.get("quantization_config") or (raw_config.get("text_config") or {}).get(
        "quantization_config")
    if not qc:
        return "bf16"
    method = str(qc.get("quant_method", "")).lower()
    if method in ("gptq", "awq"):
        return method
    raise DqprofError(f"checkpoint quant_method '{method}' is not one dqprof runs "
                      f"(bf16, gptq, awq)")


# -- reading a checkpoint's tensor table without loading it ------------------------------

def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """A safetensors file's header: {name: {dtype, shape, data_offsets}} (no metadata)."""
    try:
        with Path(path).open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DqprofError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header


def checkpoint_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} of a checkpoint folder (sharded with an index, or one file)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise DqprofError(f"{index}: unreadable index ({e})") from e
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise DqprofError(f"{folder}: no model.safetensors(.index.json): not a checkpoint, "
                          f"or an interrupted synth")
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in files:
        if not (folder / name).exists():
            raise DqprofError(f"{folder}: the index names {name}, which is missing")
        for key, info in read_header(folder / name).items():
            out[key] = (tuple(info["shape"]), info["dtype"])
    return out
