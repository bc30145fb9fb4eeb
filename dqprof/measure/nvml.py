"""NVML, lazily: the energy counter and the GPU state recorded with every point.

Everything here degrades to ``None`` when nvidia-ml-py or a query is unavailable, so a
machine without NVML still gets time-only records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

# Clock-event (throttle) reason bits, from nvml.h.
THROTTLE_BITS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap",
    0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def throttle_names(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_BITS.items() if mask & bit]


@dataclass
class Nvml:
    """One GPU's NVML handle. ``open_nvml`` returns None where NVML cannot be used."""

    pynvml: Any
    handle: Any
    energy_supported: bool
    matched: str = ""  # how this handle was tied to the CUDA device (records show it)

    def energy_mj(self) -> int:
        """The board's total-energy counter in millijoules (monotonic since driver load)."""
        return int(self.pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def _try(self, fn: str, *args: Any) -> Any:
        try:
            return getattr(self.pynvml, fn)(self.handle, *args)
        except Exception:  # a query this GPU or driver lacks: record it as unknown
            return None

    def state(self) -> dict[str, Any]:
        """Clocks, temperature, power, throttle reasons and foreign processes right now."""
        p = self.pynvml
        mask = self._try("nvmlDeviceGetCurrentClocksEventReasons")
        if mask is None:
            mask = self._try("nvmlDeviceGetCurrentClocksThrottleReasons")
        procs = self._try("nvmlDeviceGetComputeRunningProcesses") or []
        limit = self._try("nvmlDeviceGetEnforcedPowerLimit")
        power = self._try("nvmlDeviceGetPowerUsage")
        return {
            "sm_clock_mhz": self._try("nvmlDeviceGetClockInfo", p.NVML_CLOCK_SM),
            "mem_clock_mhz": self._try("nvmlDeviceGetClockInfo", p.NVML_CLOCK_MEM),
            "temp_c": self._try("nvmlDeviceGetTemperature", p.NVML_TEMPERATURE_GPU),
            "power_w": power / 1000 if power is not None else None,
            "power_limit_w": limit / 1000 if limit is not None else None,
            "throttle": throttle_names(mask) if mask is not None else None,
            "other_processes": sum(1 for q in procs if q.pid != os.getpid()),
        }

    def static_info(self) -> dict[str, Any]:
        p = self.pynvml
        drv = None
        try:
            drv = p.nvmlSystemGetDriverVersion()
        except Exception:
            pass
        lim = self._try("nvmlDeviceGetEnforcedPowerLimit")
        return {
            "driver": drv.decode() if isinstance(drv, bytes) else drv,
            "power_limit_w": lim / 1000 if lim is not None else None,
            "max_sm_clock_mhz": self._try("nvmlDeviceGetMaxClockInfo", p.NVML_CLOCK_SM),
            "max_mem_clock_mhz": self._try("nvmlDeviceGetMaxClockInfo", p.NVML_CLOCK_MEM),
            "energy_counter": self.energy_supported,
            "uuid": _nvml_uuid(p, self.handle),
            "matched": self.matched,
        }


def _torch_uuid(device_index: int) -> str | None:
    """The CUDA device's UUID as NVML writes it ("GPU-..."), or None where torch lacks it."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
    except Exception:
        return None
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def _nvml_uuid(pynvml: Any, handle: Any) -> str | None:
    try:
        uuid = pynvml.nvmlDeviceGetUUID(handle)
    except Exception:
        return None
    return uuid.decode() if isinstance(uuid, bytes) else str(uuid)


def _find_handle(pynvml: Any, device_index: int) -> tuple[Any, str]:
    """NVML's handle for CUDA device ``device_index``, and how it was matched.

    NVML numbers every GPU of the host; CUDA numbers the visible ones (CUDA_VISIBLE_DEVICES),
    so index 0 is only the same GPU when nothing is hidden. Matching by UUID is exact; a bare
    index is used only where no GPU is hidden, never as a silent guess.
    """
    uuid = _torch_uuid(device_index)
    if uuid is not None:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            if _nvml_uuid(pynvml, handle) == uuid:
                return handle, f"uuid {uuid} (NVML index {i})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return pynvml.nvmlDeviceGetHandleByIndex(device_index), f"index {device_index}"
    raise LookupError(f"cannot tell which NVML device is CUDA device {device_index} "
                      f"(CUDA_VISIBLE_DEVICES={visible!r}, no UUID match)")


def open_nvml(device_index: int = 0) -> tuple[Nvml | None, str | None]:
    """NVML for the CUDA device ``device_index`` (matched by UUID), or (None, why)."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as e:
        return None, f"NVML could not start: {e}"
    try:
        handle, matched = _find_handle(pynvml, device_index)
    except Exception as e:
        return None, f"NVML has no handle for CUDA device {device_index}: {e}"
    try:
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        supported = True
    except Exception:
        supported = False
    return Nvml(pynvml, handle, supported, matched), None
