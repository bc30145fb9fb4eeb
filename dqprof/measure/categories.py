"""One kernel-name -> category map, for the sweep's attribution and for a full-model step.

A kernel is named by the first rule whose pattern its name matches, in the order below (so
``kDequantize...`` is dequant before the ``quant`` rule sees it, and vLLM's
``reshape_and_cache`` is attention before the copy rule does). The sweep times one GEMM call
in isolation, where the only small kernels are casts, adds of split-K partials and copies:
its view (``SWEEP_CATEGORIES``) folds the step-only categories into those.
"""

from __future__ import annotations

import re

# every category a kernel can get, in the order tables and stacked bars show them
STEP_CATEGORIES = ("gemm", "dequant", "quantize", "attention", "norm/elementwise", "gather",
                   "sampling", "cast/copy", "other")
# what one isolated GEMM call is split into (the sweep's records and plots)
SWEEP_CATEGORIES = ("dequant", "quantize", "gemm", "cast/copy", "other")
_SWEEP_VIEW = {"norm/elementwise": "cast/copy", "attention": "other", "gather": "other",
               "sampling": "other"}

_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("dequant", re.compile(r"dequant", re.I)),
    # activation quantization (FP8 paths): vLLM's scaled_fp8_quant / per-token kernels
    ("quantize", re.compile(r"quant|fp8_scale|segmented_max", re.I)),
    # vLLM's KV-cache bookkeeping (_compute_slot_mapping_kernel: where each token's K/V goes)
    ("attention", re.compile(r"attention|attn|fmha|flash|reshape_and_cache|rotary|paged|"
                             r"reduce_segments|slot_mapping", re.I)),
    ("gemm", re.compile(r"gemm|gemv|nvjet|xmma|cutlass|marlin|machete|tinygemm|int4pack|"
                        r"matmul|wgmma|splitK|sm\d\d_|ampere_|hopper_|nf4_mm|nf4_gemv|gemlite",
                        re.I)),
    # torch.compile's fused kernels named after a gather they hold (vLLM's PLE lookup,
    # triton_poi_fused_embedding_mul_0): gathers, before the pointwise rule takes them
    ("gather", re.compile(r"^triton_(poi|red|per)_fused_\w*?(embedding|index_select|gather)",
                          re.I)),
    # norms, activations and torch.compile's fused pointwise/reduction kernels (whose names
    # often hold "_to_copy": so before the copy rule)
    ("norm/elementwise", re.compile(r"norm|rsqrt|triton_(poi|red|per)_|act_and_mul|gelu|silu",
                                    re.I)),
    ("cast/copy", re.compile(r"copy|memcpy|memset|(?<!no)cast|fill", re.I)),  # not "_nocast<"
    ("sampling", re.compile(r"argmax|topk|top_k|sampl|multinomial|gumbel|sort|softmax|"
                            r"exponential", re.I)),
    ("gather", re.compile(r"embedding|index_select|indexSelect|gather|index_kernel|"
                          r"scatter", re.I)),
    ("norm/elementwise", re.compile(r"elementwise|reduce_kernel|tanh", re.I)),
)


def categorize(kernel_name: str) -> str:
    """The category of one kernel, over every category a step can hold."""
    for category, pattern in _RULES:
        if pattern.search(kernel_name):
            return category
    return "other"


def sweep_category(kernel_name: str) -> str:
    """The category of a kernel launched by one isolated GEMM call (the sweep's view)."""
    category = categorize(kernel_name)
    return _SWEEP_VIEW.get(category, category)
