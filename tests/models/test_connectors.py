"""Connectors: pixel shuffle layout, the resampler, and the token/parameter table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compact_jax.models import connectors, vlm
from tests.models import tiny_models as tm

D_VIT, D_LLM, GRID = 32, 48, 4


def test_pixel_shuffle_groups_each_r_by_r_block_into_channels():
  # Token (y, x) of a 4x4 grid carries the value 10*y + x in its one channel.
  x = np.array([[10 * y + c for y in range(4) for c in range(4)]], np.float32)[..., None]
  got = np.asarray(connectors.pixel_shuffle(jnp.asarray(x), 4, 2))
  assert got.shape == (1, 4, 4)
  np.testing.assert_array_equal(got[0, 0], [0, 1, 10, 11])  # top-left 2x2 block
  np.testing.assert_array_equal(got[0, 1], [2, 3, 12, 13])
  np.testing.assert_array_equal(got[0, 3], [22, 23, 32, 33])
  with pytest.raises(ValueError, match="not a 3x3 grid divisible by 2"):
    connectors.pixel_shuffle(jnp.zeros((1, 9, 1)), 3, 2)


@pytest.mark.parametrize("name", sorted(connectors.CONNECTORS))
def test_token_and_parameter_counts_match_the_table(name):
  model = tm.abstract_vlm(connector=name)
  tokens, params = connectors.connector_table(D_VIT, tm.LLM.width, GRID // 2)[name]
  # tm's images are 16 px at patch 8: a 2x2 grid.
  assert model.num_image_tokens == tokens
  shapes = vlm.param_paths(nnx.state(model))
  prefix = "img/head/" if name == "linear" else "connector/"
  assert sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(prefix)) == params
  # The VLM's forward (abstractly evaluated: no compile) still yields text logits.
  b, t = 2, 5
  out = jax.eval_shape(
    lambda m: m(
      jnp.zeros((b, 16, 16, 3)),
      jnp.zeros((b, t), jnp.int32),
      jnp.ones((b, t), jnp.int32),
      jnp.ones((b, t), bool),
      jnp.ones((b,), bool),
    ),
    model,
  )
  assert out[0].shape == (b, t, tm.VOCAB)
  assert out[1]["img/zimg"].shape == (b, tokens, tm.LLM.width)


def test_documented_counts_for_so400m_at_448_into_gemma_2b():
  table = connectors.connector_table(1152, 2048, 32)  # 448 px / patch 14
  assert table["linear"] == (1024, 1152 * 2048 + 2048)
  assert table["mlp2x_gelu"][0] == 1024
  assert table["pixel_shuffle_mlp"][0] == 256  # InternVL-1.5's 4x cut
  assert table["resampler"][0] == 64
  # An odd grid (So400m/14 at 384 px is 27 x 27) cannot pixel-shuffle.
  assert "pixel_shuffle_mlp" not in connectors.connector_table(1152, 2048, 27)


def _resampler(pos2d: bool):
  r = nnx.eval_shape(
    lambda: connectors.Resampler(
      D_VIT, D_LLM, grid=GRID, num_queries=4, pos2d=pos2d, rngs=nnx.Rngs(0)
    )
  )
  flat = tm.random_flat_params(r, seed=4)
  for k in flat:  # LayerNorms as at init, so the positions are not scaled away
    if k.startswith("ln_"):
      flat[k][:] = 1.0 if k.endswith("scale") else 0.0
  vlm.load_flat_params(r, flat)
  return r


def test_resampler_without_positions_ignores_token_order_and_with_them_does_not():
  x = np.random.default_rng(5).standard_normal((1, GRID * GRID, D_VIT)).astype(np.float32)
  perm = np.random.default_rng(6).permutation(GRID * GRID)
  for pos2d in (False, True):
    r = _resampler(pos2d)
    a = np.asarray(tm.apply(r, jnp.asarray(x)))
    b = np.asarray(tm.apply(r, jnp.asarray(x[:, perm])))
    assert a.shape == (1, 4, D_LLM)
    if pos2d:
      assert np.abs(a - b).max() > 1e-3
    else:
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_sincos_2d_rows_and_columns_use_separate_halves():
  pe = connectors.sincos_2d(3, 8).reshape(3, 3, 8)
  np.testing.assert_array_equal(pe[:, 0, :4], pe[:, 2, :4])  # first half: row only
  np.testing.assert_array_equal(pe[0, :, 4:], pe[2, :, 4:])  # second half: column only
  np.testing.assert_allclose(pe[0, 0], [0, 0, 1, 1, 0, 0, 1, 1])
