"""Tiny models and batches shared by the model and decode tests.

Random *init* compiles one threefry kernel per parameter shape, which costs
seconds on a 2-core CPU. Most tests only need some fixed weights, so they build
the model abstractly (``nnx.eval_shape``) and load numpy normals into it.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from compact_jax.models import llm, siglip, vlm

# Two layers per tower so scanning and layer selection mean something;
# GQA with 2 groups and head_dim (16) != width / heads (12).
VIT = siglip.ViTVariant(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)
LLM = llm.LLMVariant(width=48, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96)
IMAGE_SIZE = 16  # 2x2 patches -> 4 image tokens
VOCAB = 64


def abstract_vlm(
  *, connector: str = "mlp2x_gelu", scan_layers: bool = True, vit_output_layer: int = -1, **kw
) -> vlm.VLM:
  return nnx.eval_shape(
    lambda: vlm.VLM(
      kw.pop("vit_variant", VIT),
      connector,
      kw.pop("llm_variant", LLM),
      kw.pop("vocab_size", VOCAB),
      vit_output_layer=vit_output_layer,
      image_size=kw.pop("image_size", IMAGE_SIZE),
      scan_layers=scan_layers,
      rngs=nnx.Rngs(0),
      **kw,
    )
  )


def random_flat_params(
  model: nnx.Module, seed: int = 0, scale: float = 0.3
) -> dict[str, np.ndarray]:
  """Normal(0, scale) for every param of ``model`` (abstract or not), by '/'-path."""
  rng = np.random.default_rng(seed)
  shapes = vlm.param_paths(nnx.state(model))
  return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in sorted(shapes.items())}


def random_vlm(seed: int = 0, scale: float = 0.3, **kw) -> tuple[vlm.VLM, dict[str, np.ndarray]]:
  """A concrete VLM with random weights, and those weights as a flat dict."""
  model = abstract_vlm(**kw)
  flat = random_flat_params(model, seed, scale)
  vlm.load_flat_params(model, flat)
  return model, flat


def random_images(batch: int, seed: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, *args):
  return nnx.merge(graphdef, state)(*args)


def apply(module: nnx.Module, *args):
  """``module(*args)`` under jit; modules with equal graphdefs share one compile."""
  graphdef, state = nnx.split(module)
  return _apply(graphdef, state, *args)
