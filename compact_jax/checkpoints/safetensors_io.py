"""Safetensors reading and writing with numpy only (no torch, no pickles).

The format is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
and the raw little-endian tensor bytes. Reading memory-maps the file, so
tensors are materialised one at a time (``iter_tensors``) and a converter never
holds two full copies of a checkpoint. Sharded checkpoints are read through
their ``model.safetensors.index.json`` (``weight_map``: tensor name -> file).
bfloat16 maps to ``ml_dtypes.bfloat16`` (a JAX dependency).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
  "F64": np.dtype("<f8"),
  "F32": np.dtype("<f4"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype("<i8"),
  "I32": np.dtype("<i4"),
  "I16": np.dtype("<i2"),
  "I8": np.dtype("i1"),
  "U8": np.dtype("u1"),
  "BOOL": np.dtype("?"),
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > os.path.getsize(path) - 8:
      raise ValueError(f"{path}: header length {n} exceeds the file size")
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: the safetensors header is not valid JSON ({e})") from e
  return header, 8 + n


class SafetensorsFile:
  """One memory-mapped ``.safetensors`` file; ``file[name]`` reads one tensor."""

  def __init__(self, path: str):
    self.path = path
    self.header, self._data_start = _read_header(path)
    self.metadata = self.header.pop("__metadata__", {}) or {}
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r")

  def keys(self) -> list[str]:
    return list(self.header)

  def __iter__(self) -> Iterator[str]:
    return iter(self.header)

  def __contains__(self, name: str) -> bool:
    return name in self.header

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self.header:
      raise KeyError(f"{self.path}: no tensor {name!r}")
    info = self.header[name]
    if info["dtype"] not in DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    dtype = DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise ValueError(f"{self.path}: tensor {name!r} byte range does not match shape {shape}")
    buf = self._mmap[self._data_start + begin : self._data_start + end]
    return buf.view(dtype).reshape(shape)


class SafetensorsCheckpoint(Mapping):
  """A read-only name -> array mapping over a file, a sharded index or a directory.

  ``path`` may be a ``.safetensors`` file, a ``*.index.json`` file, or a
  directory holding ``model.safetensors`` or ``model.safetensors.index.json``.
  Arrays are memory-mapped views; copy what you keep.
  """

  def __init__(self, path: str):
    if os.path.isdir(path):
      index = os.path.join(path, INDEX_FILE)
      single = os.path.join(path, SINGLE_FILE)
      if os.path.exists(index):
        path = index
      elif os.path.exists(single):
        path = single
      else:
        raise FileNotFoundError(f"{path}: has neither {SINGLE_FILE} nor {INDEX_FILE}")
    self.path = path
    self._files: dict[str, SafetensorsFile] = {}
    if path.endswith(".json"):
      with open(path) as f:
        index = json.load(f)
      if "weight_map" not in index:
        raise ValueError(f"{path}: a safetensors index needs a 'weight_map'")
      root = os.path.dirname(path)
      self._where = {name: os.path.join(root, file) for name, file in index["weight_map"].items()}
    else:
      single = self._file(path)
      self._where = {name: path for name in single}

  def _file(self, path: str) -> SafetensorsFile:
    if path not in self._files:
      if not os.path.exists(path):
        raise FileNotFoundError(f"{self.path}: shard {path} is missing")
      self._files[path] = SafetensorsFile(path)
    return self._files[path]

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise KeyError(f"{self.path}: no tensor {name!r}")
    return self._file(self._where[name])[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
  """Writes ``tensors`` (numpy arrays, any dtype in ``DTYPES``) to one safetensors file."""
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = {}
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype.byteorder == ">":
      a = a.astype(a.dtype.newbyteorder("<"))
    dtype_name = next((k for k, d in DTYPES.items() if d.name == a.dtype.name), None)
    if dtype_name is None:
      raise ValueError(f"save_file: tensor {name!r} has unsupported dtype {a.dtype}")
    header[name] = {
      "dtype": dtype_name,
      "shape": list(a.shape),
      "data_offsets": [offset, offset + a.nbytes],
    }
    offset += a.nbytes
    arrays[name] = a
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name in sorted(arrays):
      f.write(arrays[name].tobytes())
  os.replace(tmp, path)


def save_sharded(
  tensors: Mapping[str, np.ndarray], directory: str, *, max_shard_bytes: int
) -> list[str]:
  """Writes HF-style shards ``model-0000i-of-0000n.safetensors`` plus the index json.

  Tensors are packed in name order; a shard closes when adding the next tensor
  would pass ``max_shard_bytes``. Returns the shard file names.
  """
  os.makedirs(directory, exist_ok=True)
  groups: list[list[str]] = [[]]
  size = 0
  for name in sorted(tensors):
    nbytes = np.asarray(tensors[name]).nbytes
    if groups[-1] and size + nbytes > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += nbytes
  files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
  weight_map = {}
  for file, names in zip(files, groups):
    save_file({n: tensors[n] for n in names}, os.path.join(directory, file))
    weight_map.update({n: file for n in names})
  total = sum(np.asarray(t).nbytes for t in tensors.values())
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
  return files
