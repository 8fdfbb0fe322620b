"""The train step: a pure function of (state, batch), jitted once per bucket.

With packing (``config.data.pack_length`` > 0) batches are packed rows
(``data.pipeline.pack_rows``: ``PACKED_BATCH_KEYS``) of one fixed shape, so the
step compiles once; the loss is the same per-answer-token mean either way.
With dynamic resolution (``config.model.dynamic_res``) images are a global view
plus tiles, ``image`` float32[B, V, S, S, 3], with ``tile_layout`` int32[B, 4]
(``TILED_BATCH_KEYS``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from compact_jax import sharding as sharding_lib
from compact_jax.train import mesh as mesh_lib
from compact_jax.train import optimizer as optimizer_lib
from compact_jax.train.state import StateSetup, TrainState, merge_model

Batch = dict[str, jax.Array]
BATCH_KEYS = ("image", "has_image", "tokens", "mask_ar", "mask_loss", "mask_input")
# Packed rows add each token's example, RoPE position and image-token source.
PACKED_BATCH_KEYS = (*BATCH_KEYS, "segment_ids", "positions", "image_index")
# Dynamic resolution adds each example's tile layout (rows, cols, height, width).
TILED_BATCH_KEYS = (*BATCH_KEYS, "tile_layout")


def is_packed(config) -> bool:
  """Whether ``config`` trains on packed rows."""
  return config.data.pack_length > 0


def is_tiled(config) -> bool:
  """Whether ``config``'s images are tiled (``model.dynamic_res``)."""
  return bool(config.model.dynamic_res.mode)


def batch_keys(packed: bool, tiled: bool = False) -> tuple[str, ...]:
  if packed:
    return PACKED_BATCH_KEYS
  return TILED_BATCH_KEYS if tiled else BATCH_KEYS


def forward(
  model, batch: Batch, *, packed: bool, dropout_rng: jax.Array | None = None
) -> jax.Array:
  """float32[B, T, V] logits of ``model`` (a ``VLM``) on an unpacked or packed batch;
  either way the logit at t predicts ``batch["tokens"][:, t + 1]``. ``dropout_rng``
  (training only) drives LoRA dropout."""
  if packed:
    logits, _ = model.forward_packed(
      batch["image"],
      batch["tokens"],
      batch["mask_ar"],
      batch["mask_input"],
      batch["segment_ids"],
      batch["positions"],
      batch["image_index"],
      dropout_rng=dropout_rng,
    )
    return logits
  logits, _ = model(
    batch["image"],
    batch["tokens"],
    batch["mask_ar"],
    batch["mask_input"],
    batch["has_image"],
    tile_layout=batch.get("tile_layout"),
    dropout_rng=dropout_rng,
  )
  return logits


def answer_weights(batch: Batch) -> jax.Array:
  """float32[B, T - 1]: 1 where ``tokens[:, t + 1]`` is a (non-padding) answer token."""
  return (batch["mask_loss"][:, 1:] * batch["mask_input"][:, 1:]).astype(jnp.float32)


def token_loss_sums(
  logits: jax.Array, batch: Batch, *, label_smoothing: float = 0.0
) -> dict[str, jax.Array]:
  """Sums over answer tokens, which microbatches and devices can add up.

  Args:
    logits: float32[B, T, V]; the logit at t predicts ``tokens[:, t + 1]``.
    batch: needs ``tokens`` int32[B, T], ``mask_loss`` int32[B, T] and
      ``mask_input`` bool[B, T].
    label_smoothing: optax-style smoothing.

  Returns:
    float32 scalars ``nll`` (summed cross-entropy), ``n_tokens`` and ``n_correct``.
  """
  targets = batch["tokens"][:, 1:]
  weights = answer_weights(batch)
  logits = logits[:, :-1].astype(jnp.float32)
  vocab = logits.shape[-1]
  labels = optax.smooth_labels(jax.nn.one_hot(targets, vocab), label_smoothing)
  nll = optax.softmax_cross_entropy(logits, labels)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return {
    "nll": (nll * weights).sum(),
    "n_tokens": weights.sum(),
    "n_correct": (correct * weights).sum(),
  }


def next_token_loss(
  logits: jax.Array, batch: Batch, *, label_smoothing: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-token mean cross-entropy over answer tokens.

  Args:
    logits: float32[B, T, V]; the logit at t predicts ``tokens[:, t + 1]``.
    batch: as for :func:`token_loss_sums`.
    label_smoothing: optax-style smoothing.

  Returns:
    (loss, aux): the mean over all target tokens of the (global) batch, so
    every answer token weighs the same however the batch is split over
    devices; aux has the token count and token accuracy.
  """
  sums = token_loss_sums(logits, batch, label_smoothing=label_smoothing)
  denom = jnp.maximum(sums["n_tokens"], 1.0)
  return sums["nll"] / denom, {
    "n_tokens": sums["n_tokens"],
    "token_accuracy": sums["n_correct"] / denom,
  }


def split_microbatches(batch: Batch, accum_steps: int) -> Batch:
  """``[B, ...]`` -> ``[accum_steps, B / accum_steps, ...]``, microbatch m = rows
  ``m, m + accum_steps, m + 2 * accum_steps, ...``.

  Strided rather than contiguous: a device holding a contiguous block of the
  data-sharded batch then holds an equal share of every microbatch, so the
  split moves no data between devices.
  """

  def split(x):
    b = x.shape[0]
    if b % accum_steps:
      raise ValueError(f"accum_steps={accum_steps} does not divide the batch of {b}")
    x = x.reshape(b // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    return sharding_lib.constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))

  return {k: split(v) for k, v in batch.items()}


NONFINITE_MODES = ("halt", "skip")


def dropout_key(seed: int, step: jax.Array | int, microbatch: jax.Array | int) -> jax.Array:
  """The LoRA dropout key of one microbatch of one step:
  ``fold_in(fold_in(key(seed), step), microbatch)``. A function of the step
  counter (in the checkpoint) alone, so a resumed run draws the same masks."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), microbatch)


def make_loss_and_grads(
  setup: StateSetup, config
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
  """``(params, batch, step=0) -> (grads, sums)``: the step's gradient computation.

  ``grads`` is the gradient of the per-token mean loss over the whole global
  batch (zeros for frozen params); ``sums`` has ``nll``, ``n_tokens`` and
  ``n_correct`` summed over it. ``config.train.accum_steps`` > 1 scans over
  that many microbatches and sums their gradients; every microbatch's loss is
  divided by the token count of the whole global batch, so the sum is exactly
  the per-token mean's gradient.

  With ``config.model.lora.dropout`` > 0 microbatch m of step ``step`` uses the
  dropout key ``dropout_key(config.seed, step, m)``; with 0 no key is made, so
  the compiled step draws no random bits.
  """
  graphdef, trainable = setup.graphdef, setup.trainable
  use_dropout = float(config.model.lora.get("dropout", 0.0)) > 0
  smoothing = config.train.label_smoothing
  packed = is_packed(config)
  accum = int(config.train.accum_steps)
  if accum < 1:
    raise ValueError(f"config.train.accum_steps must be >= 1, got {accum}")

  def loss_fn(params, batch, denom, rng):
    logits = forward(merge_model(graphdef, params), batch, packed=packed, dropout_rng=rng)
    sums = token_loss_sums(logits, batch, label_smoothing=smoothing)
    return sums["nll"] / denom, sums

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def rng_for(step, microbatch):
    return dropout_key(config.seed, step, microbatch) if use_dropout else None

  def loss_and_grads(params, batch, step=0):
    # The global batch's answer-token count, known before any microbatch runs.
    denom = jnp.maximum(answer_weights(batch).sum(), 1.0)
    if accum == 1:
      grads, sums = grad_fn(params, batch, denom, rng_for(step, 0))
      # Frozen parameters' gradients are replaced by constants, so XLA drops
      # their computation and no statistic (clipping norm included) sees them.
      return jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable), sums

    def body(carry, xs):
      acc, sums = carry
      m, micro = xs
      g, s = grad_fn(params, micro, denom, rng_for(step, m))
      acc = jax.tree.map(lambda a, g, t: a + g if t else a, acc, g, trainable)
      return (acc, jax.tree.map(jnp.add, sums, s)), None

    # Frozen leaves carry a scalar, not a parameter-sized zero buffer.
    acc0 = jax.tree.map(
      lambda p, t: jnp.zeros_like(p) if t else jnp.zeros((), p.dtype), params, trainable
    )
    sums0 = {k: jnp.zeros((), jnp.float32) for k in ("nll", "n_tokens", "n_correct")}
    micros = (jnp.arange(accum), split_microbatches(batch, accum))
    (acc, sums), _ = jax.lax.scan(body, (acc0, sums0), micros)
    grads = jax.tree.map(lambda a, p, t: a if t else jnp.zeros_like(p), acc, params, trainable)
    return grads, sums

  return loss_and_grads


def make_train_step(
  setup: StateSetup, config
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """The pure step ``(state, batch) -> (state, metrics)`` (not yet jitted).

  Gradients come from :func:`make_loss_and_grads` (with accumulation when
  ``config.train.accum_steps`` > 1). With ``config.train.nonfinite == "skip"``
  a step whose loss or gradient norm is not finite keeps the old params and
  optimizer state (a select, so the device never waits for the host) and
  reports ``skipped`` = 1.
  """
  tx = setup.tx
  cfg = config.train
  if cfg.nonfinite not in NONFINITE_MODES:
    raise ValueError(f"config.train.nonfinite must be one of {NONFINITE_MODES}: {cfg.nonfinite!r}")
  skip_nonfinite = cfg.nonfinite == "skip"
  group_lrs = optimizer_lib.group_schedules(cfg)
  loss_and_grads = make_loss_and_grads(setup, config)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    grads, sums = loss_and_grads(state["params"], batch, state["step"])
    denom = jnp.maximum(sums["n_tokens"], 1.0)
    loss = sums["nll"] / denom
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(params),
      "update_norm": optax.tree.norm(updates),
      "lr": setup.schedule(state["step"]),
      "n_tokens": sums["n_tokens"],
      "token_accuracy": sums["n_correct"] / denom,
      **{f"lr/{name}": sched(state["step"]) for name, sched in group_lrs.items()},
    }
    if skip_nonfinite:
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

      def keep_if_bad(new, old):
        return jnp.where(finite, new, old)

      params = jax.tree.map(keep_if_bad, params, state["params"])
      opt_state = jax.tree.map(keep_if_bad, opt_state, state["opt_state"])
      metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
      metrics["param_norm"] = optax.tree.norm(params)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return step


def batch_shardings(
  mesh: Mesh, packed: bool = False, tiled: bool = False
) -> dict[str, NamedSharding]:
  # Packed images are [B, M, H, W, 3] with has_image [B, M]: a row's slots stay on its device.
  ndims = {"image": 5, "has_image": 2} if packed else {"image": 4, "has_image": 1}
  if tiled:
    ndims["image"] = 5  # [B, V, S, S, 3]: an example's views stay on its device
  return {k: mesh_lib.batch_sharding(mesh, ndims.get(k, 2)) for k in batch_keys(packed, tiled)}


class TrainStep:
  """The step jitted with in/out shardings and the state donated.

  ``num_traces`` counts traces, and ``traced_lengths`` the text lengths traced
  (the packed length when packing, so one trace in all), so the loop can tell a new bucket (expected: one compile each) from a
  recompilation of a shape it has already compiled (a bug: a changed dtype,
  sharding or static value), which it reports loudly or raises on.
  """

  def __init__(self, setup: StateSetup, config, mesh: Mesh):
    step = make_train_step(setup, config)
    self.num_traces = 0
    self.traced_lengths: list[int] = []

    def wrapped(state, batch):
      self.num_traces += 1  # runs at trace time only
      self.traced_lengths.append(int(batch["tokens"].shape[1]))
      # Activation constraints in the model resolve logical names against
      # these rules and the mesh while tracing.
      with (
        sharding_lib.axis_rules(config.sharding_rules),
        jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
      ):
        return step(state, batch)

    self._jitted = jax.jit(
      wrapped,
      in_shardings=(
        setup.shardings,
        batch_shardings(mesh, is_packed(config), is_tiled(config)),
      ),
      out_shardings=(setup.shardings, NamedSharding(mesh, P())),
      donate_argnums=(0,),
    )

  @property
  def num_retraces(self) -> int:
    """Traces of a text length that had been traced before (0 when bucketing works)."""
    return len(self.traced_lengths) - len(set(self.traced_lengths))

  def lower(self, state: Any, batch: Any) -> jax.stages.Lowered:
    """Lowers the jitted step for (abstract or concrete) ``state`` and ``batch``,
    with the shardings and donation training uses (the dry run compiles this)."""
    return self._jitted.lower(state, batch)

  def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    # Inputs arrive already placed (to_global_batch) and the state lives in its
    # shardings: any implicit transfer here is a bug (a numpy leaf, a resharding
    # copy), so it fails instead of silently costing a host round trip per step.
    with jax.transfer_guard("disallow"):
      return self._jitted(state, batch)


def to_global_batch(batch: dict[str, Any], mesh: Mesh) -> Batch:
  """Host-local numpy batch (unpacked, or packed: it has ``segment_ids``; tiled: it has
  ``tile_layout``) -> global jax.Arrays sharded over the batch axes."""
  shard = batch_shardings(mesh, "segment_ids" in batch, "tile_layout" in batch)
  return {k: jax.make_array_from_process_local_data(v, batch[k]) for k, v in shard.items()}
