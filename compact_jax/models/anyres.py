"""Dynamic high resolution: LLaVA-NeXT AnyRes and InternVL-1.5 tiling.

Einsum letters: B batch, T tile slots, G tile feature grid side, D width,
N image tokens.

Host side (numpy, for the data pipeline): pick a layout, cut a resized image
into tiles. Model side (jax, fixed shapes): put tile features back on one
grid, drop the padding that AnyRes added, bilinearly downsample features that
exceed a visual-token budget and insert row-separator tokens, all without a
data-dependent shape.

``Tiling`` (built from ``config.model.dynamic_res`` by :func:`tiling_from_config`)
is the one description both sides read: the pipeline asks it for an image's
layout and the number of tile slots, the model for its token count.

The image tokens of one example (:func:`arrange_tokens`) are, in order:

* the global view (``thumbnail``): G*G tokens from tile slot 0, an
  aspect-squashing resize of the whole image (LLaVA-NeXT's base image,
  InternVL's thumbnail). InternVL adds it only to images cut into more than
  one tile; with a single tile its tokens are invalid.
* the tile grid in raster order: ``rows*G x cols*G`` features (after AnyRes
  unpadding and the budget, ``h x w``), each row followed by a learnable
  separator token when ``newline`` is on. Grids are compacted to the front
  of a fixed ``num_grid_tokens(G)`` buffer (the largest any layout needs),
  the rest is invalid.

Invalid tokens are dropped from attention by the VLM's ``valid`` mask and
skipped by positions (which count valid tokens only), so the LLM computes
exactly what it would on the compact, variable-length sequence of the
reference implementations.

References: LLaVA-NeXT ``select_best_resolution`` / ``resize_and_pad_image`` /
``unpad_image``; LLaVA-OneVision's ``anyres_max`` feature interpolation;
InternVL-1.5 ``dynamic_preprocess`` / ``find_closest_aspect_ratio``;
InternLM-XComposer2-4KHD's learnable newline tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("anyres", "internvl")


def select_best_resolution(
  size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]
) -> tuple[int, int]:
  """LLaVA-NeXT: the (h, w) pinpoint that keeps the most image pixels after an
  aspect-preserving downscale, then wastes the fewest."""
  h, w = size
  best, best_key = None, None
  for ph, pw in pinpoints:
    scale = min(pw / w, ph / h)
    effective = min(int(w * scale) * int(h * scale), w * h)
    key = (effective, -(ph * pw - effective))
    if best_key is None or key > best_key:
      best, best_key = (ph, pw), key
  if best is None:
    raise ValueError("select_best_resolution: no pinpoints")
  return best


def anyres_layout(
  size: tuple[int, int], pinpoints: Sequence[tuple[int, int]], tile: int
) -> tuple[int, int]:
  """(rows, cols) of ``tile``-px tiles for the best pinpoint (each a multiple of ``tile``)."""
  ph, pw = select_best_resolution(size, pinpoints)
  if ph % tile or pw % tile:
    raise ValueError(f"pinpoint {(ph, pw)} is not a multiple of the tile size {tile}")
  return ph // tile, pw // tile


def internvl_ratios(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
  """InternVL-1.5's candidate (cols, rows) grids with min..max tiles, fewest tiles first."""
  return sorted(
    {
      (i, j)
      for n in range(min_tiles, max_tiles + 1)
      for i in range(1, n + 1)
      for j in range(1, n + 1)
      if min_tiles <= i * j <= max_tiles
    },
    key=lambda r: r[0] * r[1],
  )


def closest_aspect_ratio(
  size: tuple[int, int], min_tiles: int, max_tiles: int, tile: int
) -> tuple[int, int]:
  """InternVL-1.5: (rows, cols) with min..max tiles whose aspect is closest to the
  image's; on a tie the larger grid wins if the image has the pixels to fill it."""
  h, w = size
  aspect = w / h
  best, best_diff = (1, 1), float("inf")
  for cols, rows in internvl_ratios(min_tiles, max_tiles):  # InternVL's is (width, height)
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (rows, cols), diff
    elif diff == best_diff and w * h > 0.5 * tile * tile * cols * rows:
      best = (rows, cols)
  return best


def split_tiles(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """float[rows*S, cols*S, C] (already resized) -> float[rows*cols, S, S, C], row-major."""
  h, w, c = image.shape
  if h % rows or w % cols or h // rows != w // cols:
    raise ValueError(
      f"split_tiles: image {image.shape} is not a {rows}x{cols} grid of square tiles"
    )
  s = h // rows
  return image.reshape(rows, s, cols, s, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, s, s, c)


def merge_tiles(tiles: jax.Array, rows: int, cols: int) -> jax.Array:
  """float[B, rows*cols, G, G, D] tile features -> float[B, rows*G, cols*G, D] (inverse of
  ``split_tiles`` applied to the images, lifted to features)."""
  b, t, g, g2, d = tiles.shape
  if t != rows * cols or g != g2:
    raise ValueError(f"merge_tiles: {t} tiles of {g}x{g2} are not a {rows}x{cols} layout")
  x = tiles.reshape(b, rows, cols, g, g, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, rows * g, cols * g, d)


# --- integer layout arithmetic, shared by numpy (host) and jnp (inside jit) ---------------
# Exact integer forms of LLaVA-NeXT's float expressions, so the host's static
# token count and the model's traced shapes can never disagree by a rounding.


def unpad_box(gh, gw, h, w, xp=np):
  """(top, left, height, width) of the image inside a ``gh x gw`` feature grid that
  AnyRes letterboxed an ``h x w`` image into (LLaVA-NeXT ``unpad_image``: the padding
  is split evenly, the odd row or column going to the image). At least one row and
  column always remain. Works elementwise on ints or int arrays (``xp`` = np or jnp)."""
  # w / h > gw / gh, cross-multiplied: the image is wider than the grid.
  wide = w * gh > h * gw
  pad_h = xp.clip((gh - (h * gw) // xp.maximum(w, 1)) // 2, 0, (gh - 1) // 2)
  pad_w = xp.clip((gw - (w * gh) // xp.maximum(h, 1)) // 2, 0, (gw - 1) // 2)
  top = xp.where(wide, pad_h, 0)
  left = xp.where(wide, 0, pad_w)
  return top, left, gh - 2 * top, gw - 2 * left


def _floor_sqrt_ratio(num, den, xp):
  """The largest n with n * n * den <= num (num >= 0, den >= 1), in exact integers."""
  n = xp.floor(xp.sqrt(num / den)).astype(num.dtype)
  # float sqrt is off by at most one here; fix it with integer comparisons.
  n = xp.where(n * n * den > num, n - 1, n)
  return xp.where((n + 1) * (n + 1) * den <= num, n + 1, n)


def budget_shape(h, w, max_tokens: int, xp=np):
  """(h', w'): an ``h x w`` feature grid shrunk, aspect kept, to at most ``max_tokens``
  features when it has more (``max_tokens`` 0: never). h' = floor(h * s), w' =
  floor(w * s) with s = sqrt(max_tokens / (h * w)) (LLaVA-OneVision ``anyres_max``,
  which also tolerates 10% over; we do not), computed in exact integers."""
  if max_tokens <= 0:
    return h, w
  itype = xp.int32 if xp is jnp else np.int64
  h, w = xp.asarray(h, itype), xp.asarray(w, itype)
  over = h * w > max_tokens
  nh = xp.maximum(_floor_sqrt_ratio(max_tokens * h, w, xp), 1)
  nw = xp.maximum(_floor_sqrt_ratio(max_tokens * w, h, xp), 1)
  return xp.where(over, nh, h), xp.where(over, nw, w)


def unpad_mask(size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
  """bool[Hg, Wg]: True on feature cells that hold the image, False on the
  padding AnyRes added to keep the aspect (LLaVA-NeXT ``unpad_image``)."""
  h, w = size
  gh, gw = grid
  top, left, hu, wu = (int(v) for v in unpad_box(gh, gw, h, w))
  mask = np.zeros((gh, gw), bool)
  mask[top : top + hu, left : left + wu] = True
  return mask


def add_row_separators(grid: jax.Array, newline: jax.Array) -> jax.Array:
  """float[B, Hg, Wg, D] + a learnable float[D] -> float[B, Hg * (Wg + 1), D]: a
  separator token after every row (InternLM-XComposer2-4KHD, LLaVA-NeXT ``image_newline``)."""
  b, hg, _, d = grid.shape
  sep = jnp.broadcast_to(newline.astype(grid.dtype), (b, hg, 1, d))
  return jnp.concatenate([grid, sep], axis=2).reshape(b, -1, d)


def fit_token_budget(grid: jax.Array, max_tokens: int) -> jax.Array:
  """Bilinearly downsamples float[B, Hg, Wg, D] (keeping its aspect, ``budget_shape``)
  until Hg' * Wg' <= ``max_tokens``; unchanged if already within budget."""
  b, hg, wg, d = grid.shape
  if hg * wg <= max_tokens:
    return grid
  nh, nw = (int(v) for v in budget_shape(hg, wg, max_tokens))
  return jax.image.resize(grid, (b, nh, nw, d), method="bilinear", antialias=False)


# --- the configuration both sides share ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How images are tiled (``config.model.dynamic_res``; see configs/base.py).

  Attributes:
    mode: "anyres" (LLaVA-NeXT) or "internvl" (InternVL-1.5).
    tile_size: S, the tile side in pixels (``config.data.image_size``, the ViT input).
    pinpoints: anyres: the allowed (rows, cols) grids, in tiles.
    min_tiles, max_tiles: internvl: the allowed tile counts.
    thumbnail: add the global view (tile slot 0).
    newline: a learnable separator token after each row of the tile grid.
    max_visual_tokens: budget on the tile grid's features per image (0 = none).
  """

  mode: str
  tile_size: int
  pinpoints: tuple[tuple[int, int], ...] = ()
  min_tiles: int = 1
  max_tiles: int = 6
  thumbnail: bool = True
  newline: bool = False
  max_visual_tokens: int = 0

  def __post_init__(self):
    key = "model.dynamic_res"
    if self.mode not in MODES:
      raise ValueError(f"{key}.mode={self.mode!r}; choose '' (off) or one of {MODES}")
    if self.tile_size < 1:
      raise ValueError(f"data.image_size={self.tile_size} (the tile side) must be >= 1")
    if self.mode == "anyres":
      if not self.pinpoints:
        raise ValueError(f"{key}.pinpoints is empty; anyres needs at least one (rows, cols)")
      for p in self.pinpoints:
        if len(p) != 2 or min(p) < 1:
          raise ValueError(f"{key}.pinpoints has {p!r}; each must be (rows, cols) >= 1 tiles")
    if self.mode == "internvl" and not 1 <= self.min_tiles <= self.max_tiles:
      raise ValueError(
        f"{key}.min_tiles={self.min_tiles}, max_tiles={self.max_tiles}: need "
        "1 <= min_tiles <= max_tiles"
      )
    if self.max_visual_tokens < 0:
      raise ValueError(f"{key}.max_visual_tokens={self.max_visual_tokens} must be >= 0")

  @functools.cached_property
  def layouts(self) -> tuple[tuple[int, int], ...]:
    """Every (rows, cols) an image can be cut into."""
    if self.mode == "anyres":
      return tuple(dict.fromkeys(tuple(p) for p in self.pinpoints))
    return tuple((rows, cols) for cols, rows in internvl_ratios(self.min_tiles, self.max_tiles))

  @property
  def max_tiles_per_image(self) -> int:
    """T_max: tile slots after the global view."""
    return max(r * c for r, c in self.layouts)

  @property
  def num_slots(self) -> int:
    """Views the ViT encodes per example: the global view (if any) and T_max tiles."""
    return int(self.thumbnail) + self.max_tiles_per_image

  def layout(self, size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) for an image of ``size`` (h, w) pixels."""
    if self.mode == "anyres":
      s = self.tile_size
      rows, cols = anyres_layout(size, [(r * s, c * s) for r, c in self.layouts], s)
      return rows, cols
    return closest_aspect_ratio(size, self.min_tiles, self.max_tiles, self.tile_size)

  def grid_shapes(self, g: int) -> Iterator[tuple[int, int]]:
    """Every (h, w) tile-feature grid an example can have before the budget (a superset
    for AnyRes: unpadding can leave any width, or any height, of a layout's grid)."""
    for rows, cols in self.layouts:
      gh, gw = rows * g, cols * g
      if self.mode == "internvl":
        yield gh, gw
        continue
      yield from ((gh, w) for w in range(1, gw + 1))
      yield from ((h, gw) for h in range(1, gh))

  def num_grid_tokens(self, g: int) -> int:
    """Tokens of the fixed tile-grid buffer: the most any example needs."""
    best = 0
    for h, w in self.grid_shapes(g):
      nh, nw = (int(v) for v in budget_shape(h, w, self.max_visual_tokens))
      best = max(best, nh * (nw + int(self.newline)))
    return best

  def num_tokens(self, g: int) -> int:
    """N, image tokens per example for a G x G feature grid per tile."""
    return int(self.thumbnail) * g * g + self.num_grid_tokens(g)

  def blank_layout(self) -> np.ndarray:
    """int32[4] ``tile_layout`` of an example without an image (one tile; any value works,
    since the model drops all its image tokens)."""
    return np.asarray([1, 1, self.tile_size, self.tile_size], np.int32)


def tiling_from_config(dynamic_res: Mapping[str, Any] | None, *, image_size: int) -> Tiling | None:
  """The ``Tiling`` of ``config.model.dynamic_res`` with tiles of ``image_size`` px, or
  None when it is off (mode "") or absent (a model config saved before it existed)."""
  if dynamic_res is None or not dynamic_res["mode"]:
    return None
  return Tiling(
    mode=dynamic_res["mode"],
    tile_size=int(image_size),
    pinpoints=tuple(tuple(int(v) for v in p) for p in dynamic_res["pinpoints"]),
    min_tiles=int(dynamic_res["min_tiles"]),
    max_tiles=int(dynamic_res["max_tiles"]),
    thumbnail=bool(dynamic_res["thumbnail"]),
    newline=bool(dynamic_res["newline"]),
    max_visual_tokens=int(dynamic_res["max_visual_tokens"]),
  )


# --- model side: tile features -> image tokens (fixed shapes) -----------------------------


def arrange_tokens(
  views: jax.Array,
  tile_layout: jax.Array,
  tiling: Tiling,
  *,
  newline: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Image tokens of each example from its encoded views.

  Args:
    views: float[B, num_slots, G*G, D], the connector's output per view: the global
      view first (if ``tiling.thumbnail``), then the tiles in row-major order of the
      example's layout; unused slots hold anything.
    tile_layout: int32[B, 4], (rows, cols, image height, image width) per example.
    tiling: the tiling the views were cut with.
    newline: float[D], the separator token (needed iff ``tiling.newline``).

  Returns:
    (tokens float[B, N, D], valid bool[B, N]) with N = ``tiling.num_tokens(G)``;
    invalid tokens are zeros.
  """
  b, slots, gg, d = views.shape
  g = math.isqrt(gg)
  if g * g != gg or slots != tiling.num_slots:
    raise ValueError(
      f"arrange_tokens: views {views.shape} are not {tiling.num_slots} square feature grids"
    )
  if tile_layout.shape != (b, 4):
    raise ValueError(f"arrange_tokens: tile_layout has shape {tile_layout.shape}, want {(b, 4)}")
  if tiling.newline != (newline is not None):
    raise ValueError("arrange_tokens: pass a newline token iff tiling.newline")
  layout = tile_layout.astype(jnp.int32)
  rows, cols, img_h, img_w = (layout[:, i] for i in range(4))
  parts, valids = [], []
  if tiling.thumbnail:
    # InternVL adds its thumbnail only to images cut into several tiles.
    keep = rows * cols > 1 if tiling.mode == "internvl" else jnp.ones((b,), bool)
    parts.append(jnp.where(keep[:, None, None], views[:, 0], 0))
    valids.append(jnp.broadcast_to(keep[:, None], (b, gg)))
  tiles = views[:, int(tiling.thumbnail) :].reshape(b, -1, d)  # [B, T * G*G, D]

  gh, gw = rows * g, cols * g
  if tiling.mode == "anyres":
    top, left, hu, wu = unpad_box(gh, gw, img_h, img_w, jnp)
  else:
    top, left, hu, wu = jnp.zeros_like(gh), jnp.zeros_like(gw), gh, gw
  ho, wo = budget_shape(hu, wu, tiling.max_visual_tokens, jnp)
  nl = int(tiling.newline)
  n = tiling.num_grid_tokens(g)
  # Output token k of an example is (row r, column c) of its h' x (w' + nl) grid.
  k = jnp.arange(n)[None]
  r, c = k // (wo + nl)[:, None], k % (wo + nl)[:, None]
  valid = r < ho[:, None]
  is_feature = valid & (c < wo[:, None])

  def source(y, x):
    """Index into ``tiles`` of grid cell (top + y, left + x); clipped where invalid."""
    y = top[:, None] + jnp.clip(y, 0, hu[:, None] - 1)
    x = left[:, None] + jnp.clip(x, 0, wu[:, None] - 1)
    tile = jnp.clip((y // g) * cols[:, None] + x // g, 0, tiles.shape[1] // gg - 1)
    return tile * gg + (y % g) * g + x % g

  def gather(idx):
    return jnp.take_along_axis(tiles, idx[..., None], axis=1)

  if tiling.max_visual_tokens:
    # Bilinear resampling of the (unpadded) grid to h' x w' as jax.image.resize /
    # torch interpolate(align_corners=False) sample it: output cell i reads input
    # (i + 0.5) * in / out - 0.5. Within budget in == out and the weights are 0.
    def coords(i, size_in, size_out):
      f = (i + 0.5) * (size_in / size_out)[:, None] - 0.5
      f = jnp.clip(f, 0.0, (size_in - 1)[:, None].astype(f.dtype))
      i0 = jnp.floor(f).astype(jnp.int32)
      return i0, i0 + 1, (f - i0).astype(tiles.dtype)[..., None]

    y0, y1, wy = coords(r, hu, ho)
    x0, x1, wx = coords(c, wu, wo)
    feats = (1 - wy) * ((1 - wx) * gather(source(y0, x0)) + wx * gather(source(y0, x1))) + wy * (
      (1 - wx) * gather(source(y1, x0)) + wx * gather(source(y1, x1))
    )
  else:
    feats = gather(source(r, c))
  grid = jnp.where(is_feature[..., None], feats, 0)
  if newline is not None:
    is_sep = valid & (c == wo[:, None])
    grid = jnp.where(is_sep[..., None], newline.astype(grid.dtype), grid)
  parts.append(grid)
  valids.append(valid)
  return jnp.concatenate(parts, axis=1), jnp.concatenate(valids, axis=1)
