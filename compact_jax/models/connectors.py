"""Connectors: map ViT features (width D_vit, a G x G patch grid) into the LLM's
embedding space (D_llm). The seeds' menu, chosen by ``config.model.connector``.

Einsum letters: B batch, N image tokens (G*G), Q queries, D model dim, F hidden dim.

- ``linear``: one Dense, as PaliGemma. Stored as the ViT's head,
  ``img/head/{kernel,bias}``, so PaliGemma npz files load by name.
- ``mlp2x_gelu``: Dense -> GELU -> Dense, LLaVA-1.5's projector,
  ``connector/Dense_{0,1}``.
- ``pixel_shuffle_mlp``: InternVL-1.5's space-to-depth by r = 2 (N / 4 tokens
  of width 4 D_vit), then LayerNorm -> Dense -> GELU -> Dense.
- ``resampler`` / ``resampler_nopos``: Q = 64 learnable queries cross-attend
  to the (projected) features: Qwen-VL's single-layer adapter, with 2D sin-cos
  absolute positions on queries and keys, or MiniCPM-V / perceiver style
  without them.

``connector_table`` gives each one's token and parameter count (the README's
table); ``tests/models/test_connectors.py`` checks it against the modules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compact_jax.models import compute_dtype
from compact_jax.models.siglip import Dense, HeadsProjection, LayerNorm, OutProjection, lecun_normal
from compact_jax.sharding import param

PIXEL_SHUFFLE_FACTOR = 2
RESAMPLER_QUERIES = 64


class Mlp2xGelu(nnx.Module):
  """LLaVA-1.5's ``mlp2x_gelu``: Dense(D_vit, D_llm) -> GELU -> Dense(D_llm, D_llm)."""

  def __init__(self, din: int, dout: int, *, dtype: str = "float32", rngs: nnx.Rngs):
    self.Dense_0 = Dense(din, dout, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.Dense_1 = Dense(dout, dout, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[B, N, D_vit] -> float[B, N, D_llm]."""
    # LLaVA's nn.GELU() is the exact erf form.
    return self.Dense_1(jax.nn.gelu(self.Dense_0(x), approximate=False))


def pixel_shuffle(x: jax.Array, grid: int, r: int) -> jax.Array:
  """Space-to-depth: float[B, G*G, D] -> float[B, (G/r)^2, r*r*D].

  Output token (i, j) concatenates the r x r input tokens (r*i + a, r*j + c) in
  (a, c) row-major order along the channels.
  """
  b, n, d = x.shape
  if n != grid * grid or grid % r:
    raise ValueError(f"pixel_shuffle: {n} tokens are not a {grid}x{grid} grid divisible by {r}")
  g = grid // r
  x = x.reshape(b, g, r, g, r, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * g, r * r * d)


class PixelShuffleMlp(nnx.Module):
  """InternVL-1.5's connector: pixel shuffle by r, LayerNorm, Dense -> GELU -> Dense."""

  def __init__(
    self,
    din: int,
    dout: int,
    *,
    grid: int,
    r: int = PIXEL_SHUFFLE_FACTOR,
    dtype: str = "float32",
    rngs: nnx.Rngs,
  ):
    if grid % r:
      raise ValueError(f"pixel_shuffle_mlp: the {grid}x{grid} patch grid is not divisible by r={r}")
    self.LayerNorm_0 = LayerNorm(din * r * r, dtype=dtype, eps=1e-5)
    self.Dense_0 = Dense(din * r * r, dout, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.Dense_1 = Dense(dout, dout, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.grid, self.r = grid, r

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[B, G*G, D_vit] -> float[B, (G/r)^2, D_llm]."""
    x = self.LayerNorm_0(pixel_shuffle(x, self.grid, self.r))
    return self.Dense_1(jax.nn.gelu(self.Dense_0(x), approximate=False))


def sincos_2d(grid: int, dim: int) -> np.ndarray:
  """float32[G*G, D] fixed 2D sin-cos positions (MAE / Qwen-VL): half the
  channels encode the row, half the column, each as [sin, cos] over D/4 frequencies."""
  if dim % 4:
    raise ValueError(f"sincos_2d needs a width divisible by 4, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
  y, x = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

  def enc(pos):
    a = pos.reshape(-1, 1) * omega[None]
    return np.concatenate([np.sin(a), np.cos(a)], axis=1)

  return np.concatenate([enc(y), enc(x)], axis=1).astype(np.float32)


class Resampler(nnx.Module):
  """Q learnable queries cross-attend to the image features (one layer).

  Qwen-VL's adapter: ``kv_proj`` Dense(D_vit, D_llm), LayerNorms on queries
  (``ln_q``) and keys/values (``ln_kv``), multi-head cross-attention with 2D
  sin-cos positions added to queries (a sqrt(Q) grid) and keys (the patch
  grid), then ``ln_post`` and a Dense ``proj``. With ``pos2d=False`` it is the
  position-free perceiver-style resampler.
  """

  def __init__(
    self,
    din: int,
    dout: int,
    *,
    grid: int,
    num_queries: int = RESAMPLER_QUERIES,
    num_heads: int | None = None,
    pos2d: bool = True,
    dtype: str = "float32",
    rngs: nnx.Rngs,
  ):
    heads = num_heads or max(1, dout // 64)
    if dout % heads:
      raise ValueError(f"resampler: width {dout} is not divisible by {heads} heads")
    qgrid = math.isqrt(num_queries)
    if pos2d and qgrid * qgrid != num_queries:
      raise ValueError(f"resampler: 2D positions need a square query count, got {num_queries}")
    self.query = param(lecun_normal(rngs.params(), (num_queries, dout), dout), (None, "embed"))
    self.kv_proj = Dense(din, dout, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.ln_q = LayerNorm(dout, dtype=dtype)
    self.ln_kv = LayerNorm(dout, dtype=dtype)
    h = dout // heads
    self.attn_query = HeadsProjection(dout, heads, h, dtype=dtype, rngs=rngs)
    self.attn_key = HeadsProjection(dout, heads, h, dtype=dtype, rngs=rngs)
    self.attn_value = HeadsProjection(dout, heads, h, dtype=dtype, rngs=rngs)
    self.attn_out = OutProjection(heads, h, dout, dtype=dtype, rngs=rngs)
    self.ln_post = LayerNorm(dout, dtype=dtype)
    self.proj = Dense(dout, dout, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    # Fixed positions are rebuilt at trace time (constants), not stored as state.
    self.pos2d, self.qgrid, self.grid, self.width = pos2d, qgrid, grid, dout
    self.dtype = compute_dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[B, N, D_vit] -> float[B, Q, D_llm]."""
    kv = self.ln_kv(self.kv_proj(x))
    q = jnp.broadcast_to(self.ln_q(self.query[...]), (x.shape[0], *self.query.shape))
    qp, kp = q, kv
    if self.pos2d:
      qp = q + jnp.asarray(sincos_2d(self.qgrid, self.width), self.dtype)
      kp = kv + jnp.asarray(sincos_2d(self.grid, self.width), self.dtype)
    qh = self.attn_query(qp)
    qh = qh * (qh.shape[-1] ** -0.5)
    logits = jnp.einsum("BQNH,BSNH->BNQS", qh, self.attn_key(kp)).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = self.attn_out(jnp.einsum("BNQS,BSNH->BQNH", probs, self.attn_value(kv)))
    return self.proj(self.ln_post(out))


def make_linear(
  din: int, dout: int, *, grid: int, dtype: str = "float32", rngs: nnx.Rngs
) -> nnx.Module:
  """PaliGemma's connector: one Dense(D_vit, D_llm)."""
  del grid
  return Dense(din, dout, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)


def make_mlp2x(din: int, dout: int, *, grid: int, dtype: str = "float32", rngs: nnx.Rngs):
  del grid
  return Mlp2xGelu(din, dout, dtype=dtype, rngs=rngs)


def make_resampler(pos2d: bool) -> Callable[..., nnx.Module]:
  def make(din: int, dout: int, *, grid: int, dtype: str = "float32", rngs: nnx.Rngs):
    return Resampler(din, dout, grid=grid, pos2d=pos2d, dtype=dtype, rngs=rngs)

  return make


@dataclasses.dataclass(frozen=True)
class Connector:
  """How to build a connector, and where its params live.

  Attributes:
    make: ``make(d_vit, d_llm, *, grid, dtype, rngs) -> module`` mapping
      float[B, G*G, D_vit] to float[B, num_tokens(G), D_llm].
    inside_vit: True if the module is the ViT's ``head`` (params under
      ``img/head``) rather than a top-level ``connector``.
    num_tokens: image tokens the LLM sees for a G x G patch grid.
  """

  make: Callable[..., nnx.Module]
  inside_vit: bool
  num_tokens: Callable[[int], int]


CONNECTORS: dict[str, Connector] = {
  "linear": Connector(make_linear, inside_vit=True, num_tokens=lambda g: g * g),
  "mlp2x_gelu": Connector(make_mlp2x, inside_vit=False, num_tokens=lambda g: g * g),
  "pixel_shuffle_mlp": Connector(
    PixelShuffleMlp, inside_vit=False, num_tokens=lambda g: (g // PIXEL_SHUFFLE_FACTOR) ** 2
  ),
  "resampler": Connector(
    make_resampler(True), inside_vit=False, num_tokens=lambda g: RESAMPLER_QUERIES
  ),
  "resampler_nopos": Connector(
    make_resampler(False), inside_vit=False, num_tokens=lambda g: RESAMPLER_QUERIES
  ),
}


def get_connector(name: str) -> Connector:
  if name not in CONNECTORS:
    raise ValueError(f"Unknown connector {name!r}; known: {sorted(CONNECTORS)}")
  return CONNECTORS[name]


def connector_table(d_vit: int, d_llm: int, grid: int) -> dict[str, tuple[int, int]]:
  """name -> (image tokens, parameters) for a G x G grid, in closed form."""
  r2, q = PIXEL_SHUFFLE_FACTOR**2, RESAMPLER_QUERIES
  dense = lambda i, o: i * o + o  # noqa: E731
  resampler = q * d_llm + dense(d_vit, d_llm) + 3 * 2 * d_llm + 4 * dense(d_llm, d_llm)
  resampler += dense(d_llm, d_llm)
  out = {
    "linear": (grid * grid, dense(d_vit, d_llm)),
    "mlp2x_gelu": (grid * grid, dense(d_vit, d_llm) + dense(d_llm, d_llm)),
    "resampler": (q, resampler),
    "resampler_nopos": (q, resampler),
  }
  if grid % PIXEL_SHUFFLE_FACTOR == 0:
    ps = 2 * r2 * d_vit + dense(r2 * d_vit, d_llm) + dense(d_llm, d_llm)
    out["pixel_shuffle_mlp"] = ((grid // PIXEL_SHUFFLE_FACTOR) ** 2, ps)
  return out
