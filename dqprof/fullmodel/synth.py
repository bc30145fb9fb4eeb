"""Random-weight Gemma 4 checkpoints with the real config: bf16, or int4 RTN as GPTQ / AWQ.

Weights are normal(0, std) (0.02 by default, the models' init scale), norms and layer_scalar
ones; each tensor has its own seed (seed + crc32(name)), so a tensor is the same in every
format and every ``--layers`` cut that keeps it. int4 formats quantize exactly those bf16
values (``packing``), so bf16, GPTQ and AWQ checkpoints of one seed hold the same model.

What is quantized and what is not is ``layout``'s table (see its docstring); config.json
repeats it under ``dqprof_synth`` and, for vLLM, in quantization_config
(``modules_in_block_to_quantize`` for GPTQ, ``modules_to_not_convert`` for AWQ. Left empty,
vLLM 0.20.2 derives AWQ's list from the tensor dtypes: each layer's bf16 ``layer_scalar``
makes ``model.layers.{i}`` a module "not to convert", and AWQ matches that list by substring,
so every linear of every layer would be loaded as bf16 and the int4 tensors would not fit).

Shards hold at most ``shard_bytes`` (4 GB) except where one tensor is larger
(embed_tokens_per_layer of E4B, 5.6 GB, gets a shard of its own, as transformers does).
The full E4B in bf16 is about 15 GB; ``--layers`` and ``--vocab`` shrink it for tests.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dqprof.errors import DqprofError
from dqprof.fullmodel.layout import (
    FORMATS,
    GROUP,
    Linear,
    TensorSpec,
    check_gemma4,
    linear_modules,
    linear_tensors,
    other_tensors,
)
from dqprof.fullmodel.packing import quantize_pack
from dqprof.fullmodel.stio import ShardWriter
from dqprof.models.config import load_config

SHARD_BYTES = 4 * 10**9
CHUNK_ELEMS = 1 << 26  # rows generated per randn call stay under this many fp32 values
QUANTIZED_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                     "per_layer_input_gate", "per_layer_projection", "per_layer_model_projection")
UNQUANTIZED = ("model.embed_tokens", "model.embed_tokens_per_layer", "lm_head (tied to "
               "embed_tokens)", "all norms", "layer_scalar")
INDEX = "model.safetensors.index.json"


@dataclass
class SynthOptions:
    fmt: str = "bf16"
    layers: int | None = None  # None: the config's
    vocab: int | None = None  # None: the config's (tests shrink it)
    kv_shared: int | None = None  # None: scaled from the config, kept valid
    seed: int = 0
    std: float = 0.02
    device: str = "cpu"
    shard_bytes: int = SHARD_BYTES
    shared_kv_weights: bool = True
    force: bool = False


@dataclass
class Unit:
    """One generated source tensor and the checkpoint tensors it becomes."""

    source: TensorSpec
    outputs: list[TensorSpec]
    linear: Linear | None = None

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)


@dataclass
class SynthResult:
    path: str
    name: str
    format: str
    layers: int
    vocab: int
    kv_shared: int
    shards: list[str] = field(default_factory=list)
    total_bytes: int = 0


# -- config --------------------------------------------------------------------------------

def kv_shared_valid(types: list[str], shared: int) -> bool:
    """vLLM needs a non-shared layer of the same type before every shared layer."""
    first = len(types) - shared
    return 0 <= shared < len(types) and all(t in types[:first] for t in types[first:])


def synth_fields(base: dict[str, Any], layers: int | None = None, vocab: int | None = None,
                 kv_shared: int | None = None) -> dict[str, Any]:
    """The base text config cut to ``layers`` / ``vocab``, with consistent layer_types."""
    fields = {k: v for k, v in base.items() if not k.startswith("_")}
    base_types = list(fields["layer_types"])
    n_base = len(base_types)
    n = layers or n_base
    if n < 1:
        raise DqprofError(f"--layers must be at least 1 (got {n})")
    if n != n_base:
        # the base pattern, cycled; the last layer is full attention, as in the real model
        # (transformers forces that too), so a cut model still runs both head sizes
        types = [base_types[i % n_base] for i in range(n)]
        types[-1] = "full_attention"
        fields["layer_types"], fields["num_hidden_layers"] = types, n
    types = fields["layer_types"]
    base_shared = base.get("num_kv_shared_layers") or 0
    if kv_shared is None:
        shared = round(n * base_shared / n_base)
        while shared and not kv_shared_valid(types, shared):
            shared -= 1
    elif not kv_shared_valid(types, kv_shared):
        raise DqprofError(f"--kv-shared {kv_shared} is not valid for layer_types {types}: "
                          f"each shared layer needs an earlier unshared layer of its type")
    else:
        shared = kv_shared
    fields["num_kv_shared_layers"] = shared
    if vocab:
        fields["vocab_size"] = vocab
        fields["vocab_size_per_layer_input"] = vocab
        for tok in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(fields.get(tok), int) and fields[tok] >= vocab:
                raise DqprofError(f"--vocab {vocab} is below {tok} {fields[tok]}")
    return fields


def quantization_config(fmt: str) -> dict[str, Any] | None:
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": True,
                "desc_act": False, "checkpoint_format": "gptq", "lm_head": False,
                "modules_in_block_to_quantize": list(QUANTIZED_MODULES)}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": ["model.embed_tokens",
                                                              "model.embed_tokens_per_layer",
                                                              "lm_head"]}
    return None


def config_json(fields: dict[str, Any], name: str, opts: SynthOptions, source: str
                ) -> dict[str, Any]:
    raw = {**fields, "_name_or_path": name, "architectures": ["Gemma4ForCausalLM"],
           "model_type": "gemma4_text", "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    qc = quantization_config(opts.fmt)
    if qc:
        raw["quantization_config"] = qc
    raw["dqprof_synth"] = {
        "note": "random weights for profiling; not a trained model",
        "source_config": source, **{k: v for k, v in asdict(opts).items() if k != "force"},
        "quantized": list(QUANTIZED_MODULES) if qc else [],
        "unquantized": list(UNQUANTIZED) + ([] if qc else ["every linear (bf16 checkpoint)"]),
    }
    return raw


# -- tensors -------------------------------------------------------------------------------

def tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)


def source_tensor(spec: TensorSpec, seed: int, std: float, device: str) -> torch.Tensor:
    """The bf16 values of ``spec`` (a weight, or the source of a quantized linear)."""
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=torch.bfloat16, device=device)
    gen = torch.Generator(device=device).manual_seed(tensor_seed(seed, spec.name))
    rows, cols = spec.shape[0], math.prod(spec.shape[1:])
    out = torch.empty(rows, cols, dtype=torch.bfloat16, device=device)
    step = max(1, CHUNK_ELEMS // cols)  # fp32 draws in chunks: PLE's table is 2.8 G values
    for r in range(0, rows, step):
        chunk = torch.randn(min(step, rows - r), cols, generator=gen, device=device)
        out[r:r + chunk.shape[0]] = chunk * std
    return out.reshape(spec.shape)


def plan_units(fields: dict[str, Any], fmt: str, shared_kv_weights: bool = True) -> list[Unit]:
    units = [Unit(s, [s]) for s in other_tensors(fields, shared_kv_weights)]
    for lin in linear_modules(fields, shared_kv_weights):
        src = TensorSpec(f"{lin.name}.weight", (lin.n, lin.k), "BF16", "normal")
        units.append(Unit(src, linear_tensors(lin, fmt), lin))
    return units


def plan_shards(units: list[Unit], shard_bytes: int) -> list[list[Unit]]:
    """Consecutive units, a new shard when the next would pass ``shard_bytes``."""
    shards: list[list[Unit]] = []
    size = 0
    for u in units:
        if not shards or (size + u.nbytes > shard_bytes and size > 0):
            shards.append([])
            size = 0
        shards[-1].append(u)
        size += u.nbytes
    return shards


def unit_tensors(u: Unit, fmt: str, seed: int, std: float, device: str
                 ) -> list[tuple[str, torch.Tensor]]:
    w = source_tensor(u.source, seed, std, device)
    if u.linear is None or fmt == "bf16":
        return [(u.outputs[0].name, w)]
    packed, _ = quantize_pack(w, fmt)
    return [(o.name, packed[o.name.rsplit(".", 1)[1]]) for o in u.outputs]


# -- writing -------------------------------------------------------------------------------

def _prepare_dir(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        ours = [p for p in out.iterdir() if p.name in ("config.json", "generation_config.json")
                or p.name.startswith("model") and ".safetensors" in p.name]
        if not force:
            raise DqprofError(f"{out} is not empty: pass --force to overwrite a checkpoint "
                              f"there")
        for p in ours:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def synthesize(model: str, out: Path, opts: SynthOptions,
               progress: Callable[[int, int, str], None] | None = None) -> SynthResult:
    """Write a random-weight checkpoint of ``model`` (bundled name or config) to ``out``."""
    if opts.fmt not in FORMATS:
        raise DqprofError(f"unknown format '{opts.fmt}' (formats: {', '.join(FORMATS)})")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise DqprofError("--device cuda: no CUDA GPU here (use --device cpu)")
    cfg = load_config(model)
    check_gemma4(cfg.fields)
    fields = synth_fields(cfg.fields, opts.layers, opts.vocab, opts.kv_shared)
    check_gemma4(fields)
    changed = (fields["num_hidden_layers"], fields["vocab_size"]) != (
        cfg.get("num_hidden_layers"), cfg.get("vocab_size"))
    name = (f"{cfg.name}-L{fields['num_hidden_layers']}-V{fields['vocab_size']}" if changed
            else cfg.name)
    units = plan_units(fields, opts.fmt, opts.shared_kv_weights)
    shards = plan_shards(units, opts.shard_bytes)
    total = sum(u.nbytes for u in units)
    out = Path(out)
    _prepare_dir(out, opts.force)
    free = shutil.disk_usage(out).free
    if free < total * 1.02:
        raise DqprofError(f"{out}: {total / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    result = SynthResult(str(out), name, opts.fmt, fields["num_hidden_layers"],
                         fields["vocab_size"], fields["num_kv_shared_layers"], total_bytes=total)
    weight_map: dict[str, str] = {}
    done = 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(out / fname, [o for u in shard for o in u.outputs])
        for u in shard:
            for tname, t in unit_tensors(u, opts.fmt, opts.seed, opts.std, opts.device):
                writer.write(tname, t)
                weight_map[tname] = fname
            done += 1
            if progress:
                progress(done, len(units), u.source.name)
        writer.close()
        result.shards.append(fname)
    # index and config last: a killed synth leaves no checkpoint that looks complete
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    # what save_pretrained writes beside the config; vLLM reads it for default sampling
    gen = {k: fields[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in fields}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1) + "\n")
    raw = config_json(fields, name, opts, cfg.source)
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(raw, indent=1) + "\n")
    os.replace(tmp, out / "config.json")
    return result
