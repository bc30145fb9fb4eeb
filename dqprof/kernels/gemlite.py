"""gemlite's A16W4 int4 GEMM (pure Triton, mobiusml/gemlite 0.6): HQQ-style asymmetric int4,
group 64, bf16 activations and scales.

The weight is quantized here as HQQ initializes it without its optimizer (round to nearest on
the per-group min/max: scale = (max - min) / 15, zero = -min / scale, q = round(w / scale +
zero)), and handed to ``gemlite.helper.A16W4_HQQ_INT(...).from_weights(W_q, scales, zeros)``.
That packs eight codes per int32 along K and stores ``-zero * scale`` (bf16) as the zeros, so
the kernels dequantize with one FMA: ``w = q * scale + (-zero * scale)`` (W_group_mode 4); the
reference below rebuilds exactly that from the bf16 parameters.

gemlite picks its kernel by M (core.get_matmul_type): GEMV_REVSPLITK for M <= 4,
GEMM_SPLITK for M < 64, GEMM beyond. Each is a Triton autotuner keyed on (M or its bucket, N,
K, group, packing, dtype); the first call per key benchmarks its configs (seconds to a
minute). That first call is the sweep's correctness check, before timing and capture. The
results are kept per GPU in ``<cache dir>/gemlite/<gpu>.json`` (gemlite's own
``load_config`` / ``cache_config``): loaded before the first weight is packed, written when
the next weight is prepared and at exit, so a second sweep on the same GPU does not tune again.

CUDA graphs: ``forward_functional`` is a torch custom op whose body allocates its output
through torch (``torch.zeros`` for the split-K GEMV, ``torch.empty`` plus the autotuner's
zeroing pre-hook for split-K GEMM) and launches Triton kernels on the current stream, with no
host sync once the key is tuned, so the call is capturable after a warm-up call per M; the
sweep's Replay does that warm-up outside capture (and records eager timing if capture fails).

Importing gemlite touches the GPU (it reads the device name and SM count), so it is imported
only when a weight is prepared.
"""

from __future__ import annotations

import atexit
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dqprof.bytemodel import GEMLITE_GROUP, Traffic, int4_grouped
from dqprof.kernels import register
from dqprof.kernels.base import Backend
from dqprof.models.shapes import LinearShape

BITS = 4
QMAX = 2**BITS - 1
MIN_K = 32  # gemlite's GemLiteLinearTriton.MIN_SIZE: in_features % 32 == 0


def quantize_hqq_rtn(weight: torch.Tensor, group: int = GEMLITE_GROUP
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[n, k] -> (codes uint8 [n, k] in 0..15, scale bf16 [n, k/g], zero bf16 [n, k/g]), as
    HQQ's quantize() with optimize=False (axis 1, zero not rounded)."""
    n, k = weight.shape
    wg = weight.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    inv = (QMAX / (hi - lo)).clamp(max=2e4)  # HQQ's clamp: a flat group gets a finite scale
    zero = -lo * inv
    q = torch.round(wg * inv + zero).clamp(0, QMAX)
    scale = (1.0 / inv).to(torch.bfloat16).reshape(n, -1)
    return q.reshape(n, k).to(torch.uint8), scale, zero.to(torch.bfloat16).reshape(n, -1)


def dequantize_gemlite(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       group: int = GEMLITE_GROUP) -> torch.Tensor:
    """fp32 [n, k] as gemlite's kernels compute it: q * scale + bf16(-zero * scale)."""
    shift = (-zero.float() * scale.float()).to(torch.bfloat16).float()
    s = scale.float().repeat_interleave(group, dim=1)
    return q.float() * s + shift.repeat_interleave(group, dim=1)


# gemlite autotune tables made on lent GPUs (`<gpu slug>.json`, gemlite's own format), read
# where this machine has none of its own yet: gemlite's first run autotunes every M bucket
# (about 9 s a layer and M on the H200, profiles/h200/session5/gemlite.log)
BUNDLED_DIR = Path(__file__).parent / "configs" / "gemlite"


def cache_path(gpu_name: str) -> Path:
    """Where this GPU's gemlite autotune results live (DQPROF_CACHE_DIR, else the XDG cache)."""
    root = os.environ.get("DQPROF_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dqprof")
    slug = re.sub(r"[^a-z0-9]+", "_", gpu_name.lower()).strip("_") or "gpu"
    return Path(root) / "gemlite" / f"{slug}.json"


class _TuneCache:
    """gemlite's autotune table for this process's GPU: loaded once, saved as it grows."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def open(self, gemlite: Any, device: torch.device) -> None:
        if self.path is not None:
            self.save()  # what the groups so far tuned survives a later crash
            return
        self.path = cache_path(torch.cuda.get_device_name(device))
        seed = BUNDLED_DIR / self.path.name  # a tune that came back from a lent GPU
        if self.path.exists():
            gemlite.load_config(str(self.path), print_error=True)
        elif seed.exists():  # a first run on this GPU model: skips most of the autotuning
            gemlite.load_config(str(seed), print_error=True)
        atexit.register(self.save)

    def save(self) -> None:
        if self.path is None:
            return
        import gemlite

        self.path.parent.mkdir(parents=True, exist_ok=True)
        gemlite.cache_config(str(self.path))


_CACHE = _TuneCache()


@dataclass
class GemliteState:
    layer: Any  # gemlite.GemLiteLinearTriton
    codes: torch.Tensor  # uint8 [n, k], kept to pack rotated copies
    scale: torch.Tensor  # bf16 [n, k / 64]
    zero: torch.Tensor  # bf16 [n, k / 64]
    ref: torch.Tensor  # dequantized weight [n, k] fp32, for the correctness check


@register
class GemliteInt4(Backend):
    name = "gemlite-int4"
    description = ("gemlite A16W4 (Triton), HQQ-style asymmetric int4, group 64, bf16 "
                   "activations")
    requires = ("gemlite", "triton")
    options = {"tune_cache": True}  # false: tune afresh, neither read nor write the cache file

    def supports(self, shape: LinearShape) -> str | None:
        if reason := super().supports(shape):
            return reason
        if shape.k % GEMLITE_GROUP or shape.k % MIN_K:
            return f"gemlite int4 needs K % {GEMLITE_GROUP} == 0 (K={shape.k})"
        return None

    def _pack(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Any:
        from gemlite.helper import A16W4_HQQ_INT

        return A16W4_HQQ_INT(device=codes.device, dtype=torch.bfloat16).from_weights(
            codes, scale, zero)

    def prepare(self, weight: torch.Tensor, shape: LinearShape) -> GemliteState:
        import gemlite

        if self.opts["tune_cache"]:
            _CACHE.open(gemlite, weight.device)
        codes, scale, zero = quantize_hqq_rtn(weight)
        ref = dequantize_gemlite(codes, scale, zero)
        return GemliteState(self._pack(codes, scale, zero), codes, scale, zero, ref)

    def __call__(self, st: GemliteState, x: torch.Tensor) -> torch.Tensor:
        return st.layer.forward(x)

    def reference(self, st: GemliteState) -> torch.Tensor:
        return st.ref

    def clone(self, st: GemliteState) -> GemliteState:
        # a fresh pack: new packed weight, scales and zeros; codes and reference are shared
        return GemliteState(self._pack(st.codes, st.scale.clone(), st.zero.clone()), st.codes,
                            st.scale, st.zero, st.ref)

    def traffic(self, shape: LinearShape, m: int, kernels: list[dict] | None = None) -> Traffic:
        return int4_grouped(m, shape.n, shape.k, "bf16", group=GEMLITE_GROUP)
