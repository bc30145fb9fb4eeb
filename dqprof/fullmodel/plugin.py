"""The vLLM plugin: quantization method ``dqprof_nf4`` (bitsandbytes' NF4, run by triton-nf4).

Entry point ``vllm.general_plugins`` -> ``register()`` (pyproject.toml); the worker also calls
``register()`` itself, because a source checkout on PYTHONPATH has no installed entry points.
``LLM(model=<bf16 checkpoint>, quantization="dqprof_nf4")`` then quantizes at load time to the
NF4 that ``quantization="bitsandbytes"`` produces and runs every quantized linear through
``TritonNf4`` (dqprof.kernels.triton_nf4; this module holds no kernel code) inside
``torch.ops.dqprof.nf4_linear`` (``nf4_op``), under torch.compile and CUDA graphs.

Same modules as vLLM 0.20.2's bitsandbytes path (model_executor/layers/quantization/
bitsandbytes.py and model_loader/bitsandbytes_loader.py): it quantizes every ``LinearBase``
whose quant method comes from the config and is not in ``llm_int8_skip_modules`` (matched per
dotted component or prefix, ``is_layer_skipped_bnb``); embeddings (embed_tokens and the PLE
table embed_tokens_per_layer) and the ParallelLMHead are VocabParallelEmbedding, not
LinearBase, so both paths leave them bf16 (Gemma 4's lm_head is tied to embed_tokens). For
Gemma 4 that is qkv_proj, o_proj, gate_up_proj, down_proj, per_layer_input_gate,
per_layer_projection of every layer and per_layer_model_projection. One addition: a layer the
kernel cannot take (K % 64 != 0) stays bf16, named at load with the reason, as vLLM does for
layers a kernel cannot implement.

Same NF4: bitsandbytes' loader calls ``quantize_4bit(w, compress_statistics=True,
quant_type="nf4")`` (blocks of 64) on each shard and then, at load, dequantizes the nested
statistics back to one fp32 absmax per block (``_dequantize_dq``), which is what its kernels
read. The codes depend only on each block's exact absmax, so ``TritonNf4.prepare`` writes
bitsandbytes' codes; the statistics are the kernel's own form (its docstring states their
bytes): dqprof_nf4 runs it on fp32 absmax (``STATS``), the bytes bitsandbytes' kernels read.

Fused layers (qkv_proj, gate_up_proj) are quantized as the fused [sum(shards), K] weight and
run as one kernel launch. A block is 64 consecutive weights of one row (K % 64 == 0), so the
fused weight's codes and per-block absmax are bit for bit those of quantizing each shard as
bitsandbytes does; only nested statistics (a second level over 256 blocks, offset by the
tensor's mean) would differ at shard edges, and vLLM's bitsandbytes path undoes those at load.
One launch per fused layer is what the fused int4 paths (Marlin, Machete) do too, while
bitsandbytes launches one GEMM per shard plus a copy into the fused output: that difference is
part of the path, not of the format.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from dqprof.errors import DqprofError

NAME = "dqprof_nf4"
# the statistics triton-nf4 runs on: one fp32 absmax per block, what vLLM's bitsandbytes path
# reads once it has undone the nested statistics at load; so dqprof_nf4 moves the same bytes
# as bitsandbytes and only the path differs (the report's format/path split compares these)
STATS = "fp32"
BACKEND = f"triton-nf4[stats={STATS}]"  # the kernel profile's path that predicts it
TRITON_HINT = 'dqprof_nf4 needs triton: pip install -e ".[gpu]"'
VLLM_HINT = 'dqprof_nf4 needs vLLM: pip install -e ".[vllm]"'
KERNEL_LINE = "Using TritonNf4LinearKernel for DqprofNf4LinearMethod"  # parse_linear_kernel
log = logging.getLogger("vllm.dqprof_nf4")  # under "vllm": vLLM's handlers print it

# what the last engine built in this process quantized and left bf16 (the worker records it)
REPORT: dict[str, dict[str, Any]] = {"quantized": {}, "bf16": {}}


def skipped_by_config(prefix: str, skip_modules: list[str]) -> bool:
    """bitsandbytes' rule: a skip entry equal to one dotted component of the prefix, or to
    one of its leading dotted prefixes ("model.layers.3" skips that layer's linears)."""
    parts = prefix.split(".")
    leading = {".".join(parts[:i + 1]) for i in range(len(parts))}
    return any(m in parts for m in skip_modules) or bool(leading & set(skip_modules))


def kernel_refusal(prefix: str, out_features: int, in_features: int) -> str | None:
    """Why triton-nf4 cannot take this linear (it then stays bf16), or None."""
    from dqprof.kernels.triton_nf4 import TritonNf4
    from dqprof.models.shapes import LinearShape

    shape = LinearShape(prefix, "vllm", out_features, in_features, (out_features,), (prefix,),
                        1)
    return TritonNf4().supports(shape)


def choose(prefix: str, out_features: int, in_features: int, skip_modules: list[str]
           ) -> str | None:
    """None: quantize this linear to NF4; otherwise the reason it stays bf16."""
    if skipped_by_config(prefix, skip_modules):
        return "in the config's modules_to_not_convert"
    return kernel_refusal(prefix, out_features, in_features)


def summarize(names: list[str]) -> dict[str, int]:
    """Module names with layer indices folded ("model.layers.*.mlp.down_proj": 42)."""
    out: dict[str, int] = {}
    for name in names:
        parts = ["*" if p.isdigit() else p for p in name.split(".")]
        key = ".".join(parts)
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def check_triton() -> None:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise DqprofError(TRITON_HINT, exit_code=3)


def register() -> None:
    """Register ``dqprof_nf4`` with vLLM (idempotent): the vllm.general_plugins entry point."""
    _classes()


@lru_cache(maxsize=1)
def _classes() -> tuple[type, type]:
    try:
        import torch
        from vllm.model_executor.layers.linear import (
            LinearBase,
            LinearMethodBase,
            UnquantizedLinearMethod,
        )
        from vllm.model_executor.layers.quantization import (
            QuantizationConfig,
            register_quantization_config,
        )
        from vllm.model_executor.parameter import ModelWeightParameter
        from vllm.model_executor.utils import set_weight_attrs
    except ImportError as e:
        raise DqprofError(f"{VLLM_HINT} ({e})", exit_code=3) from e

    from dqprof.fullmodel import nf4_op

    class DqprofNf4LinearMethod(LinearMethodBase):
        """A bf16 weight at load (vLLM's loaders fill it shard by shard), NF4 after it."""

        def __init__(self, config: Any, prefix: str):
            self.config, self.prefix = config, prefix

        def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                           output_partition_sizes: list[int], input_size: int,
                           output_size: int, params_dtype: torch.dtype,
                           **extra_weight_attrs: Any) -> None:
            weight_loader = extra_weight_attrs.pop("weight_loader")
            weight = ModelWeightParameter(
                data=torch.empty(sum(output_partition_sizes), input_size_per_partition,
                                 dtype=params_dtype),
                input_dim=1, output_dim=0, weight_loader=weight_loader)
            layer.register_parameter("weight", weight)
            set_weight_attrs(weight, extra_weight_attrs)
            layer.dqprof_shards = tuple(output_partition_sizes)

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            if getattr(layer, "dqprof_nf4_key", None):
                return  # already quantized (vLLM may call this again on reload)
            from dqprof.models.shapes import LinearShape

            w = layer.weight.data
            n, k = w.shape
            shards = layer.dqprof_shards
            shape = LinearShape(self.prefix, "vllm", n, k, shards,
                                tuple(f"shard{i}" for i in range(len(shards))), 1)
            if not REPORT["quantized"]:
                log.info("dqprof_nf4: quantizing linears to NF4 (block 64) at load")
            backend = self.config.backend()
            state = backend.prepare(w.to(torch.bfloat16), shape)
            del layer.weight  # the bf16 copy: only NF4 + statistics stay on the GPU
            layer.dqprof_nf4_state = state  # owned by the layer, looked up by key in the op
            layer.dqprof_nf4_key, layer.dqprof_out = self.prefix, n
            nf4_op.bind(self.prefix, backend, state, n)
            REPORT["quantized"][self.prefix] = {"n": n, "k": k, "shards": list(shards)}

        def apply(self, layer: torch.nn.Module, x: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            if x2.dtype != torch.bfloat16:
                x2 = x2.to(torch.bfloat16)
            y = torch.ops.dqprof.nf4_linear(x2, layer.dqprof_nf4_key, layer.dqprof_out)
            y = y.to(x.dtype).reshape(*lead, layer.dqprof_out)
            return y + bias if bias is not None else y

    @register_quantization_config(NAME)
    class DqprofNf4Config(QuantizationConfig):
        """Load-time NF4 of a bf16 checkpoint, bitsandbytes' module selection."""

        def __init__(self, modules_to_not_convert: list[str] | None = None):
            super().__init__()
            check_triton()
            self.skip = list(modules_to_not_convert or [])
            self._backend = None
            REPORT["quantized"].clear()
            REPORT["bf16"].clear()
            log.info(KERNEL_LINE)

        def backend(self) -> Any:
            if self._backend is None:
                from dqprof.kernels.triton_nf4 import TritonNf4

                self._backend = TritonNf4(stats=STATS)
            return self._backend

        def __repr__(self) -> str:
            return f"DqprofNf4Config(modules_to_not_convert={self.skip})"

        @classmethod
        def get_name(cls) -> str:
            return NAME

        @classmethod
        def get_supported_act_dtypes(cls) -> list[torch.dtype]:
            return [torch.bfloat16, torch.float16]

        @classmethod
        def get_min_capability(cls) -> int:
            return 80  # bf16 tl.dot

        @staticmethod
        def get_config_filenames() -> list[str]:
            return []  # nothing on disk: quantized at load, like bitsandbytes

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> DqprofNf4Config:
            skip = config.get("modules_to_not_convert") or config.get("llm_int8_skip_modules")
            return cls(skip)

        def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Any:
            if not isinstance(layer, LinearBase):
                return None  # embeddings, lm_head, attention: bf16, as under bitsandbytes
            why = choose(prefix, layer.output_size, layer.input_size, self.skip)
            if why is not None:
                log.warning("dqprof_nf4: %s stays bf16: %s", prefix, why)
                REPORT["bf16"][prefix] = why
                return UnquantizedLinearMethod()
            return DqprofNf4LinearMethod(self, prefix)

    return DqprofNf4Config, DqprofNf4LinearMethod
