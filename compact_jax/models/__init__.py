"""The VLM: SigLIP ViT (``siglip``) -> connector (``connectors``) -> Gemma decoder (``llm``).

``vlm.VLM`` puts them together; ``eval.decode`` runs it with a KV cache.

This package module also holds the few pieces both towers share: the compute
dtypes, the rematerialisation policies, and how a stack of identical layers is
created (``stack_layers``) and run (``scan_stacked``). Both towers use them so
that a scanned ViT and a scanned LLM behave alike (one compile of one layer,
the same remat semantics, "layers" as the stacked logical axis), and how
weights are read with their LoRA adapters (``weight``, ``project``; the
adapters themselves are made by ``models.lora``).
"""

from __future__ import annotations

import dataclasses
import math
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


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """How the adapter ``<name>_lora_a``/``<name>_lora_b`` on a weight is laid out
  (set by ``models.lora.apply_lora``; static, so it lives in the graphdef).

  Attributes:
    in_axes: the axes of one slice of the weight contracted with the activations
      (``(1,)`` for q_einsum's ``[N, D, H]``).
    scale: alpha / r.
    dropout: peft's ``lora_dropout``, the rate at which the adapter's input
      activations are dropped in training (``project`` with an rng); the base
      weight always sees them undropped.
    sliced: the weight has a leading slice axis (kv_einsum's ``[2, K, D, H]``,
      gating_einsum's ``[2, D, F]``) and each slice its own adapter,
      ``A float32[S, I, r]``, ``B float32[S, r, O]``, as peft's separate
      k_proj/v_proj (gate_proj/up_proj) adapters.
  """

  in_axes: tuple[int, ...]
  scale: float
  sliced: bool = False
  dropout: float = 0.0


def lora_spec(module: Any, name: str) -> LoraSpec | None:
  """The ``LoraSpec`` of ``module.<name>``'s adapter, or None without one."""
  return getattr(module, f"{name}_lora_spec", None)


def weight(module: Any, name: str) -> jax.Array:
  """The value of ``module.<name>``, plus its LoRA delta ``scale * A @ B`` (laid
  out like the weight) when ``models.lora`` attached an adapter. Modules whose
  einsum is not a ``project`` call (siglip.py) read their weights here, so
  adapters need no module rewrites; ``project`` applies adapters more cheaply."""
  w = getattr(module, name)[...]
  spec = lora_spec(module, name)
  if spec is None:
    return w
  if spec.dropout > 0:
    # A merged weight has no per-token adapter input to drop; ignoring the rate
    # would silently train a different model than the config says.
    raise ValueError(
      f"LoRA dropout {spec.dropout} on {type(module).__name__}.{name}: this weight is read "
      "merged (models.weight), which cannot drop the adapter's input; set "
      "model.lora.dropout = 0 or target only LLM weights (read with models.project)"
    )
  a = getattr(module, f"{name}_lora_a")[...]
  b = getattr(module, f"{name}_lora_b")[...]
  return w + lora_delta(a, b, w.shape, spec.in_axes, spec.scale).astype(w.dtype)


def project(
  eqn: str,
  x: jax.Array,
  module: Any,
  name: str,
  dtype: jnp.dtype,
  lora_mask: jax.Array | None = None,
  index: int | None = None,
  rng: jax.Array | None = None,
) -> jax.Array:
  """``einsum(eqn, x, W)`` with ``W = module.<name>`` (``W[index]`` if given), plus
  its LoRA adapter applied to the activations: ``scale * (x . A) . B``.

  Without ``lora_mask`` or dropout, and when ``eqn`` is a plain matmul in the
  adapter's layout, the forward multiplies once by the merged weight
  ``W + scale * A @ B`` and a hand-written backward keeps LoRA's rank-r algebra
  (``_merged_lora_matmul``); otherwise the adapter runs on the activations. Either
  way no full ``[I, O]`` weight gradient is formed for a frozen W, and
  ``lora_mask`` masks the rank-r activations ``x . A`` rather than running a
  second full einsum. For every ``eqn`` the result equals the einsum with the
  merged weight ``weight(module, name)``.

  Args:
    eqn: a two-operand einsum whose weight operand is W (or one slice of it).
    x: float[B, T, ...] in ``dtype``.
    lora_mask: bool[B, T] (partial LoRA, InternLM-XComposer2): where False the
      token sees the base weight, without the adapter.
    index: a slice of a fused weight (kv_einsum's k = 0, v = 1); a sliced
      adapter (``LoraSpec.sliced``) contributes only that slice's A and B.
    rng: a PRNG key in training: with ``LoraSpec.dropout`` p > 0 the adapter
      sees ``x * keep / (1 - p)``, keep ~ Bernoulli(1 - p) per element (peft's
      ``lora_B(lora_A(dropout(x)))``); the base einsum sees x. None (eval,
      decode) or p = 0 applies no dropout.
  """
  spec = lora_spec(module, name)
  prepared = getattr(module, DECODE_WEIGHTS, None)
  if prepared is not None and spec is None:
    y = _prepared_matmul(prepared, eqn, x, module, name, index, dtype)
    if y is not None:
      return y
  w = getattr(module, name)[...]
  if index is not None:
    w = w[index]
  if spec is None:
    return jnp.einsum(eqn, x, w.astype(dtype))
  sliced = spec.sliced
  if index is not None and not sliced:
    raise ValueError(
      f"project({eqn!r}, index={index}) on {name!r}: its LoRA adapter spans every slice; "
      "a fused weight needs an unnamed leading slice axis (see models.lora)"
    )
  a = getattr(module, f"{name}_lora_a")[...]
  b = getattr(module, f"{name}_lora_b")[...]
  if index is not None:
    a, b, sliced = a[index], b[index], False
  if lora_mask is None and not sliced and (rng is None or spec.dropout == 0):
    y = _merged_lora_project(eqn, x, w, a, b, spec, dtype)
    if y is not None:
      return y
  slice_shape = w.shape[1:] if sliced else w.shape
  y = jnp.einsum(eqn, x, w.astype(dtype))
  xa_eqn, delta_eqn = lora_einsums(eqn, spec.in_axes, sliced=sliced)
  # The token dims (x's leading letters that W lacks) are merged into one, so the
  # adapter's einsums are plain 2-D matmuls: with [B, T] kept apart, XLA:CPU's
  # layout assignment transposed the [B, T, F] output gradient for B's gradient
  # through a strided copy that cost more than the rest of the layer (issue 7).
  xs, ws = eqn.split("->")[0].split(",")
  tok = 0
  while tok < len(xs) and xs[tok] not in ws:
    tok += 1
  toks = xs[:tok]
  if tok > 1 and all(e.count(toks) == 2 for e in (xa_eqn, delta_eqn)):
    tl = next(c for c in "MLJPUV" if c not in eqn)
    xa_eqn, delta_eqn = xa_eqn.replace(toks, tl), delta_eqn.replace(toks, tl)
    x = x.reshape((-1, *x.shape[tok:]))
  else:
    tok = 0
  in_dims = tuple(slice_shape[i] for i in spec.in_axes)
  out_dims = tuple(d for i, d in enumerate(slice_shape) if i not in spec.in_axes)
  lead, r = a.shape[:-2], a.shape[-1]
  a = a.reshape((*lead, *in_dims, r)).astype(dtype)
  b = b.reshape((*lead, r, *out_dims)).astype(dtype)
  if rng is not None and spec.dropout > 0:
    x = lora_dropout(rng, x, spec.dropout)
  xa = jnp.einsum(xa_eqn, x, a) * jnp.asarray(spec.scale, dtype)
  if lora_mask is not None:
    # xa is float[B*T, ..., r]: zeroing a token's row zeroes its delta.
    mask = lora_mask.reshape((-1,) if tok > 1 else lora_mask.shape)
    m = mask.reshape(mask.shape + (1,) * (xa.ndim - mask.ndim))
    xa = jnp.where(m, xa, jnp.zeros((), xa.dtype))
  return y + jnp.einsum(delta_eqn, xa, b).reshape(y.shape)


def _matmul_layout(eqn: str, in_axes: tuple[int, ...] | None = None):
  """How ``eqn`` is a 2-D matmul ``x[M, I] @ W[I, O]``: (the number of x's leading
  dims, W's axes in [in..., out...] order, how many of them are inputs), or None
  when it is not one: x must be its leading letters then the contracted ones, in
  W's order (``in_axes``' order, when given), and the output the leading letters
  then W's kept ones in W's order."""
  lhs, out = eqn.replace(" ", "").split("->")
  xs, ws = lhs.split(",")
  contracted = [c for c in xs if c in ws and c not in out]
  lead = xs[: len(xs) - len(contracted)]
  kept = [c for c in ws if c in out]
  if "".join(contracted) != xs[len(lead) :] or out != lead + "".join(kept):
    return None
  if in_axes is not None and [ws[i] for i in in_axes] != contracted:
    return None
  return len(lead), [ws.index(c) for c in contracted + kept], len(contracted)


@jax.custom_vjp
def _merged_lora_matmul(x, w, a, b, scale):
  """``x @ (W + scale * A @ B)``: x float[M, I], W float[I, O], A float[I, r], B float[r, O].

  The forward multiplies once by the merged weight; the backward keeps LoRA's
  rank-r algebra for A and B and uses the merged weight for x. Against
  ``x.W + scale * (x.A).B`` (peft's form, and autodiff's of it) this drops a
  [M, r] x [r, O] matmul and a [M, O] add from the forward and a [M, r] x [r, I]
  matmul and an [M, I] add from the backward: memory-bound passes that cost
  ~10% of the tiny train step on XLA:CPU (issue 7). W's cotangent is computed
  only if someone uses it (XLA drops it for a frozen W).
  """
  return x @ (w + (a @ b) * scale)


def _merged_lora_fwd(x, w, a, b, scale):
  # The merged weight is not a residual: saved for the backward, every adapted layer
  # would hold a second copy of its weights until then (a 7B model's worth in all).
  # Re-merging costs an [I, r] x [r, O] product.
  return x @ (w + (a @ b) * scale), (x, w, a, b, scale)


def _merged_lora_bwd(res, dy):
  x, w, a, b, scale = res
  wm = w + (a @ b) * scale
  dyb = dy @ b.T
  return (
    dy @ wm.T,
    x.T @ dy,
    (x.T @ dyb) * scale,
    ((x @ a).T @ dy) * scale,
    jnp.zeros_like(scale),
  )


_merged_lora_matmul.defvjp(_merged_lora_fwd, _merged_lora_bwd)


def _merged_lora_project(eqn, x, w, a, b, spec: LoraSpec, dtype) -> jax.Array | None:
  """``project``'s LoRA einsum through `_merged_lora_matmul`, or None when ``eqn``
  is not a plain 2-D matmul in the adapter's layout (`_matmul_layout`)."""
  layout = _matmul_layout(eqn, spec.in_axes)
  if layout is None:
    return None
  n_lead, perm, n_in = layout
  w = jnp.transpose(w, perm)
  n_i = math.prod(w.shape[:n_in])
  out_dims = w.shape[n_in:]
  y = _merged_lora_matmul(
    x.reshape(-1, n_i),
    w.reshape(n_i, -1).astype(dtype),
    a.reshape(n_i, -1).astype(dtype),
    b.reshape(b.shape[0], -1).astype(dtype),
    jnp.asarray(spec.scale, dtype),
  )
  return y.reshape((*x.shape[:n_lead], *out_dims))


# A dict set on a module (``prepare_decode_weights``) while a decoder traces: ``project``
# keeps each weight there as the 2-D [in, out] matrix its einsum multiplies by.
DECODE_WEIGHTS = "_decode_weights"


def prepare_decode_weights(model: Any) -> None:
  """Lets ``project`` cache every weight of ``model``'s modules as a row-major 2-D
  matrix at its first use (inside one trace only).

  A decoder calls this on its freshly merged model before the prefill: the prefill is
  then the first use, outside the token loop, and the loop body reuses the matrices.
  Without it, XLA:CPU re-sliced the fused weights (``gating_einsum[i]``, ``kv_einsum[i]``)
  and re-laid ``[N, D, H]`` weights out for the dot on every generated token, copies that
  ``while_loop`` invariant code motion does not hoist and that cost more than the
  token's arithmetic (issue 7). Modules with LoRA adapters keep the einsum path.
  """
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Module):
      object.__setattr__(module, DECODE_WEIGHTS, {})


def _prepared_matmul(
  cache: dict, eqn: str, x: jax.Array, module: Any, name: str, index: int | None, dtype
) -> jax.Array | None:
  """``einsum(eqn, x, W)`` as ``x2d @ W2d`` with W2d cached, or None when ``eqn`` is not
  "x's leading letters, then the contracted ones -> the leading letters, then the
  weight's kept ones" (then ``project`` runs the einsum)."""
  key = (name, index, eqn, jnp.dtype(dtype).name)
  if key not in cache:
    layout = _matmul_layout(eqn)
    if layout is None:
      cache[key] = None
    else:
      n_lead, perm, n_contracted = layout
      w = getattr(module, name)[...]
      if index is not None:
        w = w[index]
      w = jnp.transpose(w, perm)
      n_in = math.prod(w.shape[:n_contracted])
      cache[key] = (w.reshape(n_in, -1).astype(dtype), w.shape[n_contracted:], n_lead)
  entry = cache[key]
  if entry is None:
    return None
  w2d, out_dims, n_lead = entry
  y = x.reshape((*x.shape[:n_lead], -1)) @ w2d
  return y.reshape((*x.shape[:n_lead], *out_dims))


def lora_dropout(rng: jax.Array, x: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout: ``x * keep / (1 - rate)`` with keep ~ Bernoulli(1 - rate)
  drawn by ``jax.random.bernoulli(rng, 1 - rate, x.shape)``; x float[...]."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"LoRA dropout rate must be in [0, 1), got {rate}")
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def site_rng(rng: jax.Array | None, site: int) -> jax.Array | None:
  """``rng`` folded with a fixed projection-site id (None stays None), so the
  adapters of one layer never share a dropout mask."""
  return None if rng is None else jax.random.fold_in(rng, site)


def lora_einsums(eqn: str, in_axes: tuple[int, ...], *, sliced: bool = False) -> tuple[str, str]:
  """The two rank-r einsums that apply an adapter on ``eqn``'s weight operand.

  ``"BTD,NDH->BTNH"`` with in_axes (1,) gives ``("BTD,Dr->BTr", "BTr,rNH->BTNH")``
  (r a letter ``eqn`` does not use): x . A with A float[D, r], then . B with B
  float[r, N, H]. With ``sliced`` the weight operand's first letter is an
  unindexed slice axis that A and B carry in front.

  Raises:
    ValueError: when the axes ``eqn`` contracts are not the adapter's input axes
      (the weight's logical axis names and the einsum disagree).
  """
  lhs, out = eqn.replace(" ", "").split("->")
  xs, ws = lhs.split(",")
  s, per = (ws[0], ws[1:]) if sliced else ("", ws)
  ins = "".join(per[i] for i in in_axes)
  outs = "".join(c for i, c in enumerate(per) if i not in in_axes)
  keep = "".join(c for c in xs if c not in ws)
  contracted = {c for c in xs if c in ws and c not in out}
  if contracted != set(ins) or set(out) != set(keep + s + outs) or set(s + outs) & set(xs):
    raise ValueError(
      f"LoRA on einsum {eqn!r}: the adapter contracts {ins!r} of the weight's {ws!r}, "
      f"the einsum contracts {''.join(sorted(contracted))!r}"
    )
  r = next(c for c in "rRzZqQ" if c not in eqn)
  return f"{xs},{s}{ins}{r}->{keep}{s}{r}", f"{keep}{s}{r},{s}{r}{outs}->{out}"


def lora_delta(
  a: jax.Array, b: jax.Array, shape: tuple[int, ...], in_axes: tuple[int, ...], scale: float
) -> jax.Array:
  """``scale * A @ B`` laid out like the weight (the merged form of an adapter).

  Args:
    a: float32[..., I, r] with I the product of one slice's input dims
      ``in_axes``; leading dims (slices, scanned layers) are the weight's
      leading dims, each with its own adapter.
    b: float32[..., r, O] with O the product of the remaining (output) dims.
    shape: the weight's shape, e.g. q_einsum's (N, D, H) with in_axes (1,), or
      kv_einsum's (2, K, D, H) with a float32[2, D, r] and in_axes (1,) of (K, D, H).
    in_axes: the axes of ``shape[len(leading dims):]`` contracted with the activations.
    scale: alpha / rank.
  """
  lead = tuple(a.shape[:-2])
  n = len(lead)
  if tuple(shape[:n]) != lead or tuple(b.shape[:-2]) != lead:
    raise ValueError(f"LoRA factors {a.shape}, {b.shape} do not fit a weight of shape {shape}")
  per = tuple(shape[n:])
  out_axes = tuple(i for i in range(len(per)) if i not in in_axes)
  d = jnp.matmul(a, b) * scale
  d = d.reshape(lead + tuple(per[i] for i in in_axes) + tuple(per[i] for i in out_axes))
  order = in_axes + out_axes
  perm = tuple(order.index(i) + n for i in range(len(per)))
  return jnp.transpose(d, tuple(range(n)) + perm)


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
