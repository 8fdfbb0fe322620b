"""The converter engine: applies ``tables.Section`` lists in either direction.

Import streams the source one tensor at a time: each HF tensor is read
(memory-mapped), transformed, and written into a preallocated array of the
target's final layout (a scanned model's ``layers/...`` stack is filled layer by
layer), so the peak is one copy of the model plus one source tensor, never two
full copies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from compact_jax.checkpoints.tables import Section

_PER_LAYER = re.compile(r"^(.*?(?:^|/)(?:encoderblock|layers))_(\d+)/(.+)$")


def _locate(
  path: str, expected: Mapping[str, tuple[int, ...]]
) -> tuple[str, tuple[int, ...]] | None:
  """Our per-layer path -> (key in ``expected``, leading index), or None."""
  if path in expected:
    return path, ()
  m = _PER_LAYER.match(path)
  if m:
    stacked = f"{m.group(1)}/{m.group(3)}"
    if stacked in expected:
      return stacked, (int(m.group(2)),)
  return None


def import_tensors(
  source: Mapping[str, np.ndarray],
  sections: Iterable[Section],
  expected: Mapping[str, tuple[int, ...]],
  *,
  ignore: Iterable[str] = (),
  dtype: np.dtype | type = np.float32,
  what: str = "checkpoint",
) -> dict[str, np.ndarray]:
  """Converts HF-named tensors into our flat params.

  Args:
    source: HF tensor name -> array (e.g. a ``SafetensorsCheckpoint``).
    sections: the converter table.
    expected: our '/'-path -> shape (``vlm.param_paths(nnx.state(model))``),
      scanned or per-layer; decides the output layout.
    ignore: regexes of source names to skip on purpose (e.g. rotary buffers).
    dtype: the output dtype (bf16 sources are upcast to it).
    what: a name for error messages (the checkpoint path).

  Returns:
    our '/'-path -> array, exactly the keys of ``expected``.

  Raises:
    KeyError: a source tensor no rule (or ignore pattern) matches, a rule
      target the model lacks, or a model param the checkpoint does not fill.
    ValueError: a shape mismatch, naming the tensor.
  """
  compiled = [(pat, rule, sec.ours_prefix) for sec in sections for pat, rule in sec.compiled()]
  skip = [re.compile(p) for p in ignore]
  out: dict[str, np.ndarray] = {}
  filled: dict[str, int] = {}
  unmatched = []
  for name in source:
    hits = [(m, rule, pre) for pat, rule, pre in compiled if (m := pat.match(name))]
    if not hits:
      if not any(s.search(name) for s in skip):
        unmatched.append(name)
      continue
    tensor = np.asarray(source[name])
    for m, rule, prefix in hits:
      ours = prefix + (rule.ours.format(i=m.group("i")) if "{i}" in rule.ours else rule.ours)
      where = _locate(ours, expected)
      if where is None:
        raise KeyError(f"{what}: tensor {name!r} maps to {ours!r}, which the model does not have")
      key, index = where
      if rule.slot is not None:
        index = (*index, rule.slot)
      piece = tensor
      if rule.part is not None:
        j, count = rule.part
        piece = np.split(tensor, count, axis=0)[j]
      value = np.asarray(rule.transform.to_ours(piece))
      full = expected[key]
      if value.shape != tuple(full[len(index) :]):
        raise ValueError(
          f"{what}: tensor {name!r} -> {key}{list(index)} has shape {value.shape} after "
          f"{rule.transform.name}, model expects {tuple(full[len(index) :])}"
        )
      if key not in out:
        out[key] = np.empty(full, dtype)
        filled[key] = 0
      out[key][index] = value
      filled[key] += value.size
  if unmatched:
    raise KeyError(
      f"{what}: no converter rule for tensors {unmatched[:8]} ({len(unmatched)} in all)"
    )
  missing = sorted(k for k in expected if filled.get(k, 0) != int(np.prod(expected[k])))
  if missing:
    raise KeyError(f"{what}: the checkpoint does not fill model params {missing[:8]}")
  return out


def _per_layer(flat: Mapping[str, np.ndarray], stacked_keys: set[str]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in flat.items():
    m = re.match(r"^(.*?(?:^|/)(?:encoderblock|layers))/(.+)$", key)
    if m and key in stacked_keys:
      for i in range(value.shape[0]):
        out[f"{m.group(1)}_{i}/{m.group(2)}"] = value[i]
    else:
      out[key] = value
  return out


def export_tensors(
  flat: Mapping[str, np.ndarray],
  sections: Iterable[Section],
  *,
  skip: Iterable[str] = (),
  dtype: np.dtype | type | None = None,
) -> dict[str, np.ndarray]:
  """Our flat params (scanned or per-layer) -> HF-named tensors (``hf_prefixes[0]``).

  Every param must be written by some rule unless a ``skip`` regex matches it.
  """
  stacked = {k for k in flat if re.search(r"(?:^|/)(?:encoderblock|layers)/", k)}
  per_layer = _per_layer({k: np.asarray(v) for k, v in flat.items()}, stacked)
  used: set[str] = set()
  out: dict[str, np.ndarray] = {}
  chunks: dict[str, dict[int, np.ndarray]] = {}
  for sec in sections:
    for rule in sec.rules:
      pattern = re.escape(sec.ours_prefix + rule.ours).replace(r"\{i\}", r"(?P<i>\d+)")
      for key, value in per_layer.items():
        m = re.fullmatch(pattern, key)
        if not m:
          continue
        used.add(key)
        piece = value if rule.slot is None else value[rule.slot]
        name = sec.hf_prefixes[0] + (
          rule.hf.format(i=m.group("i")) if "{i}" in rule.hf else rule.hf
        )
        arr = np.ascontiguousarray(rule.transform.to_hf(np.asarray(piece)))
        arr = arr if dtype is None else arr.astype(dtype)
        if rule.part is None:
          out[name] = arr
        else:
          chunks.setdefault(name, {})[rule.part[0]] = arr
  # torch's fused tensors (in_proj) are the concatenation of their parts.
  for name, parts in chunks.items():
    out[name] = np.concatenate([parts[j] for j in range(len(parts))], axis=0)
  skips = [re.compile(p) for p in skip]
  left = sorted(k for k in per_layer if k not in used and not any(s.search(k) for s in skips))
  if left:
    raise KeyError(f"export: no converter rule writes params {left[:8]}")
  return out
