"""big_vision ``.npz`` checkpoints: SigLIP towers and PaliGemma, import and export.

Our parameter names are big_vision's, so the table here is about layout, not
names: a '/'-joined npz key ``params/img/Transformer/encoderblock_3/...``
(per-layer, SigLIP webli releases) or ``params/img/Transformer/encoderblock/...``
(scanned, PaliGemma) lands on whichever layout the model was built with.
``SUBTREES`` says where each model part lives in a file. Files are read with
``np.load(..., allow_pickle=False)`` and lazily (one array at a time); numpy
void ``|V2`` arrays are big_vision's bfloat16 and are viewed as such.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

# model part -> npz key prefix. A SigLIP file holds "img", "txt", "t", "b";
# a PaliGemma file holds "img" (with img/head, its linear connector) and "llm".
SUBTREES: dict[str, str] = {"img": "params/img/", "llm": "params/llm/", "txt": "params/txt/"}

_STACKED = re.compile(r"^(.*?(?:^|/)(?:encoderblock|layers))/(.+)$")
_PER_LAYER = re.compile(r"^(.*?(?:^|/)(?:encoderblock|layers))_(\d+)/(.+)$")


def recover_dtype(a: np.ndarray) -> np.ndarray:
  """big_vision stores bfloat16 as 2-byte void; view it back."""
  if a.dtype.kind == "V" and a.dtype.itemsize == 2:
    return a.view(ml_dtypes.bfloat16)
  return a


class NpzCheckpoint(Mapping):
  """'/'-key -> array view of an ``.npz`` file, read lazily, pickles refused."""

  def __init__(self, path: str):
    self.path = path
    self._npz = np.load(path, allow_pickle=False)

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._npz.files:
      raise KeyError(f"{self.path}: no array {key!r}")
    return recover_dtype(self._npz[key])

  def __iter__(self):
    return iter(self._npz.files)

  def __len__(self) -> int:
    return len(self._npz.files)


def import_npz(
  source: Mapping[str, np.ndarray],
  expected: Mapping[str, tuple[int, ...]],
  parts: Mapping[str, str],
  *,
  ignore: Iterable[str] = (),
  dtype: np.dtype | type = np.float32,
  what: str = "npz",
) -> dict[str, np.ndarray]:
  """Maps big_vision arrays onto our params, per-layer or scanned as ``expected`` is.

  Args:
    source: npz key -> array (``NpzCheckpoint``).
    expected: our '/'-path -> shape (``vlm.param_paths(nnx.state(model))``).
    parts: npz key prefix -> our path prefix, e.g. ``{"params/img/": "img/",
      "params/llm/": "llm/"}`` for a PaliGemma VLM or ``{"params/img/": ""}``
      for a bare ViT.
    ignore: regexes of npz keys to skip on purpose (e.g. ``^params/txt/``).
    dtype: output dtype.
    what: a name for error messages.

  Raises:
    KeyError: an npz key outside ``parts``/``ignore``, one the model lacks,
      or a model param the file does not fill.
    ValueError: shape mismatches, naming the key.
  """
  skip = [re.compile(p) for p in ignore]
  out: dict[str, np.ndarray] = {}
  filled: dict[str, int] = {}
  unmatched = []
  for key in source:
    prefix = next((p for p in parts if key.startswith(p)), None)
    if prefix is None:
      if not any(s.search(key) for s in skip):
        unmatched.append(key)
      continue
    if any(s.search(key) for s in skip):
      continue
    ours = parts[prefix] + key[len(prefix) :]
    value = source[key]
    placements: list[tuple[str, tuple[int, ...], np.ndarray]] = []
    if ours in expected:
      placements.append((ours, (), value))
    elif (m := _PER_LAYER.match(ours)) and f"{m.group(1)}/{m.group(3)}" in expected:
      placements.append((f"{m.group(1)}/{m.group(3)}", (int(m.group(2)),), value))
    elif (m := _STACKED.match(ours)) and f"{m.group(1)}_0/{m.group(2)}" in expected:
      placements += [(f"{m.group(1)}_{i}/{m.group(2)}", (), value[i]) for i in range(len(value))]
    else:
      raise KeyError(f"{what}: array {key!r} maps to {ours!r}, which the model does not have")
    for target, index, part in placements:
      want = tuple(expected[target][len(index) :])
      if part.shape != want:
        raise ValueError(
          f"{what}: array {key!r} has shape {part.shape}, model's {target} needs {want}"
        )
      if target not in out:
        out[target] = np.empty(expected[target], dtype)
        filled[target] = 0
      out[target][index] = part
      filled[target] += part.size
  if unmatched:
    raise KeyError(
      f"{what}: arrays {unmatched[:8]} are outside {sorted(parts)} ({len(unmatched)} in all)"
    )
  missing = sorted(k for k in expected if filled.get(k, 0) != int(np.prod(expected[k])))
  if missing:
    raise KeyError(f"{what}: the file does not fill model params {missing[:8]}")
  return out


def export_npz(
  flat: Mapping[str, np.ndarray],
  path: str,
  parts: Mapping[str, str],
  *,
  per_layer: bool = False,
  dtype: np.dtype | type | None = None,
) -> None:
  """Writes our flat params as a big_vision npz.

  Args:
    flat: our '/'-path -> array.
    parts: our path prefix -> npz key prefix, e.g. ``{"img/": "params/img/",
      "llm/": "params/llm/"}``; every param must fall under one.
    per_layer: write ``encoderblock_{i}``/``layers_{i}`` (SigLIP releases)
      instead of stacked arrays (PaliGemma).
    dtype: cast (``ml_dtypes.bfloat16`` is stored as big_vision's ``|V2``).
  """
  per: dict[str, np.ndarray] = {}
  for key, value in flat.items():
    value = np.asarray(value if dtype is None else np.asarray(value).astype(dtype))
    m = _STACKED.match(key)
    if m:
      per.update({f"{m.group(1)}_{i}/{m.group(2)}": value[i] for i in range(len(value))})
    else:
      per[key] = value
  if not per_layer:
    groups: dict[str, dict[int, np.ndarray]] = {}
    for key in [k for k in per if _PER_LAYER.match(k)]:
      m = _PER_LAYER.match(key)
      groups.setdefault(f"{m.group(1)}/{m.group(3)}", {})[int(m.group(2))] = per.pop(key)
    per.update({k: np.stack([g[i] for i in range(len(g))]) for k, g in groups.items()})
  out = {}
  for key, value in per.items():
    prefix = next((p for p in sorted(parts, key=len, reverse=True) if key.startswith(p)), None)
    if prefix is None:
      raise KeyError(f"export_npz: param {key!r} is outside {sorted(parts)}")
    if value.dtype == ml_dtypes.bfloat16:
      value = value.view("V2")
    out[parts[prefix] + key[len(prefix) :]] = value
  np.savez(path, **out)
