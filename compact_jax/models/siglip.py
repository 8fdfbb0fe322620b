"""SigLIP-style ViT image encoder (big_vision ``models/vit.py`` names, ``pool_type="none"``),
with CLIP's ViT as a variant family of the same implementation.

Einsum letters:
  B batch, T query len, S key len, N heads, H head dim, D model dim, F mlp dim,
  L layers, Y/X patch-grid rows/cols, P/Q offsets inside a patch, C channels.

The parameter tree matches big_vision's so its npz checkpoints load by name
(see ``reference_codebases.md`` §3.2): ``embedding/{kernel,bias}``,
``pos_embedding``, ``Transformer/encoderblock/...`` (stacked on a leading layer
axis when scanned, ``encoderblock_{i}`` otherwise) and ``Transformer/encoder_norm``.

CLIP towers (``"clip-L/14"``; OpenAI CLIP, HF ``CLIPVisionModel``, LLaVA-1.5's
tower) differ only in knobs of ``ViTVariant``: a class token, a LayerNorm before
the encoder, quick-GELU, LayerNorm eps 1e-5 and a patch conv without bias. They
add two params: ``cls float32[1, 1, D]`` (big_vision's name for its
``pool_type="tok"`` token) and ``pre_norm/{scale,bias}`` (a name we invented:
big_vision's ViT has no pre-encoder norm; HF ``pre_layrnorm``, OpenAI
``ln_pre``); ``pos_embedding`` is then ``[1, 1 + N, D]`` with the class
position first (big_vision adds no position to its class token). The class
token is dropped from the per-patch output, as LLaVA's "default" feature
selection does, so a CLIP tower yields the same N tokens as a SigLIP one.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compact_jax.models import (
  check_remat_policy,
  compute_dtype,
  remat_layer,
  scan_stacked,
  stack_layers,
  weight,
)
from compact_jax.sharding import constrain, param

ACT = ("act_batch", "act_len", "act_embed")


# MLP activations by name: SigLIP's tanh GELU, CLIP's x * sigmoid(1.702 x).
ACTIVATIONS = {
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class ViTVariant:
  """A ViT's size and family knobs. ``head_dim`` is ``width // num_heads`` as in big_vision.

  The defaults are SigLIP's; ``CLIP`` holds the CLIP family's knobs:
    class_token: prepend a learned ``cls`` token (with its own position embedding).
    pre_norm: a LayerNorm (``pre_norm``) between the embeddings and the encoder.
    patch_bias: the patch conv has a bias (``embedding/bias``).
    mlp_act: an ``ACTIVATIONS`` key.
    norm_eps: every LayerNorm's epsilon.
    pixel_norm: None (the input is used as is) or per-channel ``(mean, std)``
      of [0, 1] pixels: the tower takes the pipeline's [-1, 1] images and
      renormalises them to what its checkpoint was trained on (CLIP's
      ``CLIPImageProcessor`` statistics), so every tower sees one batch format.
  """

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  class_token: bool = False
  pre_norm: bool = False
  patch_bias: bool = True
  mlp_act: str = "gelu_tanh"
  norm_eps: float = 1e-6
  pixel_norm: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"ViT width {self.width} is not divisible by num_heads {self.num_heads}")
    if self.mlp_act not in ACTIVATIONS:
      raise ValueError(f"ViT mlp_act {self.mlp_act!r} unknown; known: {sorted(ACTIVATIONS)}")

  @property
  def family(self) -> str:
    """Which HF vision model this converts to: "clip" (class token) or "siglip"."""
    return "clip" if self.class_token else "siglip"

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


# name -> (width, depth, mlp_dim, num_heads); the patch size comes from "/P".
# B, L and So400m are big_vision's (vit.py decode_variant); tiny and smoke run on a CPU.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
  "smoke": (32, 1, 64, 2),
  "tiny": (128, 4, 512, 4),
  "B": (768, 12, 3072, 12),
  "L": (1024, 24, 4096, 16),
  "So400m": (1152, 27, 4304, 16),
}


# OpenAI CLIP's pixel mean and std (HF CLIPImageProcessor image_mean / image_std).
CLIP_PIXELS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
# Family prefix of a variant string ("clip-L/14") -> its ``ViTVariant`` knobs;
# no prefix (or "siglip-") is SigLIP. CLIP's are OpenAI CLIP's (HF CLIPVisionConfig:
# hidden_act "quick_gelu", layer_norm_eps 1e-5, Conv2d(bias=False), pre_layrnorm).
CLIP = dict(
  class_token=True,
  pre_norm=True,
  patch_bias=False,
  mlp_act="quick_gelu",
  norm_eps=1e-5,
  pixel_norm=CLIP_PIXELS,
)
FAMILIES: dict[str, dict] = {"siglip": {}, "clip": CLIP}

# Released towers (HF repo ids; big_vision's npz files hold the same weights) at
# the resolutions the MLLM literature uses. Tokens = (image_size / patch)^2.
# So400m/14@448 has no SigLIP 1 release: PaliGemma-448 resamples the 384/224
# position embeddings (``resample_posemb``), as ``load_siglip_vision(image_size=448)`` does.
RELEASES: dict[str, tuple[str, int, str | None]] = {
  "B/16@224": ("B/16", 224, "google/siglip-base-patch16-224"),  # 196 tokens
  "B/16@384": ("B/16", 384, "google/siglip-base-patch16-384"),  # 576 tokens
  "L/16@384": ("L/16", 384, "google/siglip-large-patch16-384"),  # 576 tokens
  "So400m/14@224": ("So400m/14", 224, "google/siglip-so400m-patch14-224"),  # 256 tokens
  "So400m/14@384": ("So400m/14", 384, "google/siglip-so400m-patch14-384"),  # 729 tokens
  "So400m/14@448": ("So400m/14", 448, None),  # 1024 tokens, resampled
}
# OpenAI CLIP towers (HF ``CLIPModel`` repos; their ``vision_model.*`` load with
# ``hf.load_clip_vision``). LLaVA-1.5 uses clip-L/14@336 at layer -2: 24 x 24 = 576 tokens.
CLIP_RELEASES: dict[str, tuple[str, int, str]] = {
  "clip-B/16@224": ("clip-B/16", 224, "openai/clip-vit-base-patch16"),  # 196 tokens
  "clip-L/14@224": ("clip-L/14", 224, "openai/clip-vit-large-patch14"),  # 256 tokens
  "clip-L/14@336": ("clip-L/14", 336, "openai/clip-vit-large-patch14-336"),  # 576 tokens
}


def decode_tower(name: str) -> tuple[ViTVariant, int]:
  """``"So400m/14@384"`` -> (variant, image size). As in big_vision and HF (a VALID
  stride-P conv), a size that is not a multiple of P drops the last ``size % P``
  pixel rows and columns: So400m/14@384 sees 27 x 27 patches."""
  m = re.fullmatch(r"(.+)@(\d+)", name)
  if not m:
    raise ValueError(
      f"Unknown ViT tower {name!r}; expected NAME/PATCH@SIZE, e.g. "
      f"{list(RELEASES) + list(CLIP_RELEASES)}"
    )
  v, size = decode_variant(m.group(1)), int(m.group(2))
  if size < v.patch_size:
    raise ValueError(f"SigLIP tower {name!r}: {size} px is smaller than one patch")
  return v, size


def decode_variant(name: str) -> ViTVariant:
  """Parses ``"So400m/14"`` (SigLIP) or ``"clip-L/14"`` into a ``ViTVariant``
  (any patch size after the slash; an optional ``FAMILIES`` prefix)."""
  m = re.fullmatch(r"(?:([a-z]+)-)?([A-Za-z0-9]+)/(\d+)", name)
  if not m or m.group(2) not in VARIANTS or (m.group(1) or "siglip") not in FAMILIES:
    raise ValueError(
      f"Unknown ViT variant {name!r}; expected [FAMILY-]NAME/PATCH with FAMILY in "
      f"{list(FAMILIES)} and NAME in {list(VARIANTS)}"
    )
  width, depth, mlp_dim, heads = VARIANTS[m.group(2)]
  return ViTVariant(
    width, depth, mlp_dim, heads, int(m.group(3)), **FAMILIES[m.group(1) or "siglip"]
  )


def lecun_normal(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
  """Normal init with variance 1/fan_in (fan_in is explicit: kernels here are not 2-D)."""
  return jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)


class Dense(nnx.Module):
  """``y = x @ kernel + bias`` with ``kernel float32[Din, Dout]``."""

  def __init__(
    self,
    din: int,
    dout: int,
    *,
    axes: tuple[str | None, str | None] = ("embed", "mlp"),
    dtype: str = "float32",
    rngs: nnx.Rngs,
  ):
    self.kernel = param(lecun_normal(rngs.params(), (din, dout), din), axes)
    self.bias = param(jnp.zeros((dout,), jnp.float32), axes[1:])
    self.dtype = compute_dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[..., Din] -> float[..., Dout] in the compute dtype."""
    y = jnp.einsum("...D,DF->...F", x.astype(self.dtype), weight(self, "kernel").astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis (eps 1e-6, as flax and HF SigLIP), in float32."""

  def __init__(self, dim: int, *, dtype: str = "float32", eps: float = 1e-6):
    self.scale = param(jnp.ones((dim,), jnp.float32), ("norm",))
    self.bias = param(jnp.zeros((dim,), jnp.float32), ("norm",))
    self.eps = eps
    self.dtype = compute_dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class HeadsProjection(nnx.Module):
  """Query/key/value projection: ``kernel float32[D, N, H]``, ``bias float32[N, H]``."""

  def __init__(self, dim: int, heads: int, head_dim: int, *, dtype: str, rngs: nnx.Rngs):
    shape = (dim, heads, head_dim)
    self.kernel = param(lecun_normal(rngs.params(), shape, dim), ("embed", "heads", "head_dim"))
    self.bias = param(jnp.zeros((heads, head_dim), jnp.float32), ("heads", "head_dim"))
    self.dtype = compute_dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[B, T, D] -> float[B, T, N, H]."""
    y = jnp.einsum("BTD,DNH->BTNH", x, weight(self, "kernel").astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)


class OutProjection(nnx.Module):
  """Attention output: ``kernel float32[N, H, D]``, ``bias float32[D]``."""

  def __init__(self, heads: int, head_dim: int, dim: int, *, dtype: str, rngs: nnx.Rngs):
    shape = (heads, head_dim, dim)
    kernel = lecun_normal(rngs.params(), shape, heads * head_dim)
    self.kernel = param(kernel, ("heads", "head_dim", "embed"))
    self.bias = param(jnp.zeros((dim,), jnp.float32), ("embed",))
    self.dtype = compute_dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[B, T, N, H] -> float[B, T, D]."""
    y = jnp.einsum("BTNH,NHD->BTD", x, weight(self, "kernel").astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)


class MultiHeadAttention(nnx.Module):
  """Bidirectional multi-head attention with biased q/k/v/out projections
  (self-attention, or cross-attention when ``kv`` is given)."""

  def __init__(self, v: ViTVariant, *, dtype: str, rngs: nnx.Rngs):
    d, n, h = v.width, v.num_heads, v.head_dim
    self.query = HeadsProjection(d, n, h, dtype=dtype, rngs=rngs)
    self.key = HeadsProjection(d, n, h, dtype=dtype, rngs=rngs)
    self.value = HeadsProjection(d, n, h, dtype=dtype, rngs=rngs)
    self.out = OutProjection(n, h, d, dtype=dtype, rngs=rngs)
    self.dtype = compute_dtype(dtype)

  def __call__(self, x: jax.Array, kv: jax.Array | None = None) -> jax.Array:
    """float[B, T, D] (queries), optional float[B, S, D] (keys/values) -> float[B, T, D]."""
    kv = x if kv is None else kv
    q, k, v = self.query(x), self.key(kv), self.value(kv)
    q = q * (q.shape[-1] ** -0.5)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    return self.out(jnp.einsum("BNTS,BSNH->BTNH", probs, v))


class MlpBlock(nnx.Module):
  """Dense -> the variant's activation (SigLIP: tanh GELU as big_vision and HF;
  CLIP: quick-GELU) -> Dense."""

  def __init__(self, v: ViTVariant, *, dtype: str, rngs: nnx.Rngs):
    self.Dense_0 = Dense(v.width, v.mlp_dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.Dense_1 = Dense(v.mlp_dim, v.width, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.act = v.mlp_act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.Dense_1(ACTIVATIONS[self.act](self.Dense_0(x)))


class EncoderBlock(nnx.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, v: ViTVariant, *, dtype: str, rngs: nnx.Rngs):
    self.LayerNorm_0 = LayerNorm(v.width, dtype=dtype, eps=v.norm_eps)
    self.MultiHeadDotProductAttention_0 = MultiHeadAttention(v, dtype=dtype, rngs=rngs)
    self.LayerNorm_1 = LayerNorm(v.width, dtype=dtype, eps=v.norm_eps)
    self.MlpBlock_0 = MlpBlock(v, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[B, T, D] -> float[B, T, D]."""
    x = x + self.MultiHeadDotProductAttention_0(self.LayerNorm_0(x))
    x = x + self.MlpBlock_0(self.LayerNorm_1(x))
    return constrain(x, ACT)


class MAPHead(nnx.Module):
  """Multihead attention pooling (big_vision ``MAPHead``, HF
  ``SiglipMultiheadAttentionPoolingHead``): a learned probe attends over the
  tokens, then a residual MLP; ``probe float32[1, 1, D]``."""

  def __init__(self, v: ViTVariant, *, dtype: str, rngs: nnx.Rngs):
    probe = jax.random.normal(rngs.params(), (1, 1, v.width)) / math.sqrt(v.width)
    self.probe = param(probe, (None, None, "embed"))
    self.MultiHeadDotProductAttention_0 = MultiHeadAttention(v, dtype=dtype, rngs=rngs)
    self.LayerNorm_0 = LayerNorm(v.width, dtype=dtype, eps=v.norm_eps)
    self.MlpBlock_0 = MlpBlock(v, dtype=dtype, rngs=rngs)
    self.dtype = compute_dtype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[B, N, D] -> float[B, D]."""
    probe = jnp.broadcast_to(self.probe[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
    x = self.MultiHeadDotProductAttention_0(probe, x)
    x = x + self.MlpBlock_0(self.LayerNorm_0(x))
    return x[:, 0]


def resample_posemb(posemb: np.ndarray, new_grid: int) -> np.ndarray:
  """Bilinear resampling of ``float[1, G*G, D]`` position embeddings to ``new_grid``^2.

  Corner-aligned like big_vision's ``resample_posemb`` (``scipy.ndimage.zoom``
  with ``order=1``): output row o samples input row ``o * (G - 1) / (G' - 1)``.
  Used when a checkpoint's resolution differs from the model's.
  """
  posemb = np.asarray(posemb)
  n, d = posemb.shape[1:]
  old = math.isqrt(n)
  if old * old != n:
    raise ValueError(f"resample_posemb: {n} positions is not a square grid")
  grid = posemb.reshape(old, old, d).astype(np.float64)

  def axis_weights(size_in: int, size_out: int) -> np.ndarray:
    """float64[size_out, size_in] interpolation matrix."""
    w = np.zeros((size_out, size_in))
    coords = np.arange(size_out) * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    lo = np.clip(np.floor(coords).astype(int), 0, size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = coords - lo
    w[np.arange(size_out), lo] += 1 - frac
    w[np.arange(size_out), hi] += frac
    return w

  w = axis_weights(old, new_grid)
  out = np.einsum("yi,xj,ijd->yxd", w, w, grid)
  return out.reshape(1, new_grid * new_grid, d).astype(posemb.dtype)


def _check_output_layer(output_layer: int, depth: int) -> None:
  if not -depth <= output_layer <= -1:
    raise ValueError(
      f"vit output_layer must be in [-{depth}, -1] for depth {depth}, got {output_layer}"
    )


class Encoder(nnx.Module):
  """The block stack plus ``encoder_norm`` (big_vision's ``Transformer``).

  ``output_layer`` picks the features: -1 is the last block's output after
  ``encoder_norm`` (big_vision/PaliGemma, HF ``last_hidden_state`` +
  ``post_layernorm``). ``-n`` for n >= 2 is the raw residual stream after block
  ``depth - n + 1`` *without* ``encoder_norm``, which is HF's
  ``hidden_states[-n]`` as LLaVA uses with n = 2; the blocks after it are not
  run (their params get zero gradient), and neither is ``encoder_norm``.
  """

  def __init__(
    self,
    v: ViTVariant,
    *,
    output_layer: int = -1,
    scan_layers: bool = True,
    remat_policy: str = "none",
    dtype: str = "float32",
    rngs: nnx.Rngs,
  ):
    _check_output_layer(output_layer, v.depth)
    self.depth = v.depth
    self.output_layer = output_layer
    self.scan = scan_layers
    self.remat_policy = check_remat_policy(remat_policy)

    def make(r: nnx.Rngs) -> EncoderBlock:
      return EncoderBlock(v, dtype=dtype, rngs=r)

    if scan_layers:
      self.encoderblock = stack_layers(make, v.depth, rngs)
    else:
      for i in range(v.depth):
        setattr(self, f"encoderblock_{i}", make(rngs))
    self.encoder_norm = LayerNorm(v.width, dtype=dtype, eps=v.norm_eps)

  def __call__(self, x: jax.Array) -> jax.Array:
    """float[B, T, D] -> float[B, T, D]."""
    num_run = self.depth + 1 + self.output_layer
    if self.scan:

      def body(block, c, _):
        return block(c), None

      x, _ = scan_stacked(
        self.encoderblock, body, x, remat_policy=self.remat_policy, num_layers=num_run
      )
    else:
      run = remat_layer(lambda block, c: block(c), self.remat_policy)
      for i in range(num_run):
        x = run(getattr(self, f"encoderblock_{i}"), x)
    return self.encoder_norm(x) if self.output_layer == -1 else x


class PatchEmbedding(nnx.Module):
  """A stride-P PxP conv, written as a reshape plus an einsum.

  ``kernel float32[P, P, 3, D]`` is the conv's HWIO kernel, so big_vision's
  ``embedding/kernel`` loads unchanged. ``use_bias=False`` (CLIP) drops ``bias``.
  """

  def __init__(self, patch: int, dim: int, *, dtype: str, rngs: nnx.Rngs, use_bias: bool = True):
    fan_in = patch * patch * 3
    kernel = lecun_normal(rngs.params(), (patch, patch, 3, dim), fan_in)
    self.kernel = param(kernel, ("patch", "patch", "channels", "embed"))
    if use_bias:
      self.bias = param(jnp.zeros((dim,), jnp.float32), ("embed",))
    self.use_bias = use_bias
    self.patch = patch
    self.dtype = compute_dtype(dtype)

  def __call__(self, image: jax.Array) -> jax.Array:
    """float[B, H, W, 3] -> float[B, (H/P)*(W/P), D], patches in row-major order."""
    b, h, w, c = image.shape
    p = self.patch
    # A VALID conv ignores the last h % p rows and w % p columns (384 px at patch 14).
    image = image[:, : h // p * p, : w // p * p]
    x = image.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
    x = jnp.einsum("BYPXQC,PQCD->BYXD", x, weight(self, "kernel").astype(self.dtype))
    if self.use_bias:
      x = x + self.bias[...].astype(self.dtype)
    return x.reshape(b, (h // p) * (w // p), -1)


def normalize_pixels(
  image: jax.Array, pixel_norm: tuple[tuple[float, ...], tuple[float, ...]] | None
) -> jax.Array:
  """float32[..., 3] in [-1, 1] -> ``((image + 1) / 2 - mean) / std`` (or unchanged)."""
  if pixel_norm is None:
    return image
  mean, std = (jnp.asarray(a, jnp.float32) for a in pixel_norm)
  return ((image.astype(jnp.float32) + 1.0) * 0.5 - mean) / std


class ViT(nnx.Module):
  """SigLIP (or CLIP) image tower without pooling: one output token per patch.

  Args:
    variant: a ``VARIANTS`` string such as ``"So400m/14"`` or ``"clip-L/14"``,
      or a ``ViTVariant``.
    image_size: input side in pixels; a remainder modulo the patch size is
      ignored, as by big_vision's and HF's VALID patch conv.
    output_layer: see ``Encoder``.
    head: an optional projection applied to the features (big_vision's
      ``img/head``; PaliGemma's linear connector lives here).
    pool_type: "none" (per-patch tokens only), "map" (also a MAP-pooled
      vector, ``MAPHead_0``, in ``aux["pooled"]``; needs ``output_layer=-1``) or
      "tok" (the class token after ``encoder_norm`` in ``aux["pooled"]``, HF
      CLIP's ``pooler_output``; needs a class-token variant and ``output_layer=-1``).
    scan_layers: stack the blocks and run them with ``lax.scan``.
    remat_policy: a ``compact_jax.models.REMAT_POLICIES`` key.
    dtype: compute dtype name; params stay float32.
  """

  def __init__(
    self,
    variant: str | ViTVariant,
    *,
    image_size: int,
    output_layer: int = -1,
    head: nnx.Module | None = None,
    pool_type: str = "none",
    scan_layers: bool = True,
    remat_policy: str = "none",
    dtype: str = "float32",
    rngs: nnx.Rngs,
  ):
    v = decode_variant(variant) if isinstance(variant, str) else variant
    _check_output_layer(output_layer, v.depth)
    if image_size < v.patch_size:
      raise ValueError(f"image_size {image_size} is smaller than the patch size {v.patch_size}")
    if pool_type not in ("none", "map", "tok"):
      raise ValueError(f"ViT pool_type must be 'none', 'map' or 'tok', got {pool_type!r}")
    if pool_type != "none" and output_layer != -1:
      raise ValueError(
        f"ViT pool_type={pool_type!r} pools the last layer; it needs output_layer=-1"
      )
    if pool_type == "tok" and not v.class_token:
      raise ValueError("ViT pool_type='tok' needs a class-token variant (e.g. clip-L/14)")
    self.variant = v
    self.image_size = image_size
    self.num_patches = (image_size // v.patch_size) ** 2
    self.embedding = PatchEmbedding(
      v.patch_size, v.width, dtype=dtype, rngs=rngs, use_bias=v.patch_bias
    )
    # big_vision's "learn" posemb init: normal with stddev 1/sqrt(width).
    num_pos = self.num_patches + int(v.class_token)
    posemb = jax.random.normal(rngs.params(), (1, num_pos, v.width)) / math.sqrt(v.width)
    self.pos_embedding = param(posemb, (None, "position", "embed"))
    if v.class_token:
      # OpenAI CLIP's init (scale * randn); big_vision would use zeros.
      cls = jax.random.normal(rngs.params(), (1, 1, v.width)) / math.sqrt(v.width)
      self.cls = param(cls, (None, None, "embed"))
    if v.pre_norm:
      self.pre_norm = LayerNorm(v.width, dtype=dtype, eps=v.norm_eps)
    self.Transformer = Encoder(
      v,
      output_layer=output_layer,
      scan_layers=scan_layers,
      remat_policy=remat_policy,
      dtype=dtype,
      rngs=rngs,
    )
    self.head = head
    if pool_type == "map":
      self.MAPHead_0 = MAPHead(v, dtype=dtype, rngs=rngs)
    self.pool_type = pool_type
    self.dtype = compute_dtype(dtype)

  def __call__(self, image: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Encodes images.

    Args:
      image: float32[B, H, W, 3] in [-1, 1] (the data pipeline's range; a
        variant with ``pixel_norm``, e.g. CLIP, renormalises it), H = W = image_size.

    Returns:
      (float[B, N, D_out], aux): N = (image_size / P)^2 tokens (a class token
      is dropped), D_out the head's output width (or the ViT width without a
      head). With C = 1 for a class-token variant and 0 otherwise, aux holds
      "stem" float[B, C + N, D] (the encoder's input: [class token;] patches +
      posemb [, pre_norm]), "encoded" float[B, C + N, D] (class token first)
      and, with ``pool_type`` "map" or "tok", "pooled" float[B, D].
    """
    if image.ndim != 4 or image.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(
        f"ViT expects images float32[B, {self.image_size}, {self.image_size}, 3], got shape {image.shape}"
      )
    x = self.embedding(normalize_pixels(image, self.variant.pixel_norm))
    if self.variant.class_token:
      cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.pos_embedding[...].astype(self.dtype)
    if self.variant.pre_norm:
      x = self.pre_norm(x)
    x = constrain(x, ACT)
    aux = {"stem": x}
    x = aux["encoded"] = self.Transformer(x)
    if self.pool_type == "map":
      aux["pooled"] = self.MAPHead_0(x)
    elif self.pool_type == "tok":
      aux["pooled"] = x[:, 0]
    if self.variant.class_token:
      # LLaVA's "default" feature selection: the patches, without the class token.
      x = x[:, 1:]
    if self.head is not None:
      x = self.head(x)
    return x, aux
