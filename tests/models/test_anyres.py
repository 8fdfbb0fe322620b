"""AnyRes / InternVL tiling: layouts, tile round trips, unpadding, separators, the token
budget, token counts, and the fixed-shape token layout the model uses."""

from __future__ import annotations

import dataclasses
import functools

import jax
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


# --- the integer layout arithmetic ------------------------------------------------------


def test_unpad_box_matches_llava_next_where_floats_are_exact():
  """LLaVA-NeXT's unpad_image in floats, on sizes where its float division is exact:
  our integer form keeps the same rows and columns."""

  def llava(h, w, gh, gw):
    if w / h > gw / gh:
      new_h = int(h * (gw / w))
      pad = (gh - new_h) // 2
      return pad, 0, gh - 2 * pad, gw
    new_w = int(w * (gh / h))
    pad = (gw - new_w) // 2
    return 0, pad, gh, gw - 2 * pad

  for gh, gw in [(24, 48), (48, 24), (48, 48), (72, 24)]:
    for h, w in [(100, 200), (200, 100), (300, 1000), (1000, 300), (64, 64), (333, 500)]:
      got = tuple(int(v) for v in anyres.unpad_box(gh, gw, h, w))
      assert got == llava(h, w, gh, gw), (gh, gw, h, w)
  # The jnp form (inside the model) agrees with the numpy form elementwise.
  hs, ws = np.array([100, 200, 333, 1000]), np.array([200, 100, 500, 300])
  np.testing.assert_array_equal(
    np.stack(anyres.unpad_box(48, 24, hs, ws)),
    np.stack(anyres.unpad_box(jnp.int32(48), jnp.int32(24), jnp.asarray(hs), jnp.asarray(ws), jnp)),
  )


def test_budget_shape_is_the_exact_floor_and_fits_the_budget():
  for budget in (1, 6, 16, 100, 729):
    for h in range(1, 40):
      for w in range(1, 40):
        nh, nw = (int(v) for v in anyres.budget_shape(h, w, budget))
        if h * w <= budget:
          assert (nh, nw) == (h, w)
          continue
        # h' = floor(sqrt(budget * h / w)) exactly, likewise w'.
        assert nh * nh * w <= budget * h < (nh + 1) ** 2 * w or nh == 1
        assert nw * nw * h <= budget * w < (nw + 1) ** 2 * h or nw == 1
        assert nh * nw <= budget or 1 in (nh, nw)
  hs, ws = np.arange(1, 60), np.arange(59, 0, -1)
  want = np.stack(anyres.budget_shape(hs, ws, 50))
  got = np.stack(anyres.budget_shape(jnp.asarray(hs), jnp.asarray(ws), 50, jnp))
  np.testing.assert_array_equal(got, want)


# --- the configuration and its token counts --------------------------------------------

LLAVA_NEXT = anyres.Tiling("anyres", 336, pinpoints=((1, 2), (2, 1), (2, 2), (3, 1), (1, 3)))


def test_token_counts_of_published_configurations():
  # LLaVA-NeXT (CLIP-L/14 @ 336, 24 x 24 features per view, image_newline): the base
  # image's 576 plus the largest unpadded grid with separators, 2 x 2 tiles: 48 x (48 + 1).
  llava = dataclasses.replace(LLAVA_NEXT, newline=True)
  assert llava.num_slots == 5
  assert llava.num_tokens(24) == 576 + 48 * 49 == 2928
  # InternVL-1.5 (448 px tiles, pixel shuffle -> 16 x 16 tokens, 1..6 tiles + thumbnail):
  # 7 x 256 tokens at most.
  internvl = anyres.Tiling("internvl", 448, min_tiles=1, max_tiles=6)
  assert internvl.num_slots == 7
  assert internvl.num_tokens(16) == 7 * 256
  assert set(internvl.layouts) == {(r, c) for r in range(1, 7) for c in range(1, 7) if r * c <= 6}
  # A budget bounds every layout's grid: 1 x 6 tiles of 2 x 2 is 2 x 12 = 24 features,
  # over 8 -> floor(sqrt(8 * 2 / 12)) x floor(sqrt(8 * 12 / 2)) = 1 x 6; the square-ish
  # 2 x 3 -> 4 x 6 -> 2 x 3 = 6; the most is 6 x 1 -> 12 x 2 -> 6 x 1 (+ 6 separators).
  small = anyres.Tiling("internvl", 32, max_tiles=6, newline=True, max_visual_tokens=8)
  assert small.num_grid_tokens(2) == 6 * (1 + 1) == 12
  assert small.num_tokens(2) == 4 + 12


def test_bad_configurations_name_the_key():
  with pytest.raises(ValueError, match=r"model\.dynamic_res\.mode"):
    anyres.Tiling("tiles", 32)
  with pytest.raises(ValueError, match=r"model\.dynamic_res\.pinpoints"):
    anyres.Tiling("anyres", 32, pinpoints=())
  with pytest.raises(ValueError, match="min_tiles"):
    anyres.Tiling("internvl", 32, min_tiles=3, max_tiles=2)
  assert anyres.tiling_from_config(None, image_size=32) is None  # an old model config
  assert anyres.tiling_from_config({"mode": ""}, image_size=32) is None


# --- tile features -> image tokens ------------------------------------------------------


def _direct_tokens(views, layout, tiling, newline=None):
  """One example's valid image tokens built the direct way, float[n, D]: merge its
  tiles, cut out the unpadded box, fit the budget, add a separator after each row."""
  rows, cols, h, w = layout
  _, gg, d = views.shape
  g = int(gg**0.5)
  start = int(tiling.thumbnail)
  # merge_tiles only reshapes and transposes: numpy in, numpy out (fast here).
  tiles = views[start : start + rows * cols].reshape(1, rows * cols, g, g, d)
  grid = anyres.merge_tiles(tiles, rows, cols)
  if tiling.mode == "anyres":
    mask = anyres.unpad_mask((h, w), (rows * g, cols * g))
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    grid = grid[:, ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
  if tiling.max_visual_tokens:
    grid = np.asarray(anyres.fit_token_budget(jnp.asarray(grid), tiling.max_visual_tokens))
  if newline is not None:
    sep = np.broadcast_to(newline, (1, grid.shape[1], 1, d))
    grid = np.concatenate([grid, sep], axis=2)
  parts = [grid.reshape(-1, d)]
  if tiling.thumbnail and not (tiling.mode == "internvl" and rows * cols == 1):
    parts.insert(0, views[0])
  return np.concatenate(parts)


def _arrange(tiling):
  # Jitted: eagerly, each of its few dozen ops would compile on its own.
  return jax.jit(functools.partial(anyres.arrange_tokens, tiling=tiling))


TILINGS = {
  "anyres": dataclasses.replace(LLAVA_NEXT, tile_size=32),
  "anyres_newline_budget": dataclasses.replace(
    LLAVA_NEXT, tile_size=32, newline=True, max_visual_tokens=10
  ),
  "internvl": anyres.Tiling("internvl", 32, max_tiles=4),
  "internvl_newline_budget": anyres.Tiling(
    "internvl", 32, max_tiles=6, newline=True, max_visual_tokens=20, thumbnail=False
  ),
}


@pytest.mark.parametrize("name", sorted(TILINGS))
def test_arranged_tokens_are_the_direct_construction_in_fixed_shapes(name):
  tiling = TILINGS[name]
  g, d = 3, 2
  rng = np.random.default_rng(0)
  # Every layout, with wide, tall and square images (AnyRes unpads them differently).
  sizes = [(40, 200), (200, 40), (100, 100)]
  if tiling.mode == "anyres":  # unpadding depends on the image's aspect: try all three
    layouts = [(r, c, h, w) for r, c in tiling.layouts for h, w in sizes]
  else:
    layouts = [(r, c, *sizes[i % 3]) for i, (r, c) in enumerate(tiling.layouts)]
  views = rng.standard_normal((len(layouts), tiling.num_slots, g * g, d)).astype(np.float32)
  newline = np.array([7.0, -7.0], np.float32) if tiling.newline else None
  tokens, valid = _arrange(tiling)(
    jnp.asarray(views),
    jnp.asarray(layouts, jnp.int32),
    newline=None if newline is None else jnp.asarray(newline),
  )
  assert tokens.shape == (len(layouts), tiling.num_tokens(g), d)
  tokens, valid = np.asarray(tokens), np.asarray(valid)
  for i, layout in enumerate(layouts):
    want = _direct_tokens(views[i], layout, tiling, newline)
    got = tokens[i][valid[i]]
    assert got.shape == want.shape, layout
    if tiling.max_visual_tokens:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    else:
      np.testing.assert_array_equal(got, want)  # a pure gather: bit-exact
    assert not tokens[i][~valid[i]].any()  # unused positions are zeros


def test_unused_tile_slots_and_letterbox_do_not_reach_the_tokens():
  tiling = TILINGS["anyres"]
  g = 2
  views = np.zeros((1, tiling.num_slots, g * g, 1), np.float32)
  views[0, 1:3] = 1.0  # the 1 x 2 layout's tiles
  views[0, 3:] = 99.0  # slots the layout does not use
  # A square image letterboxed into 1 x 2 tiles: its 2 x 4 grid keeps columns 1..2.
  tokens, valid = _arrange(tiling)(jnp.asarray(views), jnp.asarray([[1, 2, 50, 50]], jnp.int32))
  tokens, valid = np.asarray(tokens[0, :, 0]), np.asarray(valid[0])
  assert valid[: g * g].all()  # the base image
  assert valid.sum() == g * g + 2 * 2
  np.testing.assert_array_equal(tokens[valid][g * g :], 1.0)
  assert 99.0 not in tokens


def test_budget_is_bilinear_resize_of_the_unpadded_grid():
  """Against jax.image.resize directly, and a hand-computed 2x downsample (which
  bilinear sampling at half-pixel centres makes a 2 x 2 mean)."""
  tiling = anyres.Tiling("internvl", 32, min_tiles=4, max_tiles=4, max_visual_tokens=4)
  g = 2  # 2 x 2 tiles of 2 x 2 features = a 4 x 4 grid, over the budget of 4
  grid = np.arange(16, dtype=np.float32).reshape(4, 4) ** 1.5  # not a linear ramp
  tiles = grid.reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(1, 4, 4, 1)
  views = np.concatenate([np.zeros((1, 1, 4, 1), np.float32), tiles], axis=1)
  tokens, valid = _arrange(tiling)(jnp.asarray(views), jnp.asarray([[2, 2, 64, 64]], jnp.int32))
  got = np.asarray(tokens[0, g * g :][np.asarray(valid[0, g * g :])]).reshape(2, 2)
  want = jax.image.resize(grid, (2, 2), method="bilinear", antialias=False)
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6)
  np.testing.assert_allclose(got, grid.reshape(2, 2, 2, 2).mean((1, 3)), rtol=1e-6)
