"""Gemma-style decoder LM (big_vision ``models/ppp/gemma.py`` names and maths).

Einsum letters:
  B batch, T query len, S key len, N heads, K kv heads, G query groups per kv
  head (N = K * G), H head dim, D model dim, F mlp dim, V vocab, L layers.

Gemma conventions kept so that checkpoints convert by renames only: a tied
embedding table, multiplied by sqrt(D) on input; RMSNorm with a zero-centred
scale (``x * (1 + scale)``); split-half ("rotate_half") RoPE with base 10000;
multi-query / grouped-query attention with ``head_dim`` independent of D / N;
a GeGLU MLP with the tanh GELU. Params (stacked on a leading layer axis under
``layers/`` when scanned, ``layers_{i}/`` otherwise):
``embedder/input_embedding [V, D]``, ``pre_attention_norm/scale [D]``,
``attn/q_einsum/w [N, D, H]``, ``attn/kv_einsum/w [2, K, D, H]``,
``attn/attn_vec_einsum/w [N, H, D]``, ``pre_ffw_norm/scale [D]``,
``mlp/gating_einsum [2, D, F]``, ``mlp/linear [F, D]``, ``final_norm/scale [D]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from compact_jax.models import (
  check_remat_policy,
  compute_dtype,
  remat_layer,
  scan_stacked,
  stack_layers,
)
from compact_jax.models.siglip import lecun_normal
from compact_jax.sharding import constrain, param

ACT = ("act_batch", "act_len", "act_embed")
# big_vision's mask value: finite, so a fully masked row gives a uniform
# softmax rather than NaN (padding rows are never read, but NaN would poison
# gradients through the 0 * NaN of masked losses).
MASK_VALUE = -2.3819763e38
ROPE_MAX_WAVELENGTH = 10_000


@dataclasses.dataclass(frozen=True)
class LLMVariant:
  """A decoder's size. ``vocab_size`` documents the checkpoint's vocabulary only;
  the model's vocabulary is a constructor argument (the tokenizer decides it)."""

  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  vocab_size: int | None = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")


VARIANTS: dict[str, LLMVariant] = {
  "smoke": LLMVariant(width=32, depth=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64),
  "tiny": LLMVariant(width=192, depth=4, num_heads=4, num_kv_heads=1, head_dim=48, mlp_dim=768),
  # Gemma 2B (big_vision gemma.get_config("gemma_2b")): for docs and shape checks.
  "gemma_2b": LLMVariant(
    width=2048,
    depth=18,
    num_heads=8,
    num_kv_heads=1,
    head_dim=256,
    mlp_dim=16384,
    vocab_size=256128,
  ),
}


def decode_variant(name: str) -> LLMVariant:
  if name not in VARIANTS:
    raise ValueError(f"Unknown LLM variant {name!r}; known: {list(VARIANTS)}")
  return VARIANTS[name]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys (after RoPE) and values of every layer: ``float[L, B, S, K, H]`` each.

  Slots are written in order; which ones hold valid tokens is the caller's
  attention mask's business, not the cache's.
  """

  k: jax.Array
  v: jax.Array


def apply_rope(x: jax.Array, positions: jax.Array) -> jax.Array:
  """Rotary embedding, split-half convention (first half pairs with second half).

  Args:
    x: float[B, T, N, H].
    positions: int32[B, T].

  Returns:
    float[B, T, N, H], same dtype as x (computed in float32).
  """
  half = x.shape[-1] // 2
  timescale = ROPE_MAX_WAVELENGTH ** (2.0 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1])
  radians = positions.astype(jnp.float32)[..., None, None] / timescale  # [B, T, 1, H/2]
  sin, cos = jnp.sin(radians), jnp.cos(radians)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nnx.Module):
  """``x / rms(x) * (1 + scale)``, eps 1e-6, in float32; ``scale`` starts at 0."""

  def __init__(self, dim: int, *, dtype: str = "float32", eps: float = 1e-6):
    self.scale = param(jnp.zeros((dim,), jnp.float32), ("norm",))
    self.eps = eps
    self.dtype = compute_dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + self.scale[...])).astype(self.dtype)


class Einsum(nnx.Module):
  """Holds one einsum weight ``w`` (big_vision's ``Einsum``; the einsum is at the call site)."""

  def __init__(
    self, shape: tuple[int, ...], axes: tuple[str | None, ...], fan_in: int, *, rngs: nnx.Rngs
  ):
    self.w = param(lecun_normal(rngs.params(), shape, fan_in), axes)


class Embedder(nnx.Module):
  """Token embedding table ``input_embedding float32[V, D]``, tied with the output head."""

  def __init__(self, vocab_size: int, dim: int, *, dtype: str = "float32", rngs: nnx.Rngs):
    self.input_embedding = param(
      lecun_normal(rngs.params(), (vocab_size, dim), dim), ("vocab", "embed")
    )
    self.dtype = compute_dtype(dtype)

  def encode(self, tokens: jax.Array) -> jax.Array:
    """int32[B, T] -> float[B, T, D], scaled by sqrt(D) as Gemma does."""
    x = jnp.take(self.input_embedding[...], tokens, axis=0).astype(self.dtype)
    # Gemma casts the normaliser to the compute dtype first (bf16 rounds it).
    return x * jnp.sqrt(x.shape[-1]).astype(self.dtype)

  def decode(self, x: jax.Array) -> jax.Array:
    """float[B, T, D] -> float32[B, T, V] logits."""
    logits = jnp.einsum("BTD,VD->BTV", x, self.input_embedding[...].astype(self.dtype))
    return logits.astype(jnp.float32)


class Attention(nnx.Module):
  """Grouped-query attention with RoPE and an optional KV cache."""

  def __init__(self, v: LLMVariant, *, dtype: str, rngs: nnx.Rngs):
    d, n, k, h = v.width, v.num_heads, v.num_kv_heads, v.head_dim
    self.q_einsum = Einsum((n, d, h), ("heads", "embed", "head_dim"), d, rngs=rngs)
    self.kv_einsum = Einsum((2, k, d, h), (None, "kv_heads", "embed", "head_dim"), d, rngs=rngs)
    self.attn_vec_einsum = Einsum((n, h, d), ("heads", "head_dim", "embed"), n * h, rngs=rngs)
    self.num_kv_heads = k
    self.dtype = compute_dtype(dtype)

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    attn_mask: jax.Array,
    cache: tuple[jax.Array, jax.Array] | None = None,
    cache_index: jax.Array | int = 0,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attends the T new tokens to themselves, or to the whole cache.

    Args:
      x: float[B, T, D].
      positions: int32[B, T] RoPE positions.
      attn_mask: bool[B, T, S]; S = T without a cache, else the cache length.
      cache: this layer's (k, v), float[B, S, K, H] each, or None.
      cache_index: where the T new keys/values are written in the cache.

    Returns:
      (float[B, T, D], updated (k, v) or None).
    """
    dt = self.dtype
    x = x.astype(dt)
    q = jnp.einsum("BTD,NDH->BTNH", x, self.q_einsum.w[...].astype(dt))
    wkv = self.kv_einsum.w[...].astype(dt)
    k = jnp.einsum("BSD,KDH->BSKH", x, wkv[0])
    v = jnp.einsum("BSD,KDH->BSKH", x, wkv[1])
    q = apply_rope(q, positions) * (q.shape[-1] ** -0.5)
    k = apply_rope(k, positions)
    if cache is not None:
      at = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
      v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
      cache = (k, v)
    b, t, n, h = q.shape
    q = q.reshape(b, t, self.num_kv_heads, n // self.num_kv_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k.astype(dt)).astype(jnp.float32)
    logits = jnp.where(attn_mask[:, None, None, :, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(dt)).reshape(b, t, n, h)
    return jnp.einsum("BTNH,NHD->BTD", out, self.attn_vec_einsum.w[...].astype(dt)), cache


class FeedForward(nnx.Module):
  """GeGLU: ``(gelu_tanh(x W_gate) * (x W_up)) W_down``."""

  def __init__(self, v: LLMVariant, *, dtype: str, rngs: nnx.Rngs):
    d, f = v.width, v.mlp_dim
    self.gating_einsum = param(lecun_normal(rngs.params(), (2, d, f), d), (None, "embed", "mlp"))
    self.linear = param(lecun_normal(rngs.params(), (f, d), f), ("mlp", "embed"))
    self.dtype = compute_dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[B, T, D] -> float[B, T, D]."""
    w = self.gating_einsum[...].astype(self.dtype)
    gate = jnp.einsum("BTD,DF->BTF", x, w[0])
    up = jnp.einsum("BTD,DF->BTF", x, w[1])
    hidden = constrain(
      jax.nn.gelu(gate, approximate=True) * up, ("act_batch", "act_len", "act_mlp")
    )
    return jnp.einsum("BTF,FD->BTD", hidden, self.linear[...].astype(self.dtype))


class Block(nnx.Module):
  """Pre-norm decoder block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

  def __init__(self, v: LLMVariant, *, dtype: str, rngs: nnx.Rngs):
    self.pre_attention_norm = RMSNorm(v.width, dtype=dtype)
    self.attn = Attention(v, dtype=dtype, rngs=rngs)
    self.pre_ffw_norm = RMSNorm(v.width, dtype=dtype)
    self.mlp = FeedForward(v, dtype=dtype, rngs=rngs)

  def __call__(self, x, positions, attn_mask, cache=None, cache_index=0):
    """float[B, T, D] -> (float[B, T, D], updated layer cache or None); see ``Attention``."""
    y, cache = self.attn(self.pre_attention_norm(x), positions, attn_mask, cache, cache_index)
    x = x + y
    x = x + self.mlp(self.pre_ffw_norm(x))
    return constrain(x, ACT), cache


class Decoder(nnx.Module):
  """The decoder LM. Works on embeddings so that image tokens can be prepended.

  Args:
    variant: a ``VARIANTS`` key or an ``LLMVariant``.
    vocab_size: rows of the embedding table (the tokenizer's size).
    scan_layers: stack the layers and run them with ``lax.scan``.
    remat_policy: a ``compact_jax.models.REMAT_POLICIES`` key.
    dtype: compute dtype name; params stay float32.
  """

  def __init__(
    self,
    variant: str | LLMVariant,
    vocab_size: int,
    *,
    scan_layers: bool = True,
    remat_policy: str = "none",
    dtype: str = "float32",
    rngs: nnx.Rngs,
  ):
    v = decode_variant(variant) if isinstance(variant, str) else variant
    self.variant = v
    self.vocab_size = vocab_size
    self.scan = scan_layers
    self.remat_policy = check_remat_policy(remat_policy)
    self.dtype = compute_dtype(dtype)
    self.embedder = Embedder(vocab_size, v.width, dtype=dtype, rngs=rngs)

    def make(r: nnx.Rngs) -> Block:
      return Block(v, dtype=dtype, rngs=r)

    if scan_layers:
      self.layers = stack_layers(make, v.depth, rngs)
    else:
      for i in range(v.depth):
        setattr(self, f"layers_{i}", make(rngs))
    self.final_norm = RMSNorm(v.width, dtype=dtype)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """int32[B, T] -> float[B, T, D] input embeddings (scaled by sqrt(D))."""
    return self.embedder.encode(tokens)

  def logits(self, pre_logits: jax.Array) -> jax.Array:
    """float[B, T, D] (after ``final_norm``) -> float32[B, T, V] via the tied table."""
    return self.embedder.decode(pre_logits)

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An all-zero cache with room for ``max_len`` tokens per example."""
    v = self.variant
    shape = (v.depth, batch_size, max_len, v.num_kv_heads, v.head_dim)
    return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    attn_mask: jax.Array,
    *,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
  ) -> tuple[jax.Array, dict]:
    """Runs the layers over embedded inputs.

    Args:
      x: float[B, T, D] input embeddings.
      positions: int32[B, T] RoPE positions.
      attn_mask: bool[B, T, S], True where query t may attend key s; S = T
        without a cache, else the cache length.
      cache: keys/values of earlier tokens, float[L, B, S, K, H], or None.
      cache_index: the cache slot of x's first token (a scalar, same for the
        whole batch).

    Returns:
      (logits float32[B, T, V], aux) with aux "pre_logits" float[B, T, D]
      (after ``final_norm``) and, when a cache was given, "kv_cache": the
      cache with x's keys and values written at ``cache_index``.
    """
    x = constrain(x.astype(self.dtype), ACT)
    layer_caches = None if cache is None else (cache.k, cache.v)
    if self.scan:

      def body(layer, carry, kv):
        return layer(carry, positions, attn_mask, kv, cache_index)

      x, new_kv = scan_stacked(self.layers, body, x, layer_caches, remat_policy=self.remat_policy)
    else:
      run = remat_layer(
        lambda layer, h, kv: layer(h, positions, attn_mask, kv, cache_index), self.remat_policy
      )
      new = []
      for i in range(self.variant.depth):
        kv = None if cache is None else (cache.k[i], cache.v[i])
        x, kv = run(getattr(self, f"layers_{i}"), x, kv)
        new.append(kv)
      new_kv = None if cache is None else tuple(jnp.stack(parts) for parts in zip(*new))
    pre_logits = self.final_norm(x)
    aux = {"pre_logits": pre_logits}
    if cache is not None:
      aux["kv_cache"] = KVCache(*new_kv)
    return self.logits(pre_logits), aux
