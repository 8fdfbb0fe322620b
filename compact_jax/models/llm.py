"""One decoder LM for the Gemma 1/2, LLaMA-2/Vicuna, LLaMA-3 and Qwen2 families.

Einsum letters:
  B batch, T query len, S key len, N heads, K kv heads, G query groups per kv
  head (N = K * G), H head dim, D model dim, F mlp dim, V vocab, L layers.

Parameter names are big_vision's Gemma ones (``models/ppp/gemma.py``); the other
families are the same graph with different knobs (``LLMVariant``). Upstream
conventions are kept so that checkpoint converters are pure renames, transposes
and reshapes: Gemma's zero-centred norm scale (``x * (1 + scale)``) vs LLaMA's
plain weight (``x * scale``), unscaled embedding tables (Gemma multiplies by
sqrt(D) at run time), HF's split-half ("rotate_half") RoPE layout. Params
(stacked on a leading layer axis under ``layers/`` when scanned,
``layers_{i}/`` otherwise):

``embedder/input_embedding [V, D]``, ``embedder/output_embedding [V, D]``
(only when the head is not tied), ``pre_attention_norm/scale [D]``,
``attn/q_einsum/w [N, D, H]``, ``attn/kv_einsum/w [2, K, D, H]``,
``attn/q_einsum/b [N, H]`` and ``attn/kv_einsum/b [2, K, H]`` (Qwen2 biases),
``attn/attn_vec_einsum/w [N, H, D]``, ``post_attention_norm/scale [D]``
(Gemma 2), ``pre_ffw_norm/scale [D]``, ``mlp/gating_einsum [2, D, F]``,
``mlp/linear [F, D]``, ``post_ffw_norm/scale [D]`` (Gemma 2), ``final_norm/scale [D]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compact_jax.models import (
  check_remat_policy,
  compute_dtype,
  project,
  remat_layer,
  scan_stacked,
  site_rng,
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

NORMS = ("zero_centred", "plain")
SLIDING_PATTERNS = ("alternate", "all")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling for context extension.

  ``kind="linear"`` divides every frequency by ``factor`` (position
  interpolation). ``kind="llama3"`` is LLaMA-3.1's: wavelengths longer than
  ``original_max_len / low_freq_factor`` are divided by ``factor``, shorter than
  ``original_max_len / high_freq_factor`` are kept, and the band in between is
  interpolated smoothly (HF ``_compute_llama3_parameters``).
  """

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192

  def __post_init__(self):
    if self.kind not in ("linear", "llama3"):
      raise ValueError(f"RopeScaling kind must be 'linear' or 'llama3', got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class LLMVariant:
  """A decoder's size and family knobs. The defaults are Gemma 1's.

  ``vocab_size`` documents the checkpoint's vocabulary only; the model's
  vocabulary is a constructor argument (the tokenizer decides it).

  Attributes:
    norm: "zero_centred" (Gemma, ``x * (1 + scale)``, scale starts at 0) or
      "plain" (LLaMA/Qwen2, ``x * scale``, scale starts at 1).
    norm_eps: RMSNorm epsilon (Gemma 1e-6, LLaMA-2 1e-5).
    rope_base: RoPE max wavelength (10k; LLaMA-3 500k; Qwen2 1M).
    rope_scaling: optional ``RopeScaling``.
    qkv_bias: biases on the q/k/v projections (Qwen2).
    mlp_act: "gelu_tanh" (GeGLU, Gemma) or "silu" (SwiGLU, LLaMA/Qwen2).
    tie_embeddings: the output head is the input table (Gemma) or its own
      ``embedder/output_embedding`` (LLaMA).
    scale_embeddings: multiply input embeddings by sqrt(D) (Gemma).
    query_scale: queries are multiplied by ``query_scale ** -0.5``; None means
      ``head_dim`` (Gemma 2's ``query_pre_attn_scalar``).
    attn_softcap / final_softcap: Gemma 2's ``cap * tanh(x / cap)`` on
      attention logits / output logits; None = off.
    post_norms: Gemma 2's extra RMSNorm after attention and after the MLP.
    sliding_window: local attention span (a query sees keys with
      ``q_pos - k_pos < sliding_window``); None = global everywhere.
    sliding_pattern: "alternate" (Gemma 2: even layers local, odd global) or "all".
  """

  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  vocab_size: int | None = None
  norm: str = "zero_centred"
  norm_eps: float = 1e-6
  rope_base: float = ROPE_MAX_WAVELENGTH
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False
  mlp_act: str = "gelu_tanh"
  tie_embeddings: bool = True
  scale_embeddings: bool = True
  query_scale: float | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  post_norms: bool = False
  sliding_window: int | None = None
  sliding_pattern: str = "alternate"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
    if self.norm not in NORMS:
      raise ValueError(f"LLMVariant norm must be one of {NORMS}, got {self.norm!r}")
    if self.mlp_act not in ACTIVATIONS:
      raise ValueError(
        f"LLMVariant mlp_act must be one of {sorted(ACTIVATIONS)}, got {self.mlp_act!r}"
      )
    if self.sliding_pattern not in SLIDING_PATTERNS:
      raise ValueError(
        f"LLMVariant sliding_pattern must be one of {SLIDING_PATTERNS}, got {self.sliding_pattern!r}"
      )

  def is_local(self, layer: int) -> bool:
    """Whether layer ``layer`` uses sliding-window attention."""
    if self.sliding_window is None:
      return False
    return self.sliding_pattern == "all" or layer % 2 == 0


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "silu": jax.nn.silu,
}

_LLAMA = dict(
  norm="plain", mlp_act="silu", tie_embeddings=False, scale_embeddings=False, norm_eps=1e-5
)

VARIANTS: dict[str, LLMVariant] = {
  "smoke": LLMVariant(width=32, depth=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64),
  "tiny": LLMVariant(width=192, depth=4, num_heads=4, num_kv_heads=1, head_dim=48, mlp_dim=768),
  # The tiny world's default: ~1M params, sized so the full recipe trains in minutes on 2 cores.
  "mini": LLMVariant(width=128, depth=4, num_heads=4, num_kv_heads=1, head_dim=32, mlp_dim=512),
  # The LLaMA family's knobs at smoke size (tiny_* configs of LLaVA-style models).
  "smoke_llama": LLMVariant(
    width=32, depth=1, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64, **_LLAMA
  ),
  # Upstream sizes (HF config.json of each checkpoint): for configs, docs and shape checks.
  "gemma_2b": LLMVariant(
    width=2048,
    depth=18,
    num_heads=8,
    num_kv_heads=1,
    head_dim=256,
    mlp_dim=16384,
    vocab_size=256128,
  ),
  "gemma_7b": LLMVariant(
    width=3072,
    depth=28,
    num_heads=16,
    num_kv_heads=16,
    head_dim=256,
    mlp_dim=24576,
    vocab_size=256000,
  ),
  "gemma2_2b": LLMVariant(
    width=2304,
    depth=26,
    num_heads=8,
    num_kv_heads=4,
    head_dim=256,
    mlp_dim=9216,
    vocab_size=256000,
    query_scale=256,
    attn_softcap=50.0,
    final_softcap=30.0,
    post_norms=True,
    sliding_window=4096,
  ),
  "gemma2_9b": LLMVariant(
    width=3584,
    depth=42,
    num_heads=16,
    num_kv_heads=8,
    head_dim=256,
    mlp_dim=14336,
    vocab_size=256000,
    query_scale=256,
    attn_softcap=50.0,
    final_softcap=30.0,
    post_norms=True,
    sliding_window=4096,
  ),
  # lmsys/vicuna-7b-v1.5 (LLaVA-1.5's LM) has LLaMA-2-7B's shape.
  "vicuna_7b": LLMVariant(
    width=4096,
    depth=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    mlp_dim=11008,
    vocab_size=32000,
    **_LLAMA,
  ),
  "vicuna_13b": LLMVariant(
    width=5120,
    depth=40,
    num_heads=40,
    num_kv_heads=40,
    head_dim=128,
    mlp_dim=13824,
    vocab_size=32000,
    **_LLAMA,
  ),
  "llama3_8b": LLMVariant(
    width=4096,
    depth=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    mlp_dim=14336,
    vocab_size=128256,
    rope_base=500_000.0,
    **_LLAMA,
  ),
  "llama3.2_1b": LLMVariant(
    width=2048,
    depth=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    mlp_dim=8192,
    vocab_size=128256,
    rope_base=500_000.0,
    rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
    **{**_LLAMA, "tie_embeddings": True},
  ),
  "qwen2_0.5b": LLMVariant(
    width=896,
    depth=24,
    num_heads=14,
    num_kv_heads=2,
    head_dim=64,
    mlp_dim=4864,
    vocab_size=151936,
    rope_base=1_000_000.0,
    qkv_bias=True,
    **{**_LLAMA, "tie_embeddings": True, "norm_eps": 1e-6},
  ),
  "qwen2_7b": LLMVariant(
    width=3584,
    depth=28,
    num_heads=28,
    num_kv_heads=4,
    head_dim=128,
    mlp_dim=18944,
    vocab_size=152064,
    rope_base=1_000_000.0,
    qkv_bias=True,
    **{**_LLAMA, "norm_eps": 1e-6},
  ),
}


def decode_variant(name: str) -> LLMVariant:
  if name not in VARIANTS:
    raise ValueError(f"Unknown LLM variant {name!r}; known: {list(VARIANTS)}")
  return VARIANTS[name]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys (after RoPE) and values of every layer, ``float[L, B, S, K, H]`` each,
  and the RoPE position of every slot, ``int32[B, S]`` (sliding windows need
  key positions; slots are not positions when a row has padding).

  Slots are written in order; which ones hold valid tokens is the caller's
  attention mask's business, not the cache's.
  """

  k: jax.Array
  v: jax.Array
  positions: jax.Array


def rope_inv_frequencies(head_dim: int, base: float, scaling: RopeScaling | None) -> np.ndarray:
  """float64[H/2] angular frequencies ``base ** (-2i / H)``, after ``scaling``."""
  inv = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None:
    return inv
  if scaling.kind == "linear":
    return inv / scaling.factor
  low_wavelen = scaling.original_max_len / scaling.low_freq_factor
  high_wavelen = scaling.original_max_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
  smooth = (scaling.original_max_len / wavelen - scaling.low_freq_factor) / (
    scaling.high_freq_factor - scaling.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled)


def apply_rope(
  x: jax.Array,
  positions: jax.Array,
  *,
  base: float = ROPE_MAX_WAVELENGTH,
  scaling: RopeScaling | None = None,
) -> jax.Array:
  """Rotary embedding, split-half convention (first half pairs with second half).

  Args:
    x: float[B, T, N, H].
    positions: int32[B, T].
    base, scaling: see ``LLMVariant.rope_base`` / ``rope_scaling``.

  Returns:
    float[B, T, N, H], same dtype as x (computed in float32).
  """
  inv = jnp.asarray(rope_inv_frequencies(x.shape[-1], base, scaling), jnp.float32)
  radians = positions.astype(jnp.float32)[..., None, None] * inv  # [B, T, 1, H/2]
  sin, cos = jnp.sin(radians), jnp.cos(radians)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """Gemma 2's ``cap * tanh(x / cap)``; identity when ``cap`` is None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


class RMSNorm(nnx.Module):
  """RMSNorm in float32: ``x / rms(x) * (1 + scale)`` ("zero_centred", scale
  starts at 0) or ``x / rms(x) * scale`` ("plain", scale starts at 1)."""

  def __init__(
    self, dim: int, *, dtype: str = "float32", eps: float = 1e-6, kind: str = "zero_centred"
  ):
    init = jnp.zeros if kind == "zero_centred" else jnp.ones
    self.scale = param(init((dim,), jnp.float32), ("norm",))
    self.eps = eps
    self.kind = kind
    self.dtype = compute_dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...]
    return (y * (1.0 + scale if self.kind == "zero_centred" else scale)).astype(self.dtype)


def make_norm(v: LLMVariant, dtype: str) -> RMSNorm:
  return RMSNorm(v.width, dtype=dtype, eps=v.norm_eps, kind=v.norm)


class Einsum(nnx.Module):
  """Holds one einsum weight ``w`` and optionally a bias ``b`` (big_vision's
  ``Einsum``; the einsum is at the call site)."""

  def __init__(
    self,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    fan_in: int,
    *,
    bias_shape: tuple[int, ...] | None = None,
    bias_axes: tuple[str | None, ...] = (),
    rngs: nnx.Rngs,
  ):
    self.w = param(lecun_normal(rngs.params(), shape, fan_in), axes)
    if bias_shape is not None:
      self.b = param(jnp.zeros(bias_shape, jnp.float32), bias_axes)


class Embedder(nnx.Module):
  """Token embedding table ``input_embedding float32[V, D]``, tied with the
  output head unless ``tie`` is False (then ``output_embedding float32[V, D]``,
  HF's ``lm_head.weight`` layout)."""

  def __init__(
    self,
    vocab_size: int,
    dim: int,
    *,
    tie: bool = True,
    scale: bool = True,
    dtype: str = "float32",
    rngs: nnx.Rngs,
  ):
    self.input_embedding = param(
      lecun_normal(rngs.params(), (vocab_size, dim), dim), ("vocab", "embed")
    )
    if not tie:
      self.output_embedding = param(
        lecun_normal(rngs.params(), (vocab_size, dim), dim), ("vocab", "embed")
      )
    self.tie = tie
    self.scale = scale
    self.dtype = compute_dtype(dtype)

  def encode(self, tokens: jax.Array) -> jax.Array:
    """int32[B, T] -> float[B, T, D], times sqrt(D) when ``scale`` (Gemma)."""
    x = jnp.take(self.input_embedding[...], tokens, axis=0).astype(self.dtype)
    if not self.scale:
      return x
    # Gemma casts the normaliser to the compute dtype first (bf16 rounds it).
    return x * jnp.sqrt(x.shape[-1]).astype(self.dtype)

  def decode(self, x: jax.Array) -> jax.Array:
    """float[B, T, D] -> float32[B, T, V] logits."""
    table = self.input_embedding if self.tie else self.output_embedding
    logits = jnp.einsum("BTD,VD->BTV", x, table[...].astype(self.dtype))
    return logits.astype(jnp.float32)


class Attention(nnx.Module):
  """Multi-head / multi-query / grouped-query attention with RoPE and an
  optional KV cache."""

  def __init__(self, v: LLMVariant, *, dtype: str, rngs: nnx.Rngs):
    d, n, k, h = v.width, v.num_heads, v.num_kv_heads, v.head_dim
    qb = dict(bias_shape=(n, h), bias_axes=("heads", "head_dim")) if v.qkv_bias else {}
    kvb = dict(bias_shape=(2, k, h), bias_axes=(None, "kv_heads", "head_dim")) if v.qkv_bias else {}
    self.q_einsum = Einsum((n, d, h), ("heads", "embed", "head_dim"), d, rngs=rngs, **qb)
    self.kv_einsum = Einsum(
      (2, k, d, h), (None, "kv_heads", "embed", "head_dim"), d, rngs=rngs, **kvb
    )
    self.attn_vec_einsum = Einsum((n, h, d), ("heads", "head_dim", "embed"), n * h, rngs=rngs)
    self.num_kv_heads = k
    self.qkv_bias = v.qkv_bias
    self.query_scale = float(v.query_scale or h) ** -0.5
    self.rope_base = v.rope_base
    self.rope_scaling = v.rope_scaling
    self.attn_softcap = v.attn_softcap
    self.dtype = compute_dtype(dtype)

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    attn_mask: jax.Array,
    cache: tuple[jax.Array, jax.Array] | None = None,
    cache_index: jax.Array | int = 0,
    lora_mask: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attends the T new tokens to themselves, or to the whole cache.

    Args:
      x: float[B, T, D].
      positions: int32[B, T] RoPE positions.
      attn_mask: bool[B, T, S]; S = T without a cache, else the cache length.
      cache: this layer's (k, v), float[B, S, K, H] each, or None.
      cache_index: where the T new keys/values are written in the cache.
      lora_mask: bool[B, T] or None; partial LoRA (see ``models.project``).
      dropout_rng: this layer's LoRA dropout key (training only), or None.

    Returns:
      (float[B, T, D], updated (k, v) or None).
    """
    dt = self.dtype
    x = x.astype(dt)
    m, r = lora_mask, dropout_rng
    q = project("BTD,NDH->BTNH", x, self.q_einsum, "w", dt, m, rng=site_rng(r, 0))
    k = project("BSD,KDH->BSKH", x, self.kv_einsum, "w", dt, m, index=0, rng=site_rng(r, 1))
    v = project("BSD,KDH->BSKH", x, self.kv_einsum, "w", dt, m, index=1, rng=site_rng(r, 2))
    if self.qkv_bias:
      bkv = self.kv_einsum.b[...].astype(dt)
      q, k, v = q + self.q_einsum.b[...].astype(dt), k + bkv[0], v + bkv[1]
    rope = dict(base=self.rope_base, scaling=self.rope_scaling)
    q = apply_rope(q, positions, **rope) * jnp.asarray(self.query_scale, dt)
    k = apply_rope(k, positions, **rope)
    if cache is not None:
      at = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
      v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
      cache = (k, v)
    b, t, n, h = q.shape
    q = q.reshape(b, t, self.num_kv_heads, n // self.num_kv_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k.astype(dt)).astype(jnp.float32)
    logits = softcap(logits, self.attn_softcap)
    logits = jnp.where(attn_mask[:, None, None, :, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(dt)).reshape(b, t, n, h)
    o = project("BTNH,NHD->BTD", out, self.attn_vec_einsum, "w", dt, m, rng=site_rng(r, 3))
    return o, cache


class FeedForward(nnx.Module):
  """Gated MLP: ``(act(x W_gate) * (x W_up)) W_down``; GeGLU or SwiGLU."""

  def __init__(self, v: LLMVariant, *, dtype: str, rngs: nnx.Rngs):
    d, f = v.width, v.mlp_dim
    self.gating_einsum = param(lecun_normal(rngs.params(), (2, d, f), d), (None, "embed", "mlp"))
    self.linear = param(lecun_normal(rngs.params(), (f, d), f), ("mlp", "embed"))
    self.act = v.mlp_act
    self.dtype = compute_dtype(dtype)

  def __call__(
    self,
    x: jax.Array,
    lora_mask: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """float[B, T, D] -> float[B, T, D]; ``lora_mask`` and ``dropout_rng`` (this
    layer's key; sites 4-6 after the attention's 0-3) as in ``models.project``."""
    dt, m, r = self.dtype, lora_mask, dropout_rng
    gate = project("BTD,DF->BTF", x, self, "gating_einsum", dt, m, index=0, rng=site_rng(r, 4))
    up = project("BTD,DF->BTF", x, self, "gating_einsum", dt, m, index=1, rng=site_rng(r, 5))
    hidden = constrain(ACTIVATIONS[self.act](gate) * up, ("act_batch", "act_len", "act_mlp"))
    return project("BTF,FD->BTD", hidden, self, "linear", dt, m, rng=site_rng(r, 6))


class Block(nnx.Module):
  """Pre-norm decoder block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x));
  with ``post_norms`` (Gemma 2) each branch output is RMSNormed before the add."""

  def __init__(self, v: LLMVariant, *, dtype: str, rngs: nnx.Rngs):
    self.pre_attention_norm = make_norm(v, dtype)
    self.attn = Attention(v, dtype=dtype, rngs=rngs)
    if v.post_norms:
      self.post_attention_norm = make_norm(v, dtype)
    self.pre_ffw_norm = make_norm(v, dtype)
    self.mlp = FeedForward(v, dtype=dtype, rngs=rngs)
    if v.post_norms:
      self.post_ffw_norm = make_norm(v, dtype)
    self.post_norms = v.post_norms

  def __call__(
    self, x, positions, attn_mask, cache=None, cache_index=0, lora_mask=None, dropout_rng=None
  ):
    """float[B, T, D] -> (float[B, T, D], updated layer cache or None); see ``Attention``."""
    y, cache = self.attn(
      self.pre_attention_norm(x), positions, attn_mask, cache, cache_index, lora_mask, dropout_rng
    )
    if self.post_norms:
      y = self.post_attention_norm(y)
    x = x + y
    y = self.mlp(self.pre_ffw_norm(x), lora_mask, dropout_rng)
    if self.post_norms:
      y = self.post_ffw_norm(y)
    x = x + y
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
    self.embedder = Embedder(
      vocab_size,
      v.width,
      tie=v.tie_embeddings,
      scale=v.scale_embeddings,
      dtype=dtype,
      rngs=rngs,
    )

    def make(r: nnx.Rngs) -> Block:
      return Block(v, dtype=dtype, rngs=r)

    if scan_layers:
      self.layers = stack_layers(make, v.depth, rngs)
    else:
      for i in range(v.depth):
        setattr(self, f"layers_{i}", make(rngs))
    self.final_norm = make_norm(v, dtype)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """int32[B, T] -> float[B, T, D] input embeddings (times sqrt(D) for Gemma)."""
    return self.embedder.encode(tokens)

  def logits(self, pre_logits: jax.Array) -> jax.Array:
    """float[B, T, D] (after ``final_norm``) -> float32[B, T, V], soft-capped for Gemma 2."""
    return softcap(self.embedder.decode(pre_logits), self.variant.final_softcap)

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An all-zero cache with room for ``max_len`` tokens per example."""
    v = self.variant
    shape = (v.depth, batch_size, max_len, v.num_kv_heads, v.head_dim)
    return KVCache(
      jnp.zeros(shape, self.dtype),
      jnp.zeros(shape, self.dtype),
      jnp.zeros((batch_size, max_len), jnp.int32),
    )

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    attn_mask: jax.Array,
    *,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
    lora_mask: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
  ) -> tuple[jax.Array, dict]:
    """Runs the layers over embedded inputs.

    Args:
      x: float[B, T, D] input embeddings.
      positions: int32[B, T] RoPE positions.
      attn_mask: bool[B, T, S], True where query t may attend key s; S = T
        without a cache, else the cache length. Sliding-window layers further
        restrict it by ``positions``.
      cache: keys/values of earlier tokens, float[L, B, S, K, H], or None.
      cache_index: the cache slot of x's first token (a scalar, same for the
        whole batch).
      lora_mask: bool[B, T]: LoRA adapters apply only where True (partial
        LoRA); None applies them everywhere.
      dropout_rng: a PRNG key for LoRA dropout (training only; None at eval and
        decode). Layer i uses ``split(dropout_rng, L)[i]``, then a fixed id per
        projection site, so no two adapters share a mask.

    Returns:
      (logits float32[B, T, V], aux) with aux "pre_logits" float[B, T, D]
      (after ``final_norm``) and, when a cache was given, "kv_cache": the
      cache with x's keys, values and positions written at ``cache_index``.
    """
    v = self.variant
    x = constrain(x.astype(self.dtype), ACT)
    positions = positions.astype(jnp.int32)
    layer_caches = None if cache is None else (cache.k, cache.v)
    key_positions = positions
    if cache is not None:
      key_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache_index))
    local_mask = None
    if v.sliding_window is not None:
      near = positions[:, :, None] - key_positions[:, None, :] < v.sliding_window
      local_mask = attn_mask & near
    is_local = jnp.asarray([v.is_local(i) for i in range(v.depth)])

    def layer_mask(local: jax.Array) -> jax.Array:
      return attn_mask if local_mask is None else jnp.where(local, local_mask, attn_mask)

    # The same per-layer keys scanned or unrolled, so both layouts drop alike.
    layer_rngs = None if dropout_rng is None else jax.random.split(dropout_rng, v.depth)
    if self.scan:

      def body(layer, carry, xs):
        local, kv, rng = xs
        return layer(carry, positions, layer_mask(local), kv, cache_index, lora_mask, rng)

      x, new_kv = scan_stacked(
        self.layers, body, x, (is_local, layer_caches, layer_rngs), remat_policy=self.remat_policy
      )
    else:
      run = remat_layer(
        lambda layer, h, mask, kv, rng: layer(h, positions, mask, kv, cache_index, lora_mask, rng),
        self.remat_policy,
      )
      new = []
      for i in range(v.depth):
        kv = None if cache is None else (cache.k[i], cache.v[i])
        mask = local_mask if v.is_local(i) else attn_mask
        rng = None if layer_rngs is None else layer_rngs[i]
        x, kv = run(getattr(self, f"layers_{i}"), x, mask, kv, rng)
        new.append(kv)
      new_kv = None if cache is None else tuple(jnp.stack(parts) for parts in zip(*new))
    pre_logits = self.final_norm(x)
    aux = {"pre_logits": pre_logits}
    if cache is not None:
      aux["kv_cache"] = KVCache(*new_kv, key_positions)
    return self.logits(pre_logits), aux
