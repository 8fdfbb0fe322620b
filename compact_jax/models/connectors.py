"""Connectors: project ViT features (width D_vit) into the LLM's embedding space (D_llm).

Einsum letters: B batch, N image tokens, D model dim, F hidden dim.

- ``linear``: one Dense, as big_vision's PaliGemma. It is stored as the ViT's
  classifier head, ``img/head/{kernel,bias}``, so PaliGemma npz files load by name.
- ``mlp2x_gelu``: Dense -> GELU -> Dense, LLaVA-1.5's projector, stored as
  ``connector/Dense_{0,1}/{kernel,bias}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from flax import nnx

from compact_jax.models.siglip import Dense


class Mlp2xGelu(nnx.Module):
  """LLaVA-1.5's ``mlp2x_gelu``: Dense(D_vit, D_llm) -> GELU -> Dense(D_llm, D_llm)."""

  def __init__(self, din: int, dout: int, *, dtype: str = "float32", rngs: nnx.Rngs):
    self.Dense_0 = Dense(din, dout, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.Dense_1 = Dense(dout, dout, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[B, N, D_vit] -> float[B, N, D_llm]."""
    # LLaVA's nn.GELU() is the exact erf form.
    return self.Dense_1(jax.nn.gelu(self.Dense_0(x), approximate=False))


def make_linear(din: int, dout: int, *, dtype: str = "float32", rngs: nnx.Rngs) -> nnx.Module:
  """PaliGemma's connector: one Dense(D_vit, D_llm)."""
  return Dense(din, dout, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class Connector:
  """How to build a connector, and where its params live.

  Attributes:
    make: ``make(d_vit, d_llm, *, dtype, rngs) -> module`` mapping
      float[B, N, D_vit] to float[B, N, D_llm].
    inside_vit: True if the module is the ViT's ``head`` (params under
      ``img/head``) rather than a top-level ``connector``.
  """

  make: Callable[..., nnx.Module]
  inside_vit: bool


CONNECTORS: dict[str, Connector] = {
  "linear": Connector(make_linear, inside_vit=True),
  "mlp2x_gelu": Connector(Mlp2xGelu, inside_vit=False),
}


def get_connector(name: str) -> Connector:
  if name not in CONNECTORS:
    raise ValueError(f"Unknown connector {name!r}; known: {sorted(CONNECTORS)}")
  return CONNECTORS[name]
