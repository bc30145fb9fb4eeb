"""The two ceilings of the roofline, measured once per run on the GPU itself.

Copy bandwidth: a device-to-device copy of a buffer far larger than L2, counting bytes read
plus bytes written. Matmul rate: an 8192^3 bf16 product on random data (zeros run faster).
"""

from __future__ import annotations

import statistics

import torch

COPY_BYTES = 2 << 30
MATMUL_N = 8192


def _median_event_time(fn, repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _copy_bandwidth() -> float:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    src.random_()
    return 2 * COPY_BYTES / _median_event_time(lambda: dst.copy_(src))


def _matmul_rate() -> float:
    a = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    return 2 * MATMUL_N**3 / _median_event_time(lambda: a @ b)


def measure_ceilings() -> dict[str, float]:
    bandwidth = _copy_bandwidth()
    flops = _matmul_rate()
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": bandwidth, "bf16_flop_per_s": flops,
            "method": f"median of 10: {COPY_BYTES >> 20} MiB D2D copy (read+write); "
                      f"{MATMUL_N}^3 bf16 matmul on random data"}
