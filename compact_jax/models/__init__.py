"""The VLM: SigLIP ViT (``siglip``) -> connector (``connectors``) -> Gemma decoder (``llm``).

``vlm.VLM`` puts them together; ``eval.decode`` runs it with a KV cache.

This package module also holds the few pieces both towers share: the compute
dtypes, the rematerialisation policies, and how a stack of identical layers is
created (``stack_layers``) and run (``scan_stacked``). Both towers use them so
that a scanned ViT and a scanned LLM behave alike (one compile of one layer,
the same remat semantics, "layers" as the stacked logical axis).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES: dict[str, jnp.dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# "none" runs layers without remat; the other keys are jax.checkpoint_policies
# names, listed explicitly so a typo fails here rather than deep inside jit.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
  "none": None,
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "everything_saveable": jax.checkpoint_policies.everything_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "checkpoint_dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def compute_dtype(name: str) -> jnp.dtype:
  """The jnp dtype for a config's ``model.dtype`` string."""
  if name not in DTYPES:
    raise ValueError(f"Unknown model dtype {name!r}; known: {sorted(DTYPES)}")
  return DTYPES[name]


def check_remat_policy(name: str) -> str:
  if name not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat_policy {name!r}; known: {sorted(REMAT_POLICIES)}")
  return name


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs):
  """Creates ``num_layers`` layers as one module whose params have a leading layer axis.

  Each param's logical axes gain a leading "layers" name, so the sharding rules
  see ``("layers", "embed", "mlp")`` for a stacked ``("embed", "mlp")`` kernel.
  Every layer draws its own random init.
  """

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r: nnx.Rngs) -> nnx.Module:
    return make_layer(r)

  return create(rngs)


def scan_stacked(
  stacked: nnx.Module,
  body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
  carry: Any,
  xs: Any = None,
  *,
  remat_policy: str = "none",
  num_layers: int | None = None,
) -> tuple[Any, Any]:
  """Runs ``body(layer, carry, x) -> (carry, y)`` over a stacked module with ``lax.scan``.

  The layer's params are split off once and sliced per step, so the layer is
  traced (and compiled) once whatever the depth.

  Args:
    stacked: a module made by ``stack_layers``.
    body: one layer's computation; ``layer`` is the merged per-layer module.
    carry: the loop state (typically ``float[B, T, D]`` activations).
    xs: per-layer inputs with a leading layer axis (e.g. KV caches), or None.
    remat_policy: a ``REMAT_POLICIES`` key; rematerialises each layer.
    num_layers: run only the first ``num_layers`` layers (default: all).

  Returns:
    (carry, ys) with ys stacked along a leading layer axis.
  """
  graphdef, state = nnx.split(stacked)
  if num_layers is not None:
    state = jax.tree.map(lambda a: a[:num_layers], state)
    if xs is not None:
      xs = jax.tree.map(lambda a: a[:num_layers], xs)

  def step(c, inputs):
    layer_state, x = inputs
    return body(nnx.merge(graphdef, layer_state), c, x)

  policy = REMAT_POLICIES[check_remat_policy(remat_policy)]
  if remat_policy != "none":
    # prevent_cse=False is safe (and faster) inside scan, per jax.checkpoint's docs.
    step = jax.checkpoint(step, policy=policy, prevent_cse=False)
  return jax.lax.scan(step, carry, (state, xs))


def remat_layer(fn: Callable[..., Any], remat_policy: str) -> Callable[..., Any]:
  """Wraps one unscanned layer call in ``nnx.remat`` when a policy is set."""
  if check_remat_policy(remat_policy) == "none":
    return fn
  return nnx.remat(fn, policy=REMAT_POLICIES[remat_policy])
