"""The device mesh, and shardings derived from logical axis names."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from compact_jax import sharding as sharding_lib

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every axis that carries data (see config.sharding_rules).
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(enabled: bool | None = None) -> None:
  """Joins a multi-host job when asked to, or when the environment says so.

  ``jax.distributed.initialize()`` auto-detects Cloud TPU VMs, SLURM, Open MPI
  and Kubernetes; it must run before any device is touched.
  """
  env_hints = (
    "TPU_WORKER_HOSTNAMES",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "JAX_COORDINATOR_ADDRESS",
  )
  if enabled is None:
    enabled = (
      any(k in os.environ for k in env_hints) and int(os.environ.get("SLURM_NTASKS", "2")) > 1
    )
  if enabled and not jax.distributed.is_initialized():
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def resolve_mesh_shape(
  axes: Sequence[tuple[str, int]], num_devices: int
) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Fills at most one ``-1`` size so the product equals ``num_devices``."""
  names = tuple(name for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  if set(names) - set(MESH_AXES) or len(set(names)) != len(names):
    raise ValueError(f"Mesh axes must be distinct names from {MESH_AXES}, got {names}")
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {dict(axes)}")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide into mesh {dict(axes)}")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"Mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, have {num_devices}"
    )
  return names, tuple(sizes)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh with Auto axis types (passed explicitly: make_mesh's default changed)."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = resolve_mesh_shape(axes, len(devices))
  if devices == list(jax.devices()):
    return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names))
  return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=(AxisType.Auto,) * len(names))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension split over the data-carrying axes."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def params_shardings(
  abstract_state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, Any]]
) -> dict:
  """Pure-dict tree of NamedShardings for an (abstract) nnx.State of params.

  Each variable's ``out_sharding`` metadata holds logical axis names; the
  rules table maps them onto ``mesh``. A dimension whose size the mesh axis
  does not divide falls back to replication (tiny test models).
  """
  flat: dict[tuple, NamedSharding] = {}
  for path, var in nnx.to_flat_state(abstract_state):
    logical = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    spec = sharding_lib.logical_to_spec(tuple(logical), rules)
    fixed = []
    for dim, axes in zip(var.shape, tuple(spec) + (None,) * (len(var.shape) - len(spec))):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      size = math.prod(mesh.shape[n] for n in names) if names else 1
      fixed.append(axes if names and dim % size == 0 else None)
    flat[tuple(str(p) for p in path)] = NamedSharding(mesh, P(*fixed))
  return unflatten(flat)


def unflatten(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def path_names(tree: Mapping) -> dict[str, Any]:
  """'/'-joined paths of a nested dict's leaves, e.g. ``img/embedding/kernel``."""
  out: dict[str, Any] = {}

  def walk(node, prefix):
    for k, v in node.items():
      name = f"{prefix}/{k}" if prefix else str(k)
      if isinstance(v, Mapping):
        walk(v, name)
      else:
        out[name] = v

  walk(tree, "")
  return out
