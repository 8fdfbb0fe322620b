"""The train step: a pure function of (state, batch), jitted once per bucket."""

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
from compact_jax.train.state import StateSetup, TrainState, merge_model

Batch = dict[str, jax.Array]
BATCH_KEYS = ("image", "has_image", "tokens", "mask_ar", "mask_loss", "mask_input")


def next_token_loss(
  logits: jax.Array, batch: Batch, *, label_smoothing: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-token mean cross-entropy over answer tokens.

  Args:
    logits: float32[B, T, V]; the logit at t predicts ``tokens[:, t + 1]``.
    batch: needs ``tokens`` int32[B, T], ``mask_loss`` int32[B, T] and
      ``mask_input`` bool[B, T].
    label_smoothing: optax-style smoothing.

  Returns:
    (loss, aux): the mean over all target tokens of the (global) batch, so
    every answer token weighs the same however the batch is split over
    devices; aux has the token count and token accuracy.
  """
  targets = batch["tokens"][:, 1:]
  weights = (batch["mask_loss"][:, 1:] * batch["mask_input"][:, 1:]).astype(jnp.float32)
  logits = logits[:, :-1].astype(jnp.float32)
  vocab = logits.shape[-1]
  labels = optax.smooth_labels(jax.nn.one_hot(targets, vocab), label_smoothing)
  nll = optax.softmax_cross_entropy(logits, labels)
  n_tokens = weights.sum()
  loss = (nll * weights).sum() / jnp.maximum(n_tokens, 1.0)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  accuracy = (correct * weights).sum() / jnp.maximum(n_tokens, 1.0)
  return loss, {"n_tokens": n_tokens, "token_accuracy": accuracy}


def make_train_step(
  setup: StateSetup, config
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """The pure step ``(state, batch) -> (state, metrics)`` (not yet jitted)."""
  graphdef, tx, trainable = setup.graphdef, setup.tx, setup.trainable
  smoothing = config.train.label_smoothing

  def loss_fn(params, batch):
    model = merge_model(graphdef, params)
    logits, _ = model(
      batch["image"], batch["tokens"], batch["mask_ar"], batch["mask_input"], batch["has_image"]
    )
    return next_token_loss(logits, batch, label_smoothing=smoothing)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
    # Frozen parameters' gradients are replaced by constants, so XLA drops
    # their computation and no statistic (clipping norm included) sees them.
    grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "update_norm": optax.tree.norm(updates),
      "lr": setup.schedule(state["step"]),
      **aux,
    }
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return step


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
  ndims = {"image": 4, "has_image": 1}
  return {k: mesh_lib.batch_sharding(mesh, ndims.get(k, 2)) for k in BATCH_KEYS}


class TrainStep:
  """The step jitted with in/out shardings and the state donated.

  ``num_traces`` counts traces, and ``traced_lengths`` the text lengths traced,
  so the loop can tell a new bucket (expected: one compile each) from a
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
      in_shardings=(setup.shardings, batch_shardings(mesh)),
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
  """Host-local numpy batch -> global jax.Arrays sharded over the batch axes."""
  shard = batch_shardings(mesh)
  return {k: jax.make_array_from_process_local_data(shard[k], batch[k]) for k in BATCH_KEYS}
