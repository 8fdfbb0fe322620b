"""The train state: a pytree created directly in its target sharding.

``TrainState`` is a plain dict so Orbax, ``jax.tree`` and tests see ordinary
containers::

  {"step": int32[], "params": {"img": ..., "llm": ...}, "opt_state": optax state}

Shapes come from ``jax.eval_shape``; shardings from the parameters' logical
axis names and ``config.sharding_rules``; values are materialised by a jitted
init with ``out_shardings``, so no device ever holds an unsharded copy.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from compact_jax import sharding as sharding_lib
from compact_jax.models import lora as lora_lib
from compact_jax.models import vlm as vlm_lib
from compact_jax.train import mesh as mesh_lib
from compact_jax.train import optimizer as optimizer_lib

TrainState = dict[str, Any]


def build_model(
  model_cfg: ml_collections.ConfigDict, *, vocab_size: int, image_size: int, seed: int
):
  """The VLM described by ``config.model`` (random init), with its LoRA adapters."""
  model = vlm_lib.VLM.from_config(
    model_cfg, vocab_size=vocab_size, image_size=image_size, rngs=nnx.Rngs(seed)
  )
  if model_cfg.lora.targets:
    lora_lib.apply_lora(
      model,
      lora_lib.LoraConfig(
        targets=tuple(model_cfg.lora.targets),
        rank=model_cfg.lora.rank,
        alpha=model_cfg.lora.alpha,
        partial=model_cfg.lora.partial,
        dropout=model_cfg.lora.dropout,
      ),
      seed=seed,
    )
  return model


@dataclasses.dataclass(frozen=True)
class StateSetup:
  """Everything static about a train state: structure, shardings, optimizer."""

  graphdef: nnx.GraphDef
  abstract: TrainState  # ShapeDtypeStructs with shardings
  shardings: TrainState
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  trainable: Any  # tree of bools like params
  group_members: dict[str, list[str]]
  num_params: int
  num_trainable: int
  num_image_tokens: int


def setup_state(
  config: ml_collections.ConfigDict, *, vocab_size: int, mesh: Mesh
) -> tuple[StateSetup, Any]:
  """Abstract train state, shardings and optimizer; returns (setup, init_fn).

  ``init_fn()`` materialises the state in its shardings (jitted).
  """

  def make_model():
    return build_model(
      config.model, vocab_size=vocab_size, image_size=config.data.image_size, seed=config.seed
    )

  abstract_model = nnx.eval_shape(make_model)
  graphdef, abstract_vars = nnx.split(abstract_model, nnx.Param)
  abstract_params = nnx.to_pure_dict(abstract_vars)
  tx, members, schedule = optimizer_lib.make_optimizer(config.train, abstract_params)
  trainable = optimizer_lib.trainable_mask(abstract_params, config.train.param_groups)

  replicated = NamedSharding(mesh, P())
  param_shardings = mesh_lib.params_shardings(abstract_vars, mesh, config.sharding_rules)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  # Frozen groups hold optax.MaskedNode placeholders (no state); they stay as they are.
  opt_shardings = optax.tree_map_params(
    tx,
    lambda p, s: p if isinstance(p, optax.MaskedNode) else s,
    abstract_opt,
    param_shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, NamedSharding | optax.MaskedNode),
  )
  shardings: TrainState = {
    "step": replicated,
    "params": param_shardings,
    "opt_state": opt_shardings,
  }

  def init() -> TrainState:
    model = make_model()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  abstract_state = jax.eval_shape(init)
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
  )
  sizes = jax.tree.leaves(jax.tree.map(lambda x: x.size, abstract_params))
  train_sizes = jax.tree.leaves(
    jax.tree.map(lambda x, t: x.size if t else 0, abstract_params, trainable)
  )
  setup = StateSetup(
    graphdef=graphdef,
    abstract=abstract_state,
    shardings=shardings,
    tx=tx,
    schedule=schedule,
    trainable=trainable,
    group_members=members,
    num_params=int(sum(sizes)),
    num_trainable=int(sum(train_sizes)),
    num_image_tokens=int(abstract_model.num_image_tokens),
  )

  def init_fn() -> TrainState:
    with sharding_lib.axis_rules(config.sharding_rules):
      return jax.jit(init, out_shardings=shardings)()

  return setup, init_fn


def merge_model(graphdef: nnx.GraphDef, params: Any):
  """An NNX model from its graphdef and a pure-dict param tree (inside jit)."""
  state = nnx.State(params)
  return nnx.merge(graphdef, state)


def load_model_init(
  params: Any, shardings: Any, init_cfg: ml_collections.ConfigDict, workdir: str = ""
) -> Any:
  """Replaces the params under ``init_cfg.parts`` with a big_vision npz's arrays.

  Each loaded array is placed directly in its parameter's target sharding
  (the host holds the file's arrays once; no device holds an unsharded copy).
  Errors name the npz key at fault (unknown, wrong shape, or missing).
  """
  from compact_jax.checkpoints import big_vision  # numpy-only; no torch

  parts = dict(init_cfg.parts)
  targets = tuple(parts.values())
  names = mesh_lib.path_names(params)
  expected = {k: tuple(v.shape) for k, v in names.items() if k.startswith(targets)}
  if not expected:
    raise ValueError(f"config.model_init.parts {parts} select no model parameter")
  path = os.path.join(workdir, os.path.expanduser(init_cfg.path))  # absolute paths win
  flat = big_vision.import_npz(
    big_vision.NpzCheckpoint(path),
    expected,
    parts,
    ignore=tuple(init_cfg.ignore),
    what=path,
  )
  shard_names = mesh_lib.path_names(shardings)
  loaded = {
    tuple(k.split("/")): jax.device_put(v.astype(names[k].dtype), shard_names[k])
    for k, v in flat.items()
  }
  out = {tuple(k.split("/")): v for k, v in names.items()} | loaded
  return mesh_lib.unflatten(out)
