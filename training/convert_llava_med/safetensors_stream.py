"""The safetensors format one tensor at a time: a reader that seeks and reads each tensor (no mmap, so the page cache
is not charged to this process) and a writer that writes the header first, then each tensor's bytes. Peak memory is
the tensor being read or written, never a shard."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from datasets_io.errors import LauncherError

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
    """A safetensors file read one tensor at a time with seek+read (no mmap): memory is the tensor being read."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "rb")
        try:
            (n,) = struct.unpack("<Q", self._f.read(8))
            header = json.loads(self._f.read(n))
        except (struct.error, ValueError) as e:
            self._f.close()
            raise LauncherError(f"{path}: not a readable safetensors file ({e})") from e
        header.pop("__metadata__", None)
        self._entries: dict[str, dict] = header
        self._data_start = 8 + n

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        e = self._entries[name]
        if e["dtype"] not in _ST_DTYPES:
            raise LauncherError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        return _ST_DTYPES[e["dtype"]], tuple(e["shape"])

    def read(self, name: str) -> torch.Tensor:
        dtype, shape = self.spec(name)
        begin, end = self._entries[name]["data_offsets"]
        buf = bytearray(end - begin)
        self._f.seek(self._data_start + begin)
        if self._f.readinto(buf) != len(buf):
            raise LauncherError(f"{self.path}: truncated file (tensor {name})")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)  # shares `buf`, no second copy

    def close(self) -> None:
        self._f.close()


class StreamingSafetensorsWriter:
    """Writes a safetensors file whose tensor list (names, dtypes, shapes) is known up front, one tensor at a time.

    `write(name, *parts)` writes the parts back to back (concatenated along dim 0) without building the concatenation:
    that is how embed_tokens gains its new rows without a second 262 MB copy.
    """

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header: dict[str, dict] = {}
        offset = 0
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}  # transformers checks for it
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the reference writer pads the header to 8 bytes; readers accept it
        self.path, self.nbytes = path, offset
        self._pending = [(n, d, s) for n, d, s in specs]
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)

    def write(self, name: str, *parts: torch.Tensor) -> None:
        exp_name, exp_dtype, exp_shape = self._pending.pop(0)
        rows = sum(p.shape[0] for p in parts) if parts[0].dim() else 1
        shape = (rows, *parts[0].shape[1:]) if parts[0].dim() else ()
        if name != exp_name or any(p.dtype != exp_dtype for p in parts) or shape != exp_shape:
            raise AssertionError(f"writer: got {name} {shape} {parts[0].dtype}, expected {exp_name} {exp_shape}")
        for p in parts:
            # (N,) uint8 view of the tensor's bytes: zero-copy for a contiguous tensor, works for bf16 too
            self._f.write(p.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        self._f.close()
        if self._pending:
            raise AssertionError(f"writer: {self.path} misses {len(self._pending)} tensors")
