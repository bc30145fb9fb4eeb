"""Minimal safetensors writer and reader, streaming one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header ({name: dtype, shape,
data_offsets}) padded with spaces to 8 bytes, then the raw little-endian tensor bytes back to
back. Writing the header from the planned shapes first lets a shard stream tensors to disk as
they are generated, so a 4 GB shard never sits in memory; and no package is needed to write a
checkpoint. Tests cross-check files against the ``safetensors`` package where it is installed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from dqprof.fullmodel.layout import TensorSpec, read_header

TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "I32": torch.int32,
                "F32": torch.float32}


class ShardWriter:
    """Writes one .safetensors file whose tensors are announced up front, in order."""

    def __init__(self, path: Path, specs: Iterable[TensorSpec]):
        self.specs = list(specs)
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for s in self.specs:
            header[s.name] = {"dtype": s.dtype, "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = Path(path)
        self._f = self.path.open("wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or \
                tensor.dtype != TORCH_DTYPES[spec.dtype]:
            raise ValueError(f"shard {self.path.name}: got {name} {tensor.dtype}"
                             f"{list(tensor.shape)}, planned {spec.name} {spec.dtype}"
                             f"{list(spec.shape)}")
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._f.write(memoryview(t.view(torch.uint8).numpy()))  # no extra copy
        self._next += 1

    def close(self) -> None:
        self._f.close()
        if self._next != len(self.specs):
            raise ValueError(f"shard {self.path.name}: {self._next} of {len(self.specs)} "
                             f"tensors written")


def read_tensors(path: Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one file (all, or ``names``), copied into memory."""
    header = read_header(path)
    wanted = set(names) if names is not None else set(header)
    out = {}
    with Path(path).open("rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        base = 8 + hlen
        for name in sorted(wanted, key=lambda n: header[n]["data_offsets"][0]):
            info = header[name]
            begin, end = info["data_offsets"]
            f.seek(base + begin)
            buf = bytearray(f.read(end - begin))
            dtype = TORCH_DTYPES[info["dtype"]]
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(info["shape"])
    return out
