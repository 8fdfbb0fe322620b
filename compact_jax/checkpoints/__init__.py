"""Checkpoint interop: big_vision npz and Hugging Face safetensors, import and export.

- ``tables``: the declarative converter tables (HF name template -> our path, transform).
- ``convert``: the engine applying a table in either direction, streaming.
- ``hf``: HF checkpoint directories (config.json <-> variants, load/export).
- ``big_vision``: npz files (per-layer and scanned), SigLIP and PaliGemma.
- ``safetensors_io``: numpy-only safetensors reader/writer, sharded indexes.

``assign`` and ``init_from_npz`` load a subset of a model's params (for
example a pretrained ViT and LLM with a fresh connector).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from compact_jax.checkpoints import big_vision
from compact_jax.models import vlm


def assign(model: nnx.Module, flat: Mapping[str, np.ndarray]) -> None:
  """Sets the params named in ``flat`` ('/'-paths, exact shapes); leaves the rest alone."""
  state = nnx.state(model)
  have = vlm.param_paths(state)
  unknown = sorted(set(flat) - set(have))
  if unknown:
    raise KeyError(f"assign: the model has no params {unknown[:8]}")
  for path, var in nnx.to_flat_state(state):
    key = "/".join(str(p) for p in path)
    if key in flat:
      value = jnp.asarray(flat[key])
      if value.shape != have[key]:
        raise ValueError(f"assign: {key} has shape {value.shape}, model expects {have[key]}")
      var.set_value(value.astype(var.get_value().dtype))
  nnx.update(model, state)


def init_from_npz(
  model: nnx.Module, path: str, parts: Mapping[str, str], *, ignore: Iterable[str] = ()
) -> list[str]:
  """Loads every model param under ``parts``' values from a big_vision npz.

  ``parts`` maps npz prefixes to our prefixes, e.g. ``{"params/img/": "img/",
  "params/llm/": "llm/"}``; params outside those prefixes keep their init.
  npz keys outside ``parts`` must match ``ignore``. Returns the loaded paths.
  """
  ours = tuple(parts.values())
  expected = {k: s for k, s in vlm.param_paths(nnx.state(model)).items() if k.startswith(ours)}
  flat = big_vision.import_npz(
    big_vision.NpzCheckpoint(path), expected, parts, ignore=ignore, what=path
  )
  assign(model, flat)
  return sorted(flat)
