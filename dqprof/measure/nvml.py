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
        }


def open_nvml(device_index: int = 0) -> tuple[Nvml | None, str | None]:
    """NVML for the CUDA device ``device_index`` (matched by PCI bus id), or (None, why)."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as e:
        return None, f"NVML could not start: {e}"
    handle = None
    try:
        import torch

        props = torch.cuda.get_device_properties(device_index)
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        handle = pynvml.nvmlDeviceGetHandleByPciBusId_v2(bus.encode())
    except Exception:
        try:  # fall back to NVML's own numbering (right when CUDA_VISIBLE_DEVICES is unset)
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception as e:
            return None, f"NVML has no handle for device {device_index}: {e}"
    try:
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        supported = True
    except Exception:
        supported = False
    return Nvml(pynvml, handle, supported), None
