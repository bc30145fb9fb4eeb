"""Reproduce the H200 Machete stall: which way of queueing graph replays hangs the GPU.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 scripts/machete_stall.py [CASE ...]   (GPU machine)

Each case runs in a child process with a watchdog (a stuck CUDA context is only freed by
exiting) on sliding.qkv_proj at M=1 with 47 rotated weight copies, as the sweep does. Loops
run 2000 graph replays, 50 at a time; energy cases call the sweep's measure_energy (1 s
window, 0.5 s for the queue-depth cases), whose feeder keeps LEAD_CHUNKS chunks queued.
profiles/h200/machete/ holds what it printed on the H200 (from three drafts of this script
whose cases it keeps unchanged) and what it showed.

Since commit 19d9904 measure_energy is the batch-sync feeder (dqprof/measure/energy.py),
under which Machete was metered without a stall (profiles/h200/session5/): the energy cases
now run that feeder, so ``lead1``/``lead2``/``chunk1``/``blockquery`` no longer vary what
they name. The chunked feeder they were written for is ``e0332d4:dqprof/measure/energy.py``.
"""

from __future__ import annotations

import faulthandler
import subprocess
import sys
import time

LOOPS = ("eager", "graph1", "graph47", "graph47_sync", "graph47_events",
         "marlin_graph47_events", "attr_loop")
ENERGY = ("energy", "attr_energy", "lead1", "lead2", "chunk1", "blockquery", "marlin_energy")
CHILD_LIMIT_S = 40


def child(case: str) -> None:
    faulthandler.dump_traceback_later(CHILD_LIMIT_S - 5, exit=True)
    import torch

    import dqprof.measure.energy as en
    from dqprof.kernels import create
    from dqprof.measure.attribution import attribute
    from dqprof.measure.nvml import open_nvml
    from dqprof.measure.timing import Replay, replay_seconds, time_replay
    from dqprof.models.config import load_config
    from dqprof.models.shapes import linear_shapes

    shape = {s.name: s for s in linear_shapes(load_config("gemma-4-e4b"))}["sliding.qkv_proj"]
    b = create("marlin-gptq" if case.startswith("marlin") else "machete-gptq")
    w = (torch.randn(shape.n, shape.k, device="cuda") * 0.02).to(torch.bfloat16)
    st = b.prepare(w, shape)
    copies = 1 if case == "graph1" else 47
    states = [st] + [b.clone(st) for _ in range(copies - 1)]
    x = torch.randn(1, shape.k, device="cuda", dtype=torch.bfloat16)
    fns = [lambda s=s: b(s, x) for s in states]
    replay = Replay(fns, "cuda", use_graph=case != "eager")
    if case.startswith("attr"):
        kernels = attribute(fns[:4])
        print(case, "attribution", [(k["name"][:40], k["time_s"]) for k in kernels], flush=True)
    if case not in LOOPS or case == "attr_loop":  # attr_loop times first, as the sweep does
        one = replay_seconds(replay)
        t = time_replay(replay, 15)
        per_call = max(t.median_s, one / replay.calls)
        print(case, f"one pass {one * 1e3:.3f} ms, median {t.median_s * 1e6:.2f} us/call",
              flush=True)
    if case in LOOPS:
        t0, total = time.perf_counter(), 0
        for _ in range(40):
            for _ in range(50):
                if case.endswith("events"):
                    torch.cuda.Event(enable_timing=True).record()
                replay()
                total += 1
                if case.endswith("sync"):
                    torch.cuda.synchronize()
            torch.cuda.synchronize()
        print(case, f"{total} passes ok, {time.perf_counter() - t0:.3f} s", flush=True)
    else:
        window = 1.0 if case in ("energy", "attr_energy") else 0.5
        if case in ("lead1", "lead2"):
            en.LEAD_CHUNKS = int(case[-1])
        elif case == "chunk1":
            per_call = 1.0  # one replay per chunk: 8 replays queued instead of 64
        elif case == "blockquery":  # wait on the oldest chunk instead of polling it
            def query(self: torch.cuda.Event) -> bool:
                self.synchronize()
                return True
            torch.cuda.Event.query = query  # type: ignore[method-assign]
        nvml, why = open_nvml(0)
        if nvml is None:
            raise SystemExit(f"no NVML: {why}")
        t0 = time.perf_counter()
        e = en.measure_energy(replay, nvml, per_call, window, None, None)
        print(case, f"{time.perf_counter() - t0:.2f}s calls={e.calls} ticks={e.ticks} "
              f"W={e.power_w:.0f} idle_frac={e.gpu_idle_frac} "
              f"s/call={e.s_per_call_in_window} median={t.median_s}", flush=True)
    print(case, "DONE", flush=True)


def main(cases: list[str]) -> None:
    for case in cases or [*LOOPS, *ENERGY]:
        t = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "--child", case], capture_output=True,
                               text=True, timeout=CHILD_LIMIT_S + 10)
            lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "warn" not in ln.lower()]
            print(f"== {case} rc {p.returncode} {time.time() - t:.1f}s")
            print("\n".join(lines[-8:]), flush=True)
        except subprocess.TimeoutExpired as e:
            print(f"== {case} TIMEOUT", (e.stdout or b"")[-300:], flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])
    else:
        main(sys.argv[1:])
