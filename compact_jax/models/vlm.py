"""The VLM: SigLIP ViT -> connector -> Gemma decoder, as a prefix-LM (PaliGemma-style).

Einsum letters: B batch, N image tokens, T text len, S full sequence len
(N + T), D model dim, V vocab, L layers.

The LLM reads ``[N image tokens ; T text tokens]``. Image tokens are valid iff
``has_image`` (a text-only example drops its image prefix from attention, so
its pixels cannot matter). Attention follows big_vision's ``make_attn_mask``
over ``mask_ar``: mask_ar = 0 tokens form a fully connected prefix with the
image, mask_ar = 1 tokens are causal. Positions count valid tokens only.

Packed rows (``VLM.forward_packed``, on when ``data.pack_length`` > 0) hold
several examples with their image tokens already expanded in place; P is the
packed row length, M the image slots per row. ``segment_ids`` keep an
example's tokens attending only among themselves, positions restart at 0 with
each example, and the ViT's output for each image slot is gathered into the
row where ``image_index`` says. Each example then computes what it would
alone in an unpacked row (tests/train/test_packing.py).

Dynamic resolution (``tiling``, from ``config.model.dynamic_res``; see
models/anyres.py): ``image`` is float32[B, V, S, S, 3], a global view and tiles,
with ``tile_layout`` int32[B, 4]. The ViT and connector run on all B * V views;
``anyres.arrange_tokens`` lays the features out as N fixed image tokens and
marks the ones outside the example's layout, AnyRes padding and budget invalid;
they join ``has_image`` in the ``valid`` mask, so they never reach a text token.

Parameter paths ('/'-joined ``nnx.state`` paths, big_vision names):
``img/...`` (ViT; the linear connector is ``img/head``), ``connector/...``
(the mlp2x_gelu connector), ``llm/...`` (decoder), ``image_newline`` (the
tile-row separator with ``dynamic_res.newline``; LLaVA-NeXT's name).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compact_jax.models import anyres, connectors, llm, siglip
from compact_jax.sharding import constrain, param


def make_attn_mask(
  input_mask: jax.Array, mask_ar: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
  """big_vision's prefix-LM / causal attention mask, optionally per packed segment.

  Token i attends to token j iff both are valid and
  ``cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]``. So a run of mask_ar = 0
  tokens at the start is a full-attention prefix, and each mask_ar = 1 token
  starts a new causal step. As in big_vision, a padding token's row is all
  False too (its output is never read). With ``segment_ids`` i and j must also
  share a segment; the cumsum rule then acts within each segment as it would
  in a row of its own (the earlier segments only add a constant to both sides).

  Args:
    input_mask: bool[B, S], False on padding.
    mask_ar: int32[B, S] (or bool).
    segment_ids: int32[B, S] or None; packed examples are 1, 2, ..., padding 0.

  Returns:
    bool[B, S, S], indexed [batch, query, key].
  """
  cumsum = jnp.cumsum(mask_ar.astype(jnp.int32), axis=1)
  causal = cumsum[:, None, :] <= cumsum[:, :, None]
  valid = input_mask[:, None, :] & input_mask[:, :, None]
  mask = causal & valid
  if segment_ids is not None:
    mask &= segment_ids[:, None, :] == segment_ids[:, :, None]
  return mask


class VLM(nnx.Module):
  """ViT + connector + decoder.

  Args:
    vit_variant: ``siglip.VARIANTS`` string ("tiny/16", "So400m/14") or a ``ViTVariant``.
    connector: a ``connectors.CONNECTORS`` key ("linear", "mlp2x_gelu",
      "pixel_shuffle_mlp", "resampler", "resampler_nopos").
    llm_variant: ``llm.VARIANTS`` key ("tiny", "gemma_2b") or an ``LLMVariant``.
    vocab_size: the tokenizer's vocabulary size.
    vit_output_layer: -1 (after encoder_norm) or -n (raw output n-1 blocks from
      the end, LLaVA uses -2); see ``siglip.Encoder``.
    image_size: input side in pixels.
    scan_layers: scan both towers' layers (params stacked on a "layers" axis).
    remat_policy: a ``compact_jax.models.REMAT_POLICIES`` key, for both towers.
    dtype: compute dtype name ("float32", "bfloat16"); params stay float32.
    causal_image: image tokens attend causally among themselves (LLaVA, whose
      LM is a plain causal decoder) instead of as a full-attention prefix
      (PaliGemma).
    tiling: dynamic resolution (AnyRes / InternVL tiles of ``image_size`` px);
      None = one ``image_size`` image per example.
    rngs: init randomness.
  """

  def __init__(
    self,
    vit_variant: str | siglip.ViTVariant,
    connector: str,
    llm_variant: str | llm.LLMVariant,
    vocab_size: int,
    *,
    vit_output_layer: int = -1,
    image_size: int,
    scan_layers: bool = True,
    remat_policy: str = "none",
    dtype: str = "float32",
    causal_image: bool = False,
    tiling: anyres.Tiling | None = None,
    rngs: nnx.Rngs,
  ):
    vit_v = siglip.decode_variant(vit_variant) if isinstance(vit_variant, str) else vit_variant
    llm_v = llm.decode_variant(llm_variant) if isinstance(llm_variant, str) else llm_variant
    spec = connectors.get_connector(connector)
    grid = image_size // vit_v.patch_size
    proj = spec.make(vit_v.width, llm_v.width, grid=grid, dtype=dtype, rngs=rngs)
    common = dict(scan_layers=scan_layers, remat_policy=remat_policy, dtype=dtype, rngs=rngs)
    self.img = siglip.ViT(
      vit_v,
      image_size=image_size,
      output_layer=vit_output_layer,
      head=proj if spec.inside_vit else None,
      **common,
    )
    self.connector = None if spec.inside_vit else proj
    self.llm = llm.Decoder(llm_v, vocab_size, **common)
    self.causal_image = causal_image
    # Partial LoRA (InternLM-XComposer2): LLM adapters only at image tokens.
    self.partial_lora = False
    self._num_image_tokens = spec.num_tokens(grid)
    self.tiling = tiling
    if tiling is not None:
      if tiling.tile_size != image_size:
        raise ValueError(
          f"VLM: tiles of {tiling.tile_size} px but image_size={image_size}; the tile is "
          "the ViT input (data.image_size)"
        )
      side = math.isqrt(self._num_image_tokens)
      if connector.startswith("resampler") or side * side != self._num_image_tokens:
        raise ValueError(
          f"model.dynamic_res needs a connector whose tokens form the patch grid (linear, "
          f"mlp2x_gelu, pixel_shuffle_mlp); model.connector={connector!r} has "
          f"{self._num_image_tokens} unordered tokens"
        )
      self._num_image_tokens = tiling.num_tokens(side)
      if tiling.newline:
        # LLaVA-NeXT's init: randn / sqrt(width), the scale of the image features.
        d = llm_v.width
        self.image_newline = param(
          jax.random.normal(rngs.params(), (d,)) / math.sqrt(d), ("embed",)
        )

  @classmethod
  def from_config(
    cls, model_config: Any, *, vocab_size: int, image_size: int, rngs: nnx.Rngs
  ) -> VLM:
    """Builds the model from ``config.model`` (see configs/base.py)."""
    c = model_config
    return cls(
      c.vit_variant,
      c.connector,
      c.llm_variant,
      vocab_size,
      vit_output_layer=c.vit_output_layer,
      image_size=image_size,
      scan_layers=c.scan_layers,
      remat_policy=c.remat_policy,
      dtype=c.dtype,
      # Checkpoints saved before the key existed restore a model config without it.
      causal_image=c.get("causal_image", False),
      tiling=anyres.tiling_from_config(c.get("dynamic_res"), image_size=image_size),
      rngs=rngs,
    )

  @property
  def num_image_tokens(self) -> int:
    """Image tokens the LLM sees (after the connector: pixel shuffle and the
    resampler change the patch count; with ``tiling``, ``Tiling.num_tokens``)."""
    return self._num_image_tokens

  def _embed_image(
    self, image: jax.Array, tile_layout: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array | None, dict[str, jax.Array]]:
    """(tokens float[B, N, D_llm], valid bool[B, N] or None = all, aux)."""
    if self.tiling is None:
      if tile_layout is not None:
        raise ValueError("VLM: got a tile_layout, but the model has no model.dynamic_res")
      z, img_aux = self.img(image)
      valid = None
    else:
      slots = self.tiling.num_slots
      if image.ndim != 5 or image.shape[1] != slots:
        raise ValueError(
          f"VLM: model.dynamic_res.mode={self.tiling.mode!r} expects image "
          f"float32[B, {slots}, S, S, 3] (global view + tiles), got shape {image.shape}"
        )
      if tile_layout is None or tile_layout.shape != (image.shape[0], 4):
        got = None if tile_layout is None else tile_layout.shape
        raise ValueError(
          f"VLM: model.dynamic_res.mode={self.tiling.mode!r} needs tile_layout int32[B, 4] "
          f"(rows, cols, height, width; data/image.py tile_views), got {got}"
        )
      b = image.shape[0]
      z, img_aux = self.img(image.reshape(b * slots, *image.shape[2:]))
    if self.connector is not None:
      z = self.connector(z)
    aux = {f"img/{k}": val for k, val in img_aux.items()}
    if self.tiling is not None:
      z, valid = anyres.arrange_tokens(
        z.reshape(b, slots, *z.shape[1:]),
        tile_layout,
        self.tiling,
        newline=self.image_newline[...] if self.tiling.newline else None,
      )
      aux["img/valid"] = valid
    aux["img/zimg"] = z
    return z, valid, aux

  def embed_image(self, image: jax.Array, tile_layout: jax.Array | None = None) -> jax.Array:
    """float32[B, H, W, 3] in [-1, 1] -> float[B, N, D_llm] image tokens for the LLM.
    With ``tiling``: image float32[B, V, S, S, 3] and ``tile_layout`` int32[B, 4]."""
    return self._embed_image(image, tile_layout)[0]

  def lora_mask(self, batch: int, num_image: int, num_text: int) -> jax.Array | None:
    """bool[B, N + T], True at image tokens, when ``partial_lora``; else None."""
    if not self.partial_lora:
      return None
    row = jnp.arange(num_image + num_text) < num_image
    return jnp.broadcast_to(row, (batch, num_image + num_text))

  def full_mask_ar(self, num_image: int, mask_ar: jax.Array) -> jax.Array:
    """int32[B, N + T]: ``mask_ar`` int32[B, T] of the text behind the image tokens' own."""
    b = mask_ar.shape[0]
    img_ar = jnp.full((b, num_image), int(self.causal_image), jnp.int32)
    return jnp.concatenate([img_ar, mask_ar.astype(jnp.int32)], axis=1)

  def embed_prefix(
    self,
    image: jax.Array,
    tokens: jax.Array,
    mask_input: jax.Array,
    has_image: jax.Array,
    tile_layout: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Embeds ``[image tokens ; text tokens]`` and marks which are valid.

    Args:
      image: float32[B, H, W, 3] (with ``tiling``: float32[B, V, S, S, 3]).
      tokens: int32[B, T].
      mask_input: bool[B, T], False on padding.
      has_image: bool[B]; False makes all N image tokens invalid.
      tile_layout: int32[B, 4], with ``tiling`` only.

    Returns:
      (x float[B, N + T, D], valid bool[B, N + T], aux).
    """
    zimg, tile_valid, aux = self._embed_image(image, tile_layout)
    ztxt = self.llm.embed(tokens)
    x = jnp.concatenate([zimg.astype(ztxt.dtype), ztxt], axis=1)
    img_valid = jnp.broadcast_to(has_image.astype(bool)[:, None], zimg.shape[:2])
    if tile_valid is not None:
      img_valid = img_valid & tile_valid
    valid = jnp.concatenate([img_valid, mask_input.astype(bool)], axis=1)
    return constrain(x, llm.ACT), valid, aux

  def __call__(
    self,
    image: jax.Array,
    tokens: jax.Array,
    mask_ar: jax.Array,
    mask_input: jax.Array,
    has_image: jax.Array,
    *,
    tile_layout: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training forward pass.

    Args:
      image: float32[B, H, W, 3] in SigLIP's [-1, 1] range (with ``tiling``:
        float32[B, V, S, S, 3], the global view and tiles).
      tokens: int32[B, T] text tokens.
      mask_ar: int32[B, T]; 0 = prefix (full attention with the image), 1 = causal.
      mask_input: bool[B, T], False on padding.
      has_image: bool[B].
      tile_layout: int32[B, 4] (rows, cols, image height, image width), with
        ``tiling`` only.
      dropout_rng: the LLM's LoRA dropout key in training (``llm.LLM``); None
        (eval) applies no dropout.

    Returns:
      (logits float32[B, T, V], aux). The logit at text position t predicts
      token t + 1. aux: "img/stem", "img/encoded", "img/zimg" float[B, N, D_llm],
      "llm/pre_logits" float[B, T, D_llm] (text positions); with ``tiling`` also
      "img/valid" bool[B, N].
    """
    b, t = tokens.shape
    for name, arr in (("mask_ar", mask_ar), ("mask_input", mask_input)):
      if arr.shape != (b, t):
        raise ValueError(f"VLM: {name} has shape {arr.shape}, expected tokens' shape {(b, t)}")
    if has_image.shape != (b,):
      raise ValueError(f"VLM: has_image has shape {has_image.shape}, expected {(b,)}")
    x, valid, aux = self.embed_prefix(image, tokens, mask_input, has_image, tile_layout)
    n = x.shape[1] - t
    full_ar = self.full_mask_ar(n, mask_ar)
    positions = jnp.cumsum(valid, axis=1) - 1
    logits, llm_aux = self.llm(
      x,
      positions,
      make_attn_mask(valid, full_ar),
      lora_mask=self.lora_mask(b, n, t),
      dropout_rng=dropout_rng,
    )
    aux["llm/pre_logits"] = llm_aux["pre_logits"][:, n:]
    return logits[:, n:], aux

  def forward_packed(
    self,
    image: jax.Array,
    tokens: jax.Array,
    mask_ar: jax.Array,
    mask_input: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    image_index: jax.Array,
    *,
    dropout_rng: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training forward pass over packed rows (``data.pipeline.pack_rows``).

    P is the packed row length (image tokens included), M the image slots per row.

    Args:
      image: float32[B, M, H, W, 3] in [-1, 1]; empty slots are zeros (the
        batch's ``has_image`` bool[B, M] marks the filled ones; the model needs
        only ``image_index``).
      tokens: int32[B, P]; any value at image positions (their embedding is replaced).
      mask_ar: int32[B, P] as for ``__call__``; image positions take ``causal_image``.
      mask_input: bool[B, P], False on padding only (image tokens are valid).
      segment_ids: int32[B, P], 1, 2, ... per example, 0 on padding.
      positions: int32[B, P], restarting at 0 with each example.
      image_index: int32[B, P], ``slot * N + k`` at the row's k-th token of image
        slot ``slot``, -1 elsewhere.
      dropout_rng: as for ``__call__``.

    Returns:
      (logits float32[B, P, V], aux). The logit at position p predicts token
      p + 1; across a segment boundary that prediction is meaningless and the
      pipeline gives it no loss weight. aux: "img/..." of the ViT over all B * M
      slots, "llm/pre_logits" float[B, P, D_llm].
    """
    if self.tiling is not None:
      raise ValueError(
        "VLM.forward_packed: packing (data.pack_length > 0) does not support "
        f"model.dynamic_res.mode={self.tiling.mode!r} yet"
      )
    if image.ndim != 5:
      raise ValueError(
        f"VLM.forward_packed: image has shape {image.shape}, expected [B, M, H, W, 3]"
      )
    b, m = image.shape[:2]
    p = tokens.shape[1]
    for name, arr in (
      ("mask_ar", mask_ar),
      ("mask_input", mask_input),
      ("segment_ids", segment_ids),
      ("positions", positions),
      ("image_index", image_index),
    ):
      if arr.shape != (b, p):
        raise ValueError(f"VLM.forward_packed: {name} has shape {arr.shape}, expected {(b, p)}")
    # Empty slots run through the ViT too (fixed shapes); no token gathers them,
    # so they get no gradient and change no output.
    zimg, _, aux = self._embed_image(image.reshape(b * m, *image.shape[2:]))
    n = zimg.shape[1]
    zimg = zimg.reshape(b, m * n, zimg.shape[-1])
    ztxt = self.llm.embed(tokens)
    is_image = image_index >= 0
    # A per-row gather keeps each row's image tokens on the row's own device.
    gathered = jnp.take_along_axis(zimg, jnp.maximum(image_index, 0)[..., None], axis=1)
    x = jnp.where(is_image[..., None], gathered.astype(ztxt.dtype), ztxt)
    full_ar = jnp.where(is_image, int(self.causal_image), mask_ar.astype(jnp.int32))
    attn_mask = make_attn_mask(mask_input.astype(bool), full_ar, segment_ids)
    logits, llm_aux = self.llm(
      constrain(x, llm.ACT),
      positions,
      attn_mask,
      lora_mask=is_image if self.partial_lora else None,
      dropout_rng=dropout_rng,
    )
    aux["llm/pre_logits"] = llm_aux["pre_logits"]
    return logits, aux


# --- flat '/'-joined parameter views ---------------------------------------------------


def flat_params(state: nnx.State) -> dict[str, jax.Array]:
  """'/'-joined path -> value for every variable in ``state`` (e.g. ``nnx.state(model)``)."""
  return {"/".join(str(p) for p in path): var.get_value() for path, var in nnx.to_flat_state(state)}


def param_paths(state: nnx.State) -> dict[str, tuple[int, ...]]:
  """'/'-joined path -> shape, e.g. ``{"llm/final_norm/scale": (192,), ...}``."""
  return {k: tuple(np.shape(v)) for k, v in flat_params(state).items()}


def param_logical_axes(state: nnx.State) -> dict[str, tuple[str | None, ...]]:
  """'/'-joined path -> logical axis names (the ``out_sharding`` metadata)."""
  return {
    "/".join(str(p) for p in path): tuple(var.get_metadata().get("out_sharding") or ())
    for path, var in nnx.to_flat_state(state)
  }


def load_flat_params(model: nnx.Module, flat: Mapping[str, Any]) -> None:
  """Sets ``model``'s params from a '/'-joined dict; keys and shapes must match exactly."""
  state = nnx.state(model)
  have = param_paths(state)
  missing = sorted(set(have) - set(flat))
  extra = sorted(set(flat) - set(have))
  if missing or extra:
    raise KeyError(f"load_flat_params: missing keys {missing[:8]}, unexpected keys {extra[:8]}")
  for path, var in nnx.to_flat_state(state):
    key = "/".join(str(p) for p in path)
    value = jnp.asarray(flat[key])
    if value.shape != have[key]:
      raise ValueError(
        f"load_flat_params: {key} has shape {value.shape}, model expects {have[key]}"
      )
    var.set_value(value.astype(var.get_value().dtype))
  nnx.update(model, state)


# Scanned layer containers and their per-layer spelling (big_vision's
# scan_to_pyloop): img/Transformer/encoderblock/... <-> .../encoderblock_{i}/...
_STACKED = re.compile(r"^(.*?(?:^|/)(?:encoderblock|layers))/(.+)$")
_PER_LAYER = re.compile(r"^(.*?(?:^|/)(?:encoderblock|layers))_(\d+)/(.+)$")


def scanned_to_per_layer(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Splits stacked ``encoderblock/``/``layers/`` params into ``encoderblock_{i}/``/``layers_{i}/``."""
  out: dict[str, Any] = {}
  for key, value in flat.items():
    m = _STACKED.match(key)
    if not m:
      out[key] = value
      continue
    for i in range(np.shape(value)[0]):
      out[f"{m.group(1)}_{i}/{m.group(2)}"] = value[i]
  return out


def per_layer_to_scanned(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Stacks ``encoderblock_{i}/``/``layers_{i}/`` params on a new leading axis (inverse of above)."""
  out: dict[str, Any] = {}
  groups: dict[str, dict[int, Any]] = {}
  for key, value in flat.items():
    m = _PER_LAYER.match(key)
    if not m:
      out[key] = value
      continue
    groups.setdefault(f"{m.group(1)}/{m.group(3)}", {})[int(m.group(2))] = value
  for key, layers in groups.items():
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(
        f"per_layer_to_scanned: {key} has layer indices {sorted(layers)}, not 0..{len(layers) - 1}"
      )
    out[key] = jnp.stack([jnp.asarray(layers[i]) for i in range(len(layers))])
  return out
