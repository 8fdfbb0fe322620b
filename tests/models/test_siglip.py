"""SigLIP ViT: variants, the patch embedding, feature-layer selection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compact_jax.models import siglip, vlm
from tests.models import tiny_models as tm


def test_decode_variant_follows_big_vision_and_the_patch_suffix():
  v = siglip.decode_variant("So400m/14")
  assert (v.width, v.depth, v.mlp_dim, v.num_heads, v.patch_size, v.head_dim) == (
    1152,
    27,
    4304,
    16,
    14,
    72,
  )
  assert siglip.decode_variant("B/16") == siglip.ViTVariant(768, 12, 3072, 12, 16)
  assert siglip.decode_variant("L/16") == siglip.ViTVariant(1024, 24, 4096, 16, 16)
  assert siglip.decode_variant("tiny/16") == siglip.ViTVariant(128, 4, 512, 4, 16)
  assert siglip.decode_variant("tiny/8").patch_size == 8
  assert siglip.decode_variant("smoke/16") == siglip.ViTVariant(32, 1, 64, 2, 16)
  for bad in ("huge/14", "B16", "B/", "So400m/14x"):
    with pytest.raises(ValueError, match="Unknown ViT variant"):
      siglip.decode_variant(bad)


def test_patch_embedding_is_a_stride_p_convolution():
  embed = nnx.eval_shape(lambda: siglip.PatchEmbedding(4, 5, dtype="float32", rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((4, 4, 3, 5)).astype(np.float32)
  bias = rng.standard_normal(5).astype(np.float32)
  embed.kernel.set_value(jnp.asarray(kernel))
  embed.bias.set_value(jnp.asarray(bias))
  image = rng.uniform(-1, 1, (2, 12, 8, 3)).astype(np.float32)
  conv = jax.lax.conv_general_dilated(
    image,
    kernel,
    window_strides=(4, 4),
    padding="VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  want = (np.asarray(conv) + bias).reshape(2, 3 * 2, 5)  # row-major patch order
  np.testing.assert_allclose(np.asarray(embed(jnp.asarray(image))), want, rtol=1e-5, atol=1e-5)


def vit_with_random_params(output_layer: int, seed: int = 0) -> tuple[siglip.ViT, dict]:
  vit = nnx.eval_shape(
    lambda: siglip.ViT(tm.VIT, image_size=16, output_layer=output_layer, rngs=nnx.Rngs(0))
  )
  flat = tm.random_flat_params(vit, seed)
  vlm.load_flat_params(vit, flat)
  return vit, flat


def test_penultimate_output_skips_the_last_block_and_encoder_norm():
  """LLaVA's -2: the output must not depend on the last block or on encoder_norm."""
  images = jnp.asarray(tm.random_images(2, 1))

  def features(output_layer, perturb):
    vit, flat = vit_with_random_params(output_layer)
    for key in flat:
      if key.startswith("Transformer/encoder_norm/") and "norm" in perturb:
        flat[key] = flat[key] + 1.0
      if key.startswith("Transformer/encoderblock/") and "last" in perturb:
        flat[key] = flat[key].copy()
        flat[key][-1] += 1.0
    vlm.load_flat_params(vit, flat)
    return np.asarray(tm.apply(vit, images)[0])

  base = features(-2, ())
  np.testing.assert_array_equal(features(-2, ("norm", "last")), base)
  last = features(-1, ())
  assert not np.allclose(features(-1, ("last",)), last)
  assert not np.allclose(features(-1, ("norm",)), last)


def test_bad_vit_configs_fail_clearly():
  with pytest.raises(ValueError, match=r"output_layer must be in \[-2, -1\]"):
    siglip.ViT(tm.VIT, image_size=16, output_layer=-3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"output_layer must be in \[-2, -1\]"):
    siglip.ViT(tm.VIT, image_size=16, output_layer=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="image_size 4 is smaller than the patch size 8"):
    siglip.ViT(tm.VIT, image_size=4, rngs=nnx.Rngs(0))


def test_a_size_off_the_patch_grid_drops_the_remainder_like_a_valid_conv():
  """So400m/14 at 384 px sees 27 x 27 patches: the last 6 pixel rows/columns are unused."""
  embed = nnx.eval_shape(lambda: siglip.PatchEmbedding(8, 4, dtype="float32", rngs=nnx.Rngs(0)))
  vlm.load_flat_params(embed, tm.random_flat_params(embed, seed=3))
  image = tm.random_images(1, seed=3, size=20)
  got = np.asarray(tm.apply(embed, jnp.asarray(image)))
  want = np.asarray(tm.apply(embed, jnp.asarray(image[:, :16, :16])))
  np.testing.assert_array_equal(got, want)
  assert siglip.ViT(tm.VIT, image_size=20, rngs=nnx.Rngs(0)).num_patches == 4


def test_resample_posemb_is_corner_aligned_bilinear():
  # A 2x2 grid of scalars [[0, 1], [2, 3]] -> 3x3: corners kept, midpoints averaged.
  grid = np.array([0.0, 1.0, 2.0, 3.0], np.float32).reshape(1, 4, 1)
  got = siglip.resample_posemb(grid, 3).reshape(3, 3)
  want = np.array([[0, 0.5, 1], [1, 1.5, 2], [2, 2.5, 3]], np.float32)
  np.testing.assert_allclose(got, want, atol=1e-6)
  rng = np.random.default_rng(0)
  pe = rng.standard_normal((1, 16, 5)).astype(np.float32)
  np.testing.assert_allclose(siglip.resample_posemb(pe, 4), pe, atol=1e-6)  # same grid: identity
  with pytest.raises(ValueError, match="not a square grid"):
    siglip.resample_posemb(np.zeros((1, 6, 2)), 3)


def test_released_towers_decode_with_their_token_counts():
  tokens = {}
  for name in siglip.RELEASES:
    v, size = siglip.decode_tower(name)
    tokens[name] = (size // v.patch_size) ** 2
  assert tokens == {
    "B/16@224": 196,
    "B/16@384": 576,
    "L/16@384": 576,
    "So400m/14@224": 256,
    "So400m/14@384": 729,
    "So400m/14@448": 1024,
  }
  with pytest.raises(ValueError, match="smaller than one patch"):
    siglip.decode_tower("So400m/14@10")
  with pytest.raises(ValueError, match="expected NAME/PATCH@SIZE"):
    siglip.decode_tower("So400m/14")
