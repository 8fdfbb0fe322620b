"""CLIP as a variant family of the ViT: decoding, parameter names, token counts.

Numerical parity with HF ``CLIPVisionModel`` is in tests/checkpoints/test_hf_clip.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compact_jax.models import siglip, vlm
from tests.models import tiny_models as tm


def test_clip_variants_decode_with_the_clip_knobs():
  v = siglip.decode_variant("clip-L/14")
  assert (v.width, v.depth, v.mlp_dim, v.num_heads, v.patch_size) == (1024, 24, 4096, 16, 14)
  assert (v.class_token, v.pre_norm, v.patch_bias, v.mlp_act, v.norm_eps) == (
    True,
    True,
    False,
    "quick_gelu",
    1e-5,
  )
  assert v.family == "clip"
  # OpenAI CLIP's preprocessing statistics (HF CLIPImageProcessor image_mean/image_std).
  assert v.pixel_norm == (
    (0.48145466, 0.4578275, 0.40821073),
    (0.26862954, 0.26130258, 0.27577711),
  )
  # No prefix (or "siglip-") is SigLIP, unchanged.
  assert siglip.decode_variant("siglip-L/16") == siglip.decode_variant("L/16")
  assert siglip.decode_variant("L/16").family == "siglip"
  assert siglip.decode_variant("clip-smoke/16") == siglip.ViTVariant(
    32, 1, 64, 2, 16, **siglip.CLIP
  )
  for bad in ("openclip-L/14", "clip-huge/14", "clip-L14", "CLIP-L/14"):
    with pytest.raises(ValueError, match="Unknown ViT variant"):
      siglip.decode_variant(bad)
  with pytest.raises(ValueError, match="mlp_act 'relu' unknown"):
    siglip.ViTVariant(32, 1, 64, 2, 8, mlp_act="relu")


def test_clip_releases_have_llavas_token_counts():
  tokens = {}
  for name, (variant, size, _) in siglip.CLIP_RELEASES.items():
    v, px = siglip.decode_tower(name)
    assert (v, px) == (siglip.decode_variant(variant), size)
    tokens[name] = (px // v.patch_size) ** 2
  assert tokens == {"clip-B/16@224": 196, "clip-L/14@224": 256, "clip-L/14@336": 576}


def test_quick_gelu_is_x_sigmoid_1702x():
  x = np.linspace(-4, 4, 9).astype(np.float32)
  want = x / (1 + np.exp(-1.702 * x))
  got = siglip.ACTIVATIONS["quick_gelu"](jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


CLIP_TINY = siglip.ViTVariant(32, 2, 64, 2, 8, **siglip.CLIP)


def test_clip_params_add_cls_and_pre_norm_and_drop_the_patch_bias():
  """Every SigLIP name is kept; CLIP adds cls/pre_norm and a class position."""

  def paths(v):
    vit = nnx.eval_shape(lambda: siglip.ViT(v, image_size=16, rngs=nnx.Rngs(0)))
    return vlm.param_paths(nnx.state(vit))

  clip, sig = paths(CLIP_TINY), paths(tm.VIT)
  assert set(clip) - set(sig) == {"cls", "pre_norm/scale", "pre_norm/bias"}
  assert set(sig) - set(clip) == {"embedding/bias"}
  assert clip["cls"] == (1, 1, 32)
  assert clip["pos_embedding"] == (1, 1 + 4, 32) and sig["pos_embedding"] == (1, 4, 32)


def test_clip_tower_outputs_patches_only_and_pools_the_class_token():
  vit = nnx.eval_shape(
    lambda: siglip.ViT(CLIP_TINY, image_size=16, pool_type="tok", rngs=nnx.Rngs(0))
  )
  vlm.load_flat_params(vit, tm.random_flat_params(vit, seed=1))
  out, aux = tm.apply(vit, jnp.asarray(tm.random_images(2, seed=1)))
  assert out.shape == (2, 4, 32) and aux["encoded"].shape == (2, 5, 32)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(aux["encoded"][:, 1:]))
  np.testing.assert_array_equal(np.asarray(aux["pooled"]), np.asarray(aux["encoded"][:, 0]))
  # The class token attends to every patch: changing one patch changes the pooled vector.
  image = tm.random_images(2, seed=1)
  image[:, :8, :8] += 0.5
  _, aux2 = tm.apply(vit, jnp.asarray(image))
  assert not np.allclose(np.asarray(aux2["pooled"]), np.asarray(aux["pooled"]))


def test_a_clip_tower_renormalises_the_pipelines_pixels():
  """[-1, 1] in; the patches see ((x + 1) / 2 - mean) / std, as CLIP was trained."""
  import dataclasses

  raw = dataclasses.replace(CLIP_TINY, pixel_norm=None)
  a = nnx.eval_shape(lambda: siglip.ViT(CLIP_TINY, image_size=16, rngs=nnx.Rngs(0)))
  b = nnx.eval_shape(lambda: siglip.ViT(raw, image_size=16, rngs=nnx.Rngs(0)))
  flat = tm.random_flat_params(a, seed=2)
  vlm.load_flat_params(a, flat)
  vlm.load_flat_params(b, flat)
  image = tm.random_images(2, seed=2)
  mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
  std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
  got = np.asarray(tm.apply(a, jnp.asarray(image))[0])
  want = np.asarray(tm.apply(b, jnp.asarray(((image + 1) / 2 - mean) / std))[0])
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert not np.allclose(got, np.asarray(tm.apply(b, jnp.asarray(image))[0]), atol=1e-2)


def test_bad_pooling_for_the_family_fails_clearly():
  with pytest.raises(ValueError, match="pool_type='tok' needs a class-token variant"):
    siglip.ViT(tm.VIT, image_size=16, pool_type="tok", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pool_type='tok' pools the last layer"):
    siglip.ViT(CLIP_TINY, image_size=16, pool_type="tok", output_layer=-2, rngs=nnx.Rngs(0))


def test_a_clip_vlm_sees_as_many_image_tokens_as_a_siglip_one():
  for v in (CLIP_TINY, tm.VIT):
    model = tm.abstract_vlm(vit_variant=v, vit_output_layer=-2)
    assert model.num_image_tokens == 4
    logits, aux = jax.eval_shape(
      lambda m: m(
        jnp.zeros((2, 16, 16, 3)),
        jnp.zeros((2, 5), jnp.int32),
        jnp.ones((2, 5), jnp.int32),
        jnp.ones((2, 5), bool),
        jnp.ones((2,), bool),
      ),
      model,
    )
    assert logits.shape == (2, 5, tm.VOCAB) and aux["img/zimg"].shape == (2, 4, 48)
