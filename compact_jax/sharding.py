"""Logical axis names, and the one place that maps them onto a mesh.

Model files name axes logically (``"embed"``, ``"mlp"``, ``"act_batch"``) and
never name physical mesh axes. The config carries one rules table
(``config.sharding_rules``: logical name -> mesh axis or axes or None) that
the trainer installs with :func:`axis_rules` around tracing.

Weights: ``vocab``, ``embed``, ``mlp``, ``heads``, ``kv_heads``, ``head_dim``,
``layers`` (the scanned layer axis), ``patch`` / ``channels`` (patch kernels),
``norm``, ``position``, ``lora_rank``.
Activations: ``act_batch``, ``act_len``, ``act_embed``, ``act_heads``,
``act_mlp``, ``act_vocab``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec as P

LogicalAxes = tuple[str | None, ...]
Rules = Sequence[tuple[str, Any]]


def param(value: jax.Array, axes: LogicalAxes, cls: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
  """Wraps ``value`` as a variable annotated with logical ``axes``.

  Eager sharding is off: variables are created abstractly or on one device
  and placed by the trainer's ``jit(out_shardings=...)``, so model code works
  the same with and without an active mesh.
  """
  if len(axes) != jnp.ndim(value):
    raise ValueError(f"logical axes {axes} do not match shape {jnp.shape(value)}")
  return cls(value, out_sharding=tuple(axes), eager_sharding=False)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
  """Installs the logical->mesh rules table for tracing and partition specs."""
  with flax_spmd.logical_axis_rules(tuple((k, v) for k, v in rules)):
    yield


def logical_to_spec(axes: LogicalAxes, rules: Rules | None = None) -> P:
  """Maps logical axis names to a PartitionSpec; unknown names replicate."""
  table = dict(flax_spmd.get_logical_axis_rules() if rules is None else rules)
  out = []
  used: set[str] = set()
  for name in axes:
    target = table.get(name) if name is not None else None
    # A mesh axis may shard only one dimension; later uses fall back to
    # replication rather than producing an invalid spec.
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(n for n in names if n not in used)
    used.update(names)
    out.append(None if not names else names[0] if len(names) == 1 else names)
  return P(*out)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
  """Constrains an activation's sharding by logical names.

  A no-op outside a mesh context or when no rules are installed, so models
  run unchanged in eager tests and on one device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not flax_spmd.get_logical_axis_rules():
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes))
