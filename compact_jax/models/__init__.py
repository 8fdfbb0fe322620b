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


def weight(module: Any, name: str) -> jax.Array:
  """The value of ``module.<name>``, plus its LoRA delta when ``models.lora``
  attached one (``<name>_lora_a``/``<name>_lora_b``). Every weight that LoRA
  may target is read through here, so adapters need no module rewrites."""
  w = getattr(module, name)[...]
  a = getattr(module, f"{name}_lora_a", None)
  if a is None:
    return w
  in_axes, scale = getattr(module, f"{name}_lora_spec")
  b = getattr(module, f"{name}_lora_b")[...]
  return w + lora_delta(a[...], b, w.shape, in_axes, scale).astype(w.dtype)


def project(
  eqn: str,
  x: jax.Array,
  module: Any,
  name: str,
  dtype: jnp.dtype,
  lora_mask: jax.Array | None = None,
  index: int | None = None,
) -> jax.Array:
  """``einsum(eqn, x, W)`` with ``W = weight(module, name)`` (``[index]`` of it if given).

  ``lora_mask`` bool[B, T] (partial LoRA, InternLM-XComposer2): where False the
  token sees the base weight, without the adapter. x is float[B, T, ...].
  """

  def pick(w):
    return (w if index is None else w[index]).astype(dtype)

  y = jnp.einsum(eqn, x, pick(weight(module, name)))
  if lora_mask is None or getattr(module, f"{name}_lora_a", None) is None:
    return y
  base = jnp.einsum(eqn, x, pick(getattr(module, name)[...]))
  m = lora_mask.reshape(lora_mask.shape + (1,) * (y.ndim - lora_mask.ndim))
  return jnp.where(m, y, base)


def lora_delta(
  a: jax.Array, b: jax.Array, shape: tuple[int, ...], in_axes: tuple[int, ...], scale: float
) -> jax.Array:
  """``scale * A @ B`` laid out like the weight.

  Args:
    a: float32[I, r] with I the product of the weight's input dims ``in_axes``.
    b: float32[r, O] with O the product of the remaining (output) dims.
    shape: the weight's shape, e.g. q_einsum's (N, D, H) with in_axes (1,).
    in_axes: the weight axes contracted with the activations.
    scale: alpha / rank.
  """
  out_axes = tuple(i for i in range(len(shape)) if i not in in_axes)
  d = (a @ b) * scale
  d = d.reshape(tuple(shape[i] for i in in_axes) + tuple(shape[i] for i in out_axes))
  order = in_axes + out_axes
  return jnp.transpose(d, tuple(order.index(i) for i in range(len(shape))))


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
