"""The roofline of a run: its measured ceilings, the ridge point, and where each point sits.

Ceilings come from run.json (``ceilings.copy_bytes_per_s``: a large device-to-device copy,
read + write; ``ceilings.bf16_flop_per_s``: an 8192^3 bf16 matmul). Intensity is FLOPs over
the byte model's minimum traffic, so a point's bandwidth is a lower bound on its real rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Ceilings:
    bytes_per_s: float
    flop_per_s: float

    @property
    def ridge(self) -> float:
        """Intensity (FLOP/byte) where the bandwidth roof meets the compute roof."""
        return self.flop_per_s / self.bytes_per_s

    def attainable(self, intensity: np.ndarray | float) -> np.ndarray | float:
        return np.minimum(self.flop_per_s, self.bytes_per_s * np.asarray(intensity))


def ceilings(info_ceilings: dict[str, float]) -> Ceilings | None:
    """From a run's ceilings dict; None where the run measured none (CPU runs)."""
    bw, fl = info_ceilings.get("copy_bytes_per_s"), info_ceilings.get("bf16_flop_per_s")
    return Ceilings(float(bw), float(fl)) if bw and fl else None


def roofline_points(points: pd.DataFrame, roof: Ceilings | None) -> pd.DataFrame:
    """Ok points with FLOPs: intensity, achieved FLOP/s and, with ceilings, the fraction of
    the attainable rate and which roof bounds them."""
    ok = points[(points["status"] == "ok") & (points["flops"] > 0) & (points["intensity"] > 0)
                & (points["flop_per_s"] > 0)]
    out = ok[["layer", "group", "m", "series", "backend", "intensity", "flop_per_s",
              "bytes_per_s", "time_s"]].copy()
    if roof is not None:
        out["frac_roof"] = out["flop_per_s"] / roof.attainable(out["intensity"].to_numpy())
        out["bound"] = np.where(out["intensity"] < roof.ridge, "memory", "compute")
        out["frac_bandwidth"] = out["bytes_per_s"] / roof.bytes_per_s
    return out.reset_index(drop=True)
