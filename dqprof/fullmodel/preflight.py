"""Check a checkpoint's tensors against its config before a vLLM engine is started.

vLLM reports a config/weights mismatch minutes into a start, deep in a loader traceback (or
not at all: a missing shard of a fused layer loads as uninitialized memory). Reading the
safetensors headers takes milliseconds and names the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqprof.errors import DqprofError
from dqprof.fullmodel.layout import (
    MULTIMODAL_PREFIXES,
    checkpoint_format,
    checkpoint_tensors,
    first_shared_layer,
    linear_modules,
    linear_tensors,
    other_tensors,
)
from dqprof.models.config import load_config

FLOAT_DTYPES = {"BF16", "F16", "F32"}
SHOW = 5  # names listed in a message


@dataclass
class CheckpointInfo:
    path: str
    name: str
    format: str  # bf16, gptq, awq
    fields: dict[str, Any]  # the text config
    quantized: int = 0  # linear modules stored quantized
    unquantized_linears: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _normalize(name: str) -> str:
    # vLLM's Gemma4ForCausalLM maps a multimodal checkpoint's text model the same way
    return name.replace("model.language_model.", "model.")


def _shared_kv_name(name: str, first_shared: int) -> bool:
    if not name.startswith("model.layers."):
        return False
    layer = int(name.split(".")[2])
    return layer >= first_shared and any(f".self_attn.{m}." in name
                                         for m in ("k_proj", "v_proj", "k_norm"))


def verify_checkpoint(folder: Path) -> CheckpointInfo:
    """Raise DqprofError naming what disagrees; return what the checkpoint holds."""
    folder = Path(folder)
    cfg = load_config(folder)
    raw = json.loads((folder / "config.json").read_text())
    fmt = checkpoint_format(raw)
    fields = cfg.fields
    have = {_normalize(k): v for k, v in checkpoint_tensors(folder).items()
            if not k.startswith(MULTIMODAL_PREFIXES)}
    info = CheckpointInfo(str(folder), cfg.name, fmt, fields)
    first_shared = first_shared_layer(fields)
    missing, wrong, seen = [], [], set()

    def expect(spec_name: str, shape: tuple[int, ...], floats: bool) -> None:
        seen.add(spec_name)
        if spec_name not in have:
            missing.append(spec_name)
            return
        got_shape, got_dtype = have[spec_name]
        if got_shape != shape or (got_dtype in FLOAT_DTYPES) != floats:
            wrong.append(f"{spec_name}: {got_dtype}{list(got_shape)}, config implies "
                         f"{'float' if floats else 'int'}{list(shape)}")

    for spec in other_tensors(fields):
        expect(spec.name, spec.shape, True)
    for lin in linear_modules(fields):
        if f"{lin.name}.weight" in have or fmt == "bf16":
            expect(f"{lin.name}.weight", (lin.n, lin.k), True)
            if fmt != "bf16":
                info.unquantized_linears.append(lin.name)
            continue
        info.quantized += 1
        for spec in linear_tensors(lin, fmt):
            expect(spec.name, spec.shape, spec.dtype in FLOAT_DTYPES)
    seen.add("lm_head.weight")  # tied heads may still be stored; vLLM skips them
    shared = [m for m in missing if _shared_kv_name(m, first_shared)]
    missing = [m for m in missing if m not in shared]
    if shared:
        info.warnings.append(
            f"{len(shared)} k_proj/v_proj/k_norm tensors of KV-shared layers are absent "
            f"(e.g. {shared[0]}); vLLM builds them on every layer, so its strict bf16 loader "
            f"and its bitsandbytes q/k/v split may fail")
    unexpected = sorted(set(have) - seen)
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors the config implies are missing "
                        f"({', '.join(missing[:SHOW])})")
    if wrong:
        problems.append(f"{len(wrong)} tensors disagree with the config "
                        f"({'; '.join(wrong[:SHOW])})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the config does not explain "
                        f"({', '.join(unexpected[:SHOW])})")
    if problems:
        raise DqprofError(f"checkpoint {folder} does not match its config.json "
                          f"({fields['num_hidden_layers']} layers, vocab "
                          f"{fields.get('vocab_size')}, format {fmt}): " + "; ".join(problems))
    return info
