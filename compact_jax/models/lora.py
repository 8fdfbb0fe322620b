"""LoRA adapters on any weight matched by a regex list, merge, adapter-only save/load,
and regex freeze masks.

An adapter on weight ``W`` (any shape: 2-D Dense kernels, or einsum weights
such as q_einsum's ``[N, D, H]``) is a pair of ``nnx.LoRAParam`` factors
``<name>_lora_a float32[I, r]`` and ``<name>_lora_b float32[r, O]`` set on the
module that owns ``W`` (``[L, I, r]``/``[L, r, O]`` for scanned layers), and a
static ``<name>_lora_spec`` (``models.LoraSpec``). I is the product of W's
input dims (those contracted with the activations: its "embed" axis, or every
axis but the last when "embed" is the output), O the rest. B starts at zero: a
fresh adapter leaves the model's function unchanged (Hu et al. 2021).

Fused weights: a weight whose leading axis has no logical name (llm.py's
``kv_einsum/w [2, K, D, H]`` holding k and v, ``gating_einsum [2, D, F]``
holding gate and up, which the model reads one slice at a time with
``project(..., index=i)``) gets one adapter per slice, ``A float32[S, I, r]``,
``B float32[S, r, O]`` (``[L, S, ...]`` when scanned): the same model and
parameter count as peft's (and LLaVA's) separate k_proj/v_proj and
gate_proj/up_proj adapters.

Where the model reads W: ``models.project`` (the LLM) computes
``x . W + alpha / r * (x . A) . B`` - as one matmul by the merged weight with a
hand-written rank-r backward when it can, else on the activations - and never
forms the full ``[I, O]`` gradient of a frozen W; Partial LoRA
(``LoraConfig.partial``) masks the rank-r activations per token.
``models.weight`` (siglip.py, connectors) reads the merged ``W + alpha / r * A @ B``.
Dropout on the adapter input (peft's ``lora_dropout``, ``LoraConfig.dropout``)
is applied by ``project`` when the train step passes a ``dropout_rng`` (threaded
through ``VLM`` and the LLM's layers, folded per layer and projection site);
eval and decode pass none. ``weight`` cannot drop activations and raises on a
merged-read adapter with dropout > 0.

Only ``nnx.LoRAParam`` leaves need gradients:
``nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))`` and
``nnx.state(model, nnx.LoRAParam)`` for adapter-only checkpoints.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from compact_jax.models import LoraSpec, lora_delta
from compact_jax.sharding import param


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """``targets``: regexes searched in '/'-joined param paths (e.g.
  ``r"llm/layers/attn/(q|kv)_einsum/w$"``); every pattern must match some weight.
  ``rank`` r and ``alpha`` (the delta is scaled by alpha / r). ``partial``:
  InternLM-XComposer2's Partial LoRA, the LLM's adapters act only at image-token
  positions, so text-only inputs behave exactly as the base model (needs a ``VLM``).
  ``dropout``: peft's ``lora_dropout`` on the adapters' input activations, in [0, 1)."""

  targets: tuple[str, ...]
  rank: int = 8
  alpha: float = 16.0
  partial: bool = False
  dropout: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    if not self.targets:
      raise ValueError("LoRA needs at least one target pattern")


@dataclasses.dataclass(frozen=True)
class _Weight:
  path: str
  module: nnx.Module
  name: str
  lead: tuple[int, ...]  # leading dims with their own adapter: scanned layers, slices
  lead_axes: tuple[str | None, ...]  # ("layers",) and/or None (a slice axis)
  sliced: bool
  shape: tuple[int, ...]  # of one slice of one layer
  axes: tuple[str | None, ...]  # of one slice of one layer


def _weights(model: nnx.Module) -> Iterator[_Weight]:
  """Every plain (non-LoRA) param with >= 2 dims per layer and slice, with its owning module.

  A leading "layers" axis is the scanned layer stack. After it, a leading axis
  without a logical name on a weight of >= 3 dims is a slice axis: the fused
  weights of llm.py (``kv_einsum/w`` ``(None, "kv_heads", "embed", "head_dim")``,
  ``gating_einsum`` ``(None, "embed", "mlp")``) name every axis but the one
  that stacks independent projections.
  """
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module):
      continue
    prefix = "/".join(str(p) for p in path)
    for name, var in list(vars(node).items()):
      if not isinstance(var, nnx.Param) or isinstance(var, nnx.LoRAParam):
        continue
      axes = tuple(var.get_metadata().get("out_sharding") or ())
      shape = tuple(var.shape)
      lead, lead_axes = (), ()
      if axes and axes[0] == "layers":
        lead, lead_axes, shape, axes = shape[:1], axes[:1], shape[1:], axes[1:]
      sliced = len(axes) >= 3 and axes[0] is None
      if sliced:
        lead, lead_axes, shape, axes = lead + shape[:1], (*lead_axes, None), shape[1:], axes[1:]
      if len(shape) >= 2:
        path_name = f"{prefix}/{name}" if prefix else name
        yield _Weight(path_name, node, name, lead, lead_axes, sliced, shape, axes)


def input_axes(axes: tuple[str | None, ...]) -> tuple[int, ...]:
  """The weight axes contracted with the activations, from logical names.

  ``("heads", "embed", "head_dim")`` -> (1,); ``("heads", "head_dim", "embed")``
  -> (0, 1); ``("mlp", "embed")`` -> (0,); ``("embed", "mlp")`` -> (0,).
  """
  if "embed" in axes[:-1]:
    return (axes.index("embed"),)
  return tuple(range(len(axes) - 1))


def apply_lora(model: nnx.Module, config: LoraConfig, *, seed: int = 0) -> list[str]:
  """Attaches adapters to every weight whose path matches a target; returns the paths.

  Raises:
    ValueError: a pattern that matches no weight (a typo would silently train nothing).
  """
  if config.partial:
    if not hasattr(model, "partial_lora"):
      raise ValueError(f"Partial LoRA needs a VLM (image tokens), got {type(model).__name__}")
    model.partial_lora = True
  pats = [re.compile(p) for p in config.targets]
  rng = np.random.default_rng(seed)
  hits = {p.pattern: 0 for p in pats}
  done = []
  for w in list(_weights(model)):
    matched = [p for p in pats if p.search(w.path)]
    if not matched:
      continue
    for p in matched:
      hits[p.pattern] += 1
    in_axes = input_axes(w.axes)
    i = int(np.prod([w.shape[k] for k in in_axes]))
    o = int(np.prod(w.shape)) // i
    a = rng.standard_normal((*w.lead, i, config.rank)).astype(np.float32) / np.sqrt(i)
    b = np.zeros((*w.lead, config.rank, o), np.float32)
    # A's rows flatten W's input dims and B's columns its output dims, outermost
    # first, so naming each after its outermost dim shards them like W (a 7B
    # model's r=128 adapters are 1.2 GiB per device when replicated).
    out_names = [ax for k, ax in enumerate(w.axes) if k not in in_axes]
    a_axes = (*w.lead_axes, w.axes[in_axes[0]], "lora_rank")
    b_axes = (*w.lead_axes, "lora_rank", out_names[0])
    setattr(w.module, f"{w.name}_lora_a", param(jnp.asarray(a), a_axes, nnx.LoRAParam))
    setattr(w.module, f"{w.name}_lora_b", param(jnp.asarray(b), b_axes, nnx.LoRAParam))
    spec = LoraSpec(
      in_axes, config.alpha / config.rank, sliced=w.sliced, dropout=float(config.dropout)
    )
    setattr(w.module, f"{w.name}_lora_spec", spec)
    done.append(w.path)
  unused = sorted(p for p, n in hits.items() if n == 0)
  if unused:
    raise ValueError(f"LoRA target patterns match no weight: {unused}")
  return done


def merge_lora(model: nnx.Module) -> list[str]:
  """Folds every adapter into its base weight and removes it; returns the merged paths."""
  merged = []
  for w in list(_weights(model)):
    spec = getattr(w.module, f"{w.name}_lora_spec", None)
    if spec is None:
      continue
    base = getattr(w.module, w.name)
    a = getattr(w.module, f"{w.name}_lora_a")[...]
    b = getattr(w.module, f"{w.name}_lora_b")[...]
    d = lora_delta(a, b, tuple(base.shape), spec.in_axes, spec.scale)
    base.set_value(base[...] + d.astype(base.dtype))
    for suffix in ("_lora_a", "_lora_b", "_lora_spec"):
      delattr(w.module, w.name + suffix)
    merged.append(w.path)
  return merged


def adapter_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """'/'-path -> value of every ``nnx.LoRAParam`` (an adapter-only checkpoint)."""
  return {
    "/".join(str(p) for p in path): np.asarray(var.get_value())
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  }


def save_adapters(model: nnx.Module, path: str) -> None:
  np.savez(path, **adapter_params(model))


def load_adapters(model: nnx.Module, path: str) -> None:
  """Loads adapters saved by ``save_adapters`` into a model with the same ``apply_lora``."""
  with np.load(path, allow_pickle=False) as f:
    saved = {k: f[k] for k in f.files}
  state = nnx.state(model, nnx.LoRAParam)
  have = {"/".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}
  if set(have) != set(saved):
    raise KeyError(
      f"{path}: adapters {sorted(set(saved) - set(have))[:4]} not in the model, "
      f"{sorted(set(have) - set(saved))[:4]} missing from the file"
    )
  for key, var in have.items():
    if saved[key].shape != var.shape:
      raise ValueError(f"{path}: adapter {key} has shape {saved[key].shape}, model {var.shape}")
    var.set_value(jnp.asarray(saved[key]))
  nnx.update(model, state)


def freeze_mask(paths: Sequence[str], trainable: Sequence[str]) -> dict[str, bool]:
  """path -> True if some ``trainable`` regex matches it (searched), else frozen.

  Raises:
    ValueError: a pattern that matches no path.
  """
  pats = [re.compile(p) for p in trainable]
  unused = [p.pattern for p in pats if not any(p.search(k) for k in paths)]
  if unused:
    raise ValueError(f"freeze_mask patterns match no parameter: {unused}")
  return {k: any(p.search(k) for p in pats) for k in paths}
