"""SigLIP's two-tower image-text model and its sigmoid contrastive loss.

Einsum letters: B batch (images = texts), L text length, D width, E embedding dim.

Used to pretrain the tiny world's vision tower on captions before VLM
alignment, which is how the real recipe starts from a pretrained SigLIP. The
names are big_vision's (``models/proj/image_text/two_towers.py`` and
``models/proj/image_text/text_transformer.py``): ``img/...`` (a ``siglip.ViT``
with the MAP head ``img/MAPHead_0``), an optional ``img_head`` (big_vision's
``img/head``; outside the ViT because our ViT's ``head`` maps tokens, not the pooled vector),
``txt/Embed_0/embedding``, ``txt/pos_embedding``, ``txt/Encoder_0/...``,
``txt/head/{kernel,bias}``, and the scalars ``t`` (log temperature) and ``b``
(bias). After pretraining, ``img/`` minus ``MAPHead_0``/``head`` is exactly
the VLM's ViT.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from compact_jax.models import compute_dtype, siglip
from compact_jax.sharding import param


class TextTower(nnx.Module):
  """A bidirectional transformer over tokens, pooled at the last position.

  Args:
    variant: a ``siglip`` variant string (the patch size is unused) or ``ViTVariant``.
    vocab_size: token table rows.
    max_len: L, the fixed (padded) text length.
    out_dim: E, the ``head`` output width.
  """

  def __init__(
    self,
    variant: str | siglip.ViTVariant,
    vocab_size: int,
    max_len: int,
    out_dim: int,
    *,
    scan_layers: bool = True,
    remat_policy: str = "none",
    dtype: str = "float32",
    rngs: nnx.Rngs,
  ):
    v = siglip.decode_variant(variant) if isinstance(variant, str) else variant
    emb = jax.random.normal(rngs.params(), (vocab_size, v.width)) / math.sqrt(v.width)
    self.Embed_0 = nnx.Module()
    self.Embed_0.embedding = param(emb, ("vocab", "embed"))
    pos = jax.random.normal(rngs.params(), (1, max_len, v.width)) / math.sqrt(v.width)
    self.pos_embedding = param(pos, (None, "position", "embed"))
    self.Encoder_0 = siglip.Encoder(
      v, scan_layers=scan_layers, remat_policy=remat_policy, dtype=dtype, rngs=rngs
    )
    self.head = siglip.Dense(v.width, out_dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.max_len = max_len
    self.dtype = compute_dtype(dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """int32[B, L] (EOS-terminated, padded so the last position pools) -> float[B, E]."""
    if tokens.shape[1] != self.max_len:
      raise ValueError(f"TextTower expects int32[B, {self.max_len}], got {tokens.shape}")
    x = jnp.take(self.Embed_0.embedding[...], tokens, axis=0).astype(self.dtype)
    x = self.Encoder_0(x + self.pos_embedding[...].astype(self.dtype))
    return self.head(x[:, -1])


class TwoTower(nnx.Module):
  """SigLIP: ``ViT(pool_type="map")`` + ``TextTower``, embeddings l2-normalised.

  Args:
    vit_variant, image_size: the image tower (see ``siglip.ViT``).
    txt_variant, vocab_size, max_len: the text tower.
    embed_dim: E; the image tower gets an ``img/head`` only if E != its width.
  """

  def __init__(
    self,
    vit_variant: str | siglip.ViTVariant,
    txt_variant: str | siglip.ViTVariant,
    *,
    image_size: int,
    vocab_size: int,
    max_len: int,
    embed_dim: int,
    scan_layers: bool = True,
    dtype: str = "float32",
    rngs: nnx.Rngs,
  ):
    vv = siglip.decode_variant(vit_variant) if isinstance(vit_variant, str) else vit_variant
    head = None
    if embed_dim != vv.width:
      head = siglip.Dense(vv.width, embed_dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.img = siglip.ViT(
      vv, image_size=image_size, pool_type="map", scan_layers=scan_layers, dtype=dtype, rngs=rngs
    )
    self.img_head = head
    self.txt = TextTower(
      txt_variant, vocab_size, max_len, embed_dim, scan_layers=scan_layers, dtype=dtype, rngs=rngs
    )
    # big_vision's SigLIP init: t = log(10), b = -10 (the paper's Sec. 3.2).
    self.t = param(jnp.full((1,), math.log(10.0), jnp.float32), (None,))
    self.b = param(jnp.full((1,), -10.0, jnp.float32), (None,))

  def __call__(self, image: jax.Array, tokens: jax.Array) -> tuple[jax.Array, dict]:
    """float32[B, H, W, 3], int32[B, L] -> (logits float32[B, B], aux {"zimg", "ztxt"}).

    ``logits[i, j]`` scores image i against text j: ``exp(t) zimg_i . ztxt_j + b``.
    """
    _, aux = self.img(image)
    zimg = aux["pooled"]
    if self.img_head is not None:
      zimg = self.img_head(zimg)
    ztxt = self.txt(tokens)
    zimg = _l2_normalize(zimg.astype(jnp.float32))
    ztxt = _l2_normalize(ztxt.astype(jnp.float32))
    logits = jnp.einsum("BE,CE->BC", zimg, ztxt) * jnp.exp(self.t[0]) + self.b[0]
    return logits, {"zimg": zimg, "ztxt": ztxt}


def _l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def sigmoid_loss(logits: jax.Array) -> jax.Array:
  """SigLIP's loss (Zhai et al. 2023, Alg. 1): every (image, text) pair is a
  binary problem, positive on the diagonal.

  Args:
    logits: float32[B, B] from ``TwoTower``.

  Returns:
    float32 scalar: ``-sum(log_sigmoid(labels * logits)) / B`` with labels
    +1 on the diagonal and -1 elsewhere.
  """
  n = logits.shape[0]
  labels = 2.0 * jnp.eye(n) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n
