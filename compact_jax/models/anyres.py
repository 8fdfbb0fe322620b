"""Dynamic high resolution: LLaVA-NeXT AnyRes and InternVL-1.5 tiling.

Einsum letters: B batch, T tiles, G tile grid side (patches), D width.

Host side (numpy, for the data pipeline): pick a layout, cut a resized image
into tiles. Model side (jax, fixed shapes): put tile features back on one
grid, mark the padding that AnyRes added (rather than dropping it, so shapes
stay static), insert row-separator tokens, and bilinearly downsample features
that exceed a visual-token budget.

References: LLaVA-NeXT ``select_best_resolution`` / ``unpad_image``;
InternVL-1.5 ``dynamic_preprocess`` / ``find_closest_aspect_ratio``;
InternLM-XComposer2-4KHD's learnable newline tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


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


def closest_aspect_ratio(
  size: tuple[int, int], min_tiles: int, max_tiles: int, tile: int
) -> tuple[int, int]:
  """InternVL-1.5: (rows, cols) with min..max tiles whose aspect is closest to the
  image's; on a tie the larger grid wins if the image has the pixels to fill it."""
  h, w = size
  aspect = w / h
  ratios = sorted(
    {
      (i, j)
      for n in range(min_tiles, max_tiles + 1)
      for i in range(1, n + 1)
      for j in range(1, n + 1)
      if min_tiles <= i * j <= max_tiles
    },
    key=lambda r: r[0] * r[1],
  )
  best, best_diff = (1, 1), float("inf")
  for cols, rows in ratios:  # InternVL's ratio is (width tiles, height tiles)
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


def unpad_mask(size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
  """bool[Hg, Wg]: True on feature cells that hold the image, False on the
  padding AnyRes added to keep the aspect (LLaVA-NeXT ``unpad_image``)."""
  h, w = size
  gh, gw = grid
  mask = np.ones((gh, gw), bool)
  if w / h > gw / gh:
    new_h = int(h * (gw / w))
    pad = (gh - new_h) // 2
    mask[:pad] = False
    mask[gh - pad :] = False
  else:
    new_w = int(w * (gh / h))
    pad = (gw - new_w) // 2
    mask[:, :pad] = False
    mask[:, gw - pad :] = False
  return mask


def add_row_separators(grid: jax.Array, newline: jax.Array) -> jax.Array:
  """float[B, Hg, Wg, D] + a learnable float[D] -> float[B, Hg * (Wg + 1), D]: a
  separator token after every row (InternLM-XComposer2-4KHD, LLaVA-NeXT ``image_newline``)."""
  b, hg, _, d = grid.shape
  sep = jnp.broadcast_to(newline.astype(grid.dtype), (b, hg, 1, d))
  return jnp.concatenate([grid, sep], axis=2).reshape(b, -1, d)


def fit_token_budget(grid: jax.Array, max_tokens: int) -> jax.Array:
  """Bilinearly downsamples float[B, Hg, Wg, D] (keeping its aspect) until
  Hg' * Wg' <= ``max_tokens``; unchanged if already within budget."""
  b, hg, wg, d = grid.shape
  if hg * wg <= max_tokens:
    return grid
  scale = math.sqrt(max_tokens / (hg * wg))
  nh, nw = max(1, int(hg * scale)), max(1, int(wg * scale))
  return jax.image.resize(grid, (b, nh, nw, d), method="bilinear", antialias=False)
