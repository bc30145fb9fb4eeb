"""Run one triton-nf4 launch configuration a few times: the program `ncu` profiles.

    python3 scripts/nf4_kernel_once.py mlp.gate_up_proj 4096 [--decode shfl] [--calls 3]

The layer's random NF4 weight (nested statistics, as the sweep's default), x of M rows, the
config the sweep would run at that M (tuned table, else heuristic; ``--decode`` swaps the
decode as the backend's option does), checked against the fp32 reference, then ``--calls``
launches. Under ncu profile the last one: ``--launch-skip <calls - 1> --launch-count 1`` with
``-k regex:_nf4_`` (the split-K reduce kernel, when there is one, follows it).
"""

from __future__ import annotations

import argparse
import json

import torch

from dqprof.kernels.triton_nf4 import TritonNf4, nf4_matmul
from dqprof.models.config import load_config
from dqprof.models.shapes import linear_shapes
from dqprof.sweep import rel_error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("layer")
    ap.add_argument("m", type=int)
    ap.add_argument("--decode", default="")
    ap.add_argument("--calls", type=int, default=3)
    a = ap.parse_args()
    shape = next(s for s in linear_shapes(load_config("gemma-4-e4b")) if s.name == a.layer)
    backend = TritonNf4(**({"decode": a.decode} if a.decode else {}))
    dev = torch.device("cuda")  # the interpreter's bf16 dot needs the tests' patch
    w = (torch.randn(shape.n, shape.k, device=dev) * 0.02).to(torch.bfloat16)
    st = backend.prepare(w, shape)
    x = torch.randn(a.m, shape.k, device=dev, dtype=torch.bfloat16)
    cfg = backend.config(a.m, shape.n, shape.k, dev)
    err = rel_error(nf4_matmul(st, x, cfg), x.float() @ backend.reference(st).t())
    print(json.dumps({"layer": a.layer, "m": a.m, "n": shape.n, "k": shape.k,
                      "config": cfg.__dict__, "rel_err": err}), flush=True)
    for _ in range(a.calls):
        nf4_matmul(st, x, cfg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
