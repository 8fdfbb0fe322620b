"""AnyRes / InternVL tiling: layouts, tile round trips, unpadding, separators, the token budget."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from compact_jax.models import anyres

# LLaVA-NeXT's pinpoints at 336 px tiles, as (h, w).
PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


def test_anyres_picks_the_pinpoint_that_keeps_the_most_pixels():
  assert anyres.anyres_layout((300, 600), PINPOINTS, 336) == (1, 2)  # wide -> 1 x 2
  assert anyres.anyres_layout((900, 300), PINPOINTS, 336) == (3, 1)  # tall -> 3 x 1
  assert anyres.anyres_layout((800, 800), PINPOINTS, 336) == (2, 2)
  # A small image loses nothing anywhere: the least wasted area wins.
  assert anyres.select_best_resolution((100, 210), PINPOINTS) == (336, 672)


def test_internvl_matches_the_closest_aspect_ratio():
  assert anyres.closest_aspect_ratio((448, 896), 1, 6, 448) == (1, 2)
  assert anyres.closest_aspect_ratio((896, 448), 1, 6, 448) == (2, 1)
  # 3:2 landscape with up to 6 tiles -> 2 rows x 3 cols.
  assert anyres.closest_aspect_ratio((600, 900), 1, 6, 448) == (2, 3)
  # A square image big enough to fill 2x2 tiles takes them over 1x1 (tie on aspect).
  assert anyres.closest_aspect_ratio((1000, 1000), 1, 6, 448) == (2, 2)
  assert anyres.closest_aspect_ratio((200, 200), 1, 6, 448) == (1, 1)


@pytest.mark.parametrize("rows,cols", [(1, 2), (2, 3), (3, 1)])
def test_tiles_round_trip_through_features(rows, cols):
  """Encoding each tile as its own pixels (a 'ViT' with patch 1) and merging
  gives back the image: tiles and feature cells line up."""
  s = 4
  image = np.arange(rows * s * cols * s * 2, dtype=np.float32).reshape(rows * s, cols * s, 2)
  tiles = anyres.split_tiles(image, rows, cols)
  assert tiles.shape == (rows * cols, s, s, 2)
  np.testing.assert_array_equal(tiles[cols - 1], image[:s, (cols - 1) * s :])  # top-right tile
  merged = anyres.merge_tiles(jnp.asarray(tiles)[None], rows, cols)
  np.testing.assert_array_equal(np.asarray(merged[0]), image)


def test_unpad_mask_drops_the_letterbox():
  # A 1:2 image letterboxed into a 4x4 grid keeps the middle two rows.
  mask = anyres.unpad_mask((100, 200), (4, 4))
  np.testing.assert_array_equal(mask.sum(1), [0, 4, 4, 0])
  mask = anyres.unpad_mask((200, 100), (4, 4))
  np.testing.assert_array_equal(mask.sum(0), [0, 4, 4, 0])


def test_separators_and_budget_give_the_documented_token_counts():
  grid = jnp.ones((1, 4, 6, 3))
  out = anyres.add_row_separators(grid, jnp.full((3,), 7.0))
  assert out.shape == (1, 4 * 7, 3)
  np.testing.assert_array_equal(np.asarray(out[0, 6::7]), 7.0)  # one separator per row
  small = anyres.fit_token_budget(jnp.arange(4 * 6, dtype=jnp.float32).reshape(1, 4, 6, 1), 6)
  assert small.shape == (1, 2, 3, 1)  # 24 -> 6 tokens, aspect kept
  # A linear ramp stays a ramp under bilinear resampling.
  row = np.asarray(small[0, 0, :, 0])
  np.testing.assert_allclose(np.diff(row), np.diff(row)[0], atol=1e-5)
  assert anyres.fit_token_budget(grid, 24) is grid
