"""Checkpoints on disk, streamed: a lazy safetensors reader that holds one tensor (or a row range of one) at a
time and gives its pages back, and a shard writer that writes tensors as they come. No host framework.

Reading maps each file and copies a tensor's bytes out; the mapped pages it touched are then released
(``madvise(MADV_DONTNEED)``), so peak memory does not grow with the size of the inputs. Only safetensors
are read: pickled weights (``*.bin``, ``*.pt``) are refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hooks.errors import CheckpointError

#: safetensors dtype names and their torch types.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
_PAGE = mmap.PAGESIZE
_MARGIN = 1 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def row_bytes(self) -> int:
        rows = self.shape[0] if self.shape else 1
        return self.nbytes // max(rows, 1)


class SafetensorsFile:
    """One .safetensors file: its header parsed and checked once, tensors read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than its 8-byte header length")
                length = struct.unpack("<Q", head)[0]
                if length > size - 8 or length > 100 << 20:
                    raise ValueError(f"header length {length} exceeds the file")
                header = json.loads(f.read(length))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({exc})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        base = 8 + length
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: malformed header entry for tensor {name!r}") from None
            expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != expected or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {end - begin} bytes but {shape} "
                                      f"{entry['dtype']} needs {expected}: the file is corrupted")
            if base + end > size:
                raise CheckpointError(f"{self.path}: tensor {name!r} runs past the end of the file ({base + end} > "
                                      f"{size} bytes): the file is truncated or corrupted")
            self.tensors[name] = TensorInfo(name, dtype, shape, self.path, base + begin, base + end)
        self._map: mmap.mmap | None = None

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A copy of the tensor, or of rows [a, b) of its first dimension; its mapped pages are released."""
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        start, end, shape = info.start, info.end, info.shape
        if rows is not None:
            a, b = rows
            start, end = info.start + a * info.row_bytes, info.start + b * info.row_bytes
            shape = (b - a, *info.shape[1:])
        data = bytearray(end - start)
        with memoryview(self._map) as view:  # one copy, straight from the mapped pages
            data[:] = view[start:end]
        self._release(start, end)
        if not data:
            return torch.empty(shape, dtype=info.dtype)
        return torch.frombuffer(data, dtype=info.dtype).reshape(shape)

    def _release(self, start: int, end: int) -> None:
        """Drop the mapped pages of [start, end) from this process, with a margin on both sides: the kernel
        maps pages around each fault ("fault-around", 64 KiB by default), which would otherwise pile up
        before every row chunk's start."""
        if not hasattr(self._map, "madvise"):
            return
        first = max(0, start - _MARGIN)
        first -= first % _PAGE
        last = min(len(self._map), end + _MARGIN)
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class Checkpoint:
    """A Hugging Face model directory (one or more safetensors shards), or a single .safetensors file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_file() and self.path.suffix == ".safetensors":
            files = [self.path]
        elif self.path.is_dir():
            index = self.path / INDEX
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError) as exc:
                    raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
                files = [self.path / f for f in dict.fromkeys(weight_map.values())]
            else:
                files = sorted(self.path.glob("*.safetensors"))
            if not files:
                pickled = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
                hint = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
                raise CheckpointError(f"{self.path}: no safetensors weights{hint}")
        else:
            raise CheckpointError(f"{self.path}: no such checkpoint directory or .safetensors file")
        self.files = [SafetensorsFile(f) for f in files]
        self.tensors: dict[str, TensorInfo] = {}
        self._owner: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name, info in f.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"{self.path}: tensor {name!r} appears in two shards")
                self.tensors[name], self._owner[name] = info, f

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self._owner[name].read(self.tensors[name], rows)

    def side_files(self) -> list[Path]:
        """Files to carry along into a derived checkpoint (config, tokenizer, ...): no weights, no index."""
        if not self.path.is_dir():
            return []
        skip = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}
        return [p for p in sorted(self.path.iterdir()) if p.is_file() and p.suffix not in skip and p.name != INDEX]

    def close(self) -> None:
        for f in self.files:
            f.close()


class ShardWriter:
    """Writes planned tensors into safetensors shards as they come, one tensor (or row range) at a time.

    ``plan`` lists every (name, dtype, shape) in write order. Each shard's header is written first, so the
    data can be appended in order and no tensor is held twice; shards stay under ``max_shard_bytes`` (a
    single larger tensor gets a shard of its own). ``close`` writes the index when there are several shards.
    """

    def __init__(self, directory: str | Path, plan: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = 2 << 30, metadata: dict[str, str] | None = None, stem: str = "model") -> None:
        self.directory = Path(directory)
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in plan:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape), nbytes))
            size += nbytes
        count = len(shards)
        self.files = [self.directory / (f"{stem}.safetensors" if count == 1 else
                                         f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors") for i in range(count)]
        self._where: dict[str, tuple[int, int]] = {}  # name -> (shard, bytes)
        self._handles = []
        self._expected: list[list[str]] = []
        for i, (path, shard) in enumerate(zip(self.files, shards)):
            header: dict[str, object] = {"__metadata__": self.metadata}
            offset = 0
            for name, dtype, shape, nbytes in shard:
                header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)
            handle = open(path, "wb")
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            self._handles.append(handle)
            self._expected.append([name for name, *_ in shard])
            for name, *_rest, nbytes in shard:
                self._where[name] = (i, nbytes)
        self._written: dict[str, int] = {}
        self._weight_map = {name: self.files[i].name for name, (i, _) in self._where.items()}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (the whole planned tensor, or its next rows) to ``name``'s bytes."""
        shard, nbytes = self._where[name]
        expected = self._expected[shard]
        done = self._written.get(name, 0)
        if done == 0 and (not expected or expected[0] != name):
            raise RuntimeError(f"shard writer: {name!r} written out of the planned order (next: "
                               f"{expected[0] if expected else None!r})")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        if done + len(data) > nbytes:
            raise RuntimeError(f"shard writer: {name!r} receives more bytes than planned")
        self._handles[shard].write(data)
        self._written[name] = done + len(data)
        if self._written[name] == nbytes:
            expected.pop(0)

    def close(self) -> list[Path]:
        """Flush and close every shard (all planned tensors must be complete); write the index if sharded."""
        missing = [name for names in self._expected for name in names]
        for handle in self._handles:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        if missing:
            raise RuntimeError(f"shard writer: tensors never written: {missing[:5]}")
        if len(self.files) > 1:
            total = sum(n for _, n in self._where.values())
            (self.directory / f"{self.files[0].name.split('-')[0]}.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": self._weight_map}, indent=2))
        return self.files


def copy_side_files(checkpoint: Checkpoint, directory: Path, skip: Iterable[str] = ()) -> None:
    for path in checkpoint.side_files():
        if path.name not in skip:
            shutil.copy2(path, directory / path.name)


def write_checkpoint(source: Checkpoint, dst: str | Path, plan: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                     tensors: Iterable[tuple[str, torch.Tensor]], config: dict) -> None:
    """Write a model directory atomically: the ``plan``'s tensors as ``tensors`` yields them (in plan order,
    one at a time), ``config`` as config.json, and ``source``'s other side files (tokenizer, ...)."""
    import json

    from ..io import atomic_directory

    with atomic_directory(dst) as tmp:
        writer = ShardWriter(tmp, plan)
        for name, tensor in tensors:
            writer.write(name, tensor)
        writer.close()
        copy_side_files(source, tmp, skip={"config.json"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
