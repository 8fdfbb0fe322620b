"""LoRA: zero-init equals base, merge equals unmerged, einsum-shaped weights,
only adapters get gradients, adapter-only save/load, regex errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compact_jax.models import lora, siglip, vlm
from tests.models import tiny_models as tm

TARGETS = (
  r"^llm/layers/attn/(q|kv|attn_vec)_einsum/w$",  # einsum (N, D, H) / (2, K, D, H) / (N, H, D)
  r"^llm/layers/mlp/(gating_einsum|linear)$",
  r"^connector/Dense_\d/kernel$",  # 2-D
  r"^img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel$",
)


def _batch():
  rng = np.random.default_rng(21)
  tokens = rng.integers(0, tm.VOCAB, (2, 5)).astype(np.int32)
  mask_ar = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], np.int32)
  return tm.random_images(2, 21), tokens, mask_ar, np.ones((2, 5), bool), np.array([True, False])


def _randomize_b(model, seed=1):
  """Non-zero B factors, so adapters change the function."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.LoRAParam)
  for path, var in nnx.to_flat_state(state):
    if str(path[-1]).endswith("_lora_b"):
      var.set_value(jnp.asarray(0.3 * rng.standard_normal(var.shape), jnp.float32))
  nnx.update(model, state)


@pytest.fixture(scope="module")
def base():
  model, flat = tm.random_vlm(seed=21)
  return flat, np.asarray(tm.apply(model, *_batch())[0])


CONFIG = lora.LoraConfig(TARGETS, rank=2, alpha=4.0)


def _adapted(flat):
  model = tm.abstract_vlm()
  vlm.load_flat_params(model, flat)
  paths = lora.apply_lora(model, CONFIG)
  return model, paths


def test_zero_initialised_b_leaves_the_model_unchanged(base):
  flat, want = base
  model, paths = _adapted(flat)
  assert len(paths) == 8
  np.testing.assert_allclose(np.asarray(tm.apply(model, *_batch())[0]), want, atol=1e-5)


def test_merged_equals_unmerged_and_differs_from_base(base):
  flat, plain = base
  model, _ = _adapted(flat)
  _randomize_b(model)
  unmerged = np.asarray(tm.apply(model, *_batch())[0])
  assert np.abs(unmerged - plain).max() > 1e-2
  merged = lora.merge_lora(model)
  assert len(merged) == 8 and not lora.adapter_params(model)
  assert vlm.param_paths(nnx.state(model)).keys() == flat.keys()  # back to the base tree
  np.testing.assert_allclose(np.asarray(tm.apply(model, *_batch())[0]), unmerged, atol=1e-4)


def test_einsum_weight_delta_is_the_low_rank_product_in_the_right_layout():
  """q_einsum (N, D, H): the adapter acts on D (input) and produces (N, H)."""
  v = tm.LLM
  shape, in_axes = (
    (v.num_heads, v.width, v.head_dim),
    lora.input_axes(("heads", "embed", "head_dim")),
  )
  assert in_axes == (1,)
  rng = np.random.default_rng(3)
  a = rng.standard_normal((v.width, 2)).astype(np.float32)
  b = rng.standard_normal((2, v.num_heads * v.head_dim)).astype(np.float32)
  from compact_jax.models import lora_delta

  d = np.asarray(lora_delta(jnp.asarray(a), jnp.asarray(b), shape, in_axes, 0.5))
  x = rng.standard_normal(v.width).astype(np.float32)
  # x . delta[n, :, h] == 0.5 * (x @ A @ B)[n * H + h]
  want = (0.5 * (x @ a @ b)).reshape(v.num_heads, v.head_dim)
  np.testing.assert_allclose(np.einsum("d,ndh->nh", x, d), want, rtol=1e-4, atol=1e-4)
  assert lora.input_axes(("heads", "head_dim", "embed")) == (0, 1)
  assert lora.input_axes(("mlp", "embed")) == (0,)


def test_only_adapters_are_differentiated(base):
  flat, _ = base
  model, _ = _adapted(flat)
  _randomize_b(model)

  def loss(m):
    return jnp.mean(m(*[jnp.asarray(x) for x in _batch()])[0] ** 2)

  grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  keys = {"/".join(str(p) for p in path) for path, _ in nnx.to_flat_state(grads)}
  assert keys == set(lora.adapter_params(model))
  assert all(str(k).endswith(("_lora_a", "_lora_b")) for k in keys)


def test_adapter_only_checkpoint_round_trip(base, tmp_path):
  flat, _ = base
  model, _ = _adapted(flat)
  _randomize_b(model, seed=7)
  want = np.asarray(tm.apply(model, *_batch())[0])
  lora.save_adapters(model, str(tmp_path / "adapters.npz"))
  saved = np.load(tmp_path / "adapters.npz")
  assert all(k.split("/")[-1].endswith(("_lora_a", "_lora_b")) for k in saved.files)
  other, _ = _adapted(flat)  # same base, fresh adapters
  lora.load_adapters(other, str(tmp_path / "adapters.npz"))
  np.testing.assert_allclose(np.asarray(tm.apply(other, *_batch())[0]), want, atol=1e-6)


def test_patterns_that_match_nothing_are_errors():
  model = nnx.eval_shape(lambda: siglip.ViT(tm.VIT, image_size=16, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"match no weight: \['q_proj'\]"):
    lora.apply_lora(model, lora.LoraConfig(("q_proj", "query/kernel")))
  paths = list(vlm.param_paths(nnx.state(model)))
  mask = lora.freeze_mask(paths, [r"^Transformer/encoder_norm/"])
  assert sum(mask.values()) == 2 and not mask["embedding/kernel"]
  with pytest.raises(ValueError, match=r"match no parameter: \['\^llm/'\]"):
    lora.freeze_mask(paths, ["^llm/"])


def test_partial_lora_leaves_text_only_outputs_unchanged(base):
  flat, _ = base
  config = lora.LoraConfig(TARGETS[:2], rank=2, alpha=4.0, partial=True)
  model = tm.abstract_vlm()
  vlm.load_flat_params(model, flat)
  lora.apply_lora(model, config)
  _randomize_b(model, seed=9)
  plain = tm.abstract_vlm()
  vlm.load_flat_params(plain, flat)
  image, tokens, mask_ar, mask_input, _ = _batch()
  for has_image in (np.array([False, False]), np.array([True, True])):
    args = (image, tokens, mask_ar, mask_input, has_image)
    got = np.asarray(tm.apply(model, *args)[0])
    want = np.asarray(tm.apply(plain, *args)[0])
    if has_image.any():
      # Image tokens' keys/values carry the adapter, and text attends to them.
      assert np.abs(got - want).max() > 1e-2
    else:
      np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(ValueError, match="Partial LoRA needs a VLM"):
    lora.apply_lora(
      nnx.eval_shape(lambda: siglip.ViT(tm.VIT, image_size=16, rngs=nnx.Rngs(0))), config
    )
