"""The assembled VLM: masks, parameter names and axes, numerics, sharding, init, compile time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding

from compact_jax import sharding
from compact_jax.models import vlm
from configs import base
from tests.models import numpy_reference as ref
from tests.models import tiny_models as tm

B, T = 3, 7


def make_batch(seed: int = 0):
  """Three rows: image + prompt/answer, text-only with left padding, image + right padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, tm.VOCAB, (B, T)).astype(np.int32)
  mask_ar = np.array(
    [[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]], np.int32
  )
  mask_input = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], bool)
  has_image = np.array([True, False, True])
  return tm.random_images(B, seed), tokens, mask_ar, mask_input, has_image


def jit_forward(model: vlm.VLM):
  return lambda *batch: tm.apply(model, *batch)


@pytest.fixture(scope="module")
def scanned():
  model, flat = tm.random_vlm(seed=1)
  return model, flat, jit_forward(model)


def test_make_attn_mask_matches_hand_built_matrix():
  input_mask = np.array([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], bool)
  mask_ar = np.array([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 1]], np.int32)
  # Row 0: a 2-token prefix, 3 causal tokens, one padding token at the end.
  # Row 1: left padding, a 2-token prefix, a 2-token block (ar 1 then 0), one causal token.
  expected = np.array(
    [
      [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
      ],
      [
        [0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 1],
      ],
    ],
    bool,
  )
  got = vlm.make_attn_mask(jnp.asarray(input_mask), jnp.asarray(mask_ar))
  assert got.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(got), expected)


def expected_paths(connector: str) -> dict[str, tuple[int, ...]]:
  """The big_vision names and shapes listed in the model brief, for tm.VIT / tm.LLM."""
  dv, lv, nv, hv, fv, p = 32, 2, 2, 16, 64, 8
  d, l, n, k, h, f, v = 48, 2, 4, 2, 16, 96, tm.VOCAB
  blk = "img/Transformer/encoderblock/"
  att = blk + "MultiHeadDotProductAttention_0/"
  out = {
    "img/embedding/kernel": (p, p, 3, dv),
    "img/embedding/bias": (dv,),
    "img/pos_embedding": (1, 4, dv),
    blk + "LayerNorm_0/scale": (lv, dv),
    blk + "LayerNorm_0/bias": (lv, dv),
    blk + "LayerNorm_1/scale": (lv, dv),
    blk + "LayerNorm_1/bias": (lv, dv),
    blk + "MlpBlock_0/Dense_0/kernel": (lv, dv, fv),
    blk + "MlpBlock_0/Dense_0/bias": (lv, fv),
    blk + "MlpBlock_0/Dense_1/kernel": (lv, fv, dv),
    blk + "MlpBlock_0/Dense_1/bias": (lv, dv),
    att + "out/kernel": (lv, nv, hv, dv),
    att + "out/bias": (lv, dv),
    "img/Transformer/encoder_norm/scale": (dv,),
    "img/Transformer/encoder_norm/bias": (dv,),
    "llm/embedder/input_embedding": (v, d),
    "llm/layers/pre_attention_norm/scale": (l, d),
    "llm/layers/attn/q_einsum/w": (l, n, d, h),
    "llm/layers/attn/kv_einsum/w": (l, 2, k, d, h),
    "llm/layers/attn/attn_vec_einsum/w": (l, n, h, d),
    "llm/layers/pre_ffw_norm/scale": (l, d),
    "llm/layers/mlp/gating_einsum": (l, 2, d, f),
    "llm/layers/mlp/linear": (l, f, d),
    "llm/final_norm/scale": (d,),
  }
  for name in ("query", "key", "value"):
    out[att + f"{name}/kernel"] = (lv, dv, nv, hv)
    out[att + f"{name}/bias"] = (lv, nv, hv)
  if connector == "linear":
    out.update({"img/head/kernel": (dv, d), "img/head/bias": (d,)})
  else:
    out.update(
      {
        "connector/Dense_0/kernel": (dv, d),
        "connector/Dense_0/bias": (d,),
        "connector/Dense_1/kernel": (d, d),
        "connector/Dense_1/bias": (d,),
      }
    )
  return out


@pytest.mark.parametrize("connector", ["linear", "mlp2x_gelu"])
def test_param_paths_are_big_vision_names(connector):
  model = tm.abstract_vlm(connector=connector)
  assert vlm.param_paths(nnx.state(model)) == expected_paths(connector)


def test_per_layer_names_and_conversion_round_trip():
  scanned_flat = tm.random_flat_params(tm.abstract_vlm())
  unscanned = tm.abstract_vlm(scan_layers=False)
  per_layer = vlm.scanned_to_per_layer(scanned_flat)
  # The unscanned model spells layers encoderblock_{i} / layers_{i}, and the
  # converted dict has exactly its names and shapes.
  assert vlm.param_paths(nnx.state(unscanned)) == {k: v.shape for k, v in per_layer.items()}
  assert "img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel" in per_layer
  assert "llm/layers_1/attn/kv_einsum/w" in per_layer
  back = vlm.per_layer_to_scanned(per_layer)
  assert back.keys() == scanned_flat.keys()
  for key, value in scanned_flat.items():
    np.testing.assert_array_equal(np.asarray(back[key]), value, err_msg=key)
  with pytest.raises(ValueError, match=r"llm/layers/mlp/linear has layer indices \[0, 2\]"):
    vlm.per_layer_to_scanned(
      {"llm/layers_0/mlp/linear": np.zeros(2), "llm/layers_2/mlp/linear": np.zeros(2)}
    )


def test_paligemma_3b_shapes():
  """So400m/14 at 224 + gemma_2b + linear head: the PaliGemma-3B npz layout (reference §3.3)."""
  model = tm.abstract_vlm(
    connector="linear",
    vit_variant="So400m/14",
    llm_variant="gemma_2b",
    vocab_size=257152,
    image_size=224,
  )
  paths = vlm.param_paths(nnx.state(model))
  assert paths["img/embedding/kernel"] == (14, 14, 3, 1152)
  assert paths["img/pos_embedding"] == (1, 256, 1152)
  assert paths["img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"] == (
    27,
    1152,
    16,
    72,
  )
  assert paths["img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"] == (27, 1152, 4304)
  assert paths["img/head/kernel"] == (1152, 2048)
  assert paths["llm/embedder/input_embedding"] == (257152, 2048)
  assert paths["llm/layers/attn/q_einsum/w"] == (18, 8, 2048, 256)
  assert paths["llm/layers/attn/kv_einsum/w"] == (18, 2, 1, 2048, 256)
  assert paths["llm/layers/mlp/gating_einsum"] == (18, 2, 2048, 16384)


WEIGHT_AXES = {
  "vocab",
  "embed",
  "mlp",
  "heads",
  "kv_heads",
  "head_dim",
  "layers",
  "patch",
  "channels",
  "norm",
  "position",
}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_param_has_logical_axes_of_its_rank(scan_layers):
  state = nnx.state(tm.abstract_vlm(scan_layers=scan_layers))
  shapes, axes = vlm.param_paths(state), vlm.param_logical_axes(state)
  assert shapes.keys() == axes.keys()
  for key, shape in shapes.items():
    assert len(axes[key]) == len(shape), key
    assert set(axes[key]) - {None} <= WEIGHT_AXES, (key, axes[key])
    stacked = "/encoderblock/" in key or key.startswith("llm/layers/")
    assert (axes[key][0] == "layers") == stacked, (key, axes[key])


def test_forward_matches_numpy_reference(scanned):
  _, flat, forward = scanned
  image, tokens, mask_ar, mask_input, has_image = make_batch()
  logits, aux = forward(image, tokens, mask_ar, mask_input, has_image)
  assert logits.shape == (B, T, tm.VOCAB) and logits.dtype == jnp.float32
  assert aux["img/zimg"].shape == (B, 4, tm.LLM.width)
  assert aux["llm/pre_logits"].shape == (B, T, tm.LLM.width)
  want = ref.vlm(
    vlm.scanned_to_per_layer(flat),
    image,
    tokens,
    mask_ar,
    mask_input,
    has_image,
    vit_variant=tm.VIT,
    llm_variant=tm.LLM,
    connector_name="mlp2x_gelu",
  )
  # Padding rows are never read; compare the valid text positions.
  np.testing.assert_allclose(np.asarray(logits)[mask_input], want[mask_input], rtol=2e-4, atol=2e-4)


def test_linear_connector_penultimate_layer_unscanned_matches_numpy_reference():
  model, flat = tm.random_vlm(seed=2, connector="linear", scan_layers=False, vit_output_layer=-2)
  image, tokens, mask_ar, mask_input, has_image = make_batch(1)
  logits, _ = jit_forward(model)(image, tokens, mask_ar, mask_input, has_image)
  want = ref.vlm(
    flat,
    image,
    tokens,
    mask_ar,
    mask_input,
    has_image,
    vit_variant=tm.VIT,
    llm_variant=tm.LLM,
    connector_name="linear",
    output_layer=-2,
  )
  np.testing.assert_allclose(np.asarray(logits)[mask_input], want[mask_input], rtol=2e-4, atol=2e-4)


def test_text_only_examples_ignore_pixels_and_match_the_llm_alone(scanned):
  model, _, forward = scanned
  _, tokens, mask_ar, mask_input, _ = make_batch()
  no_image = np.zeros(B, bool)
  a, _ = forward(tm.random_images(B, 5), tokens, mask_ar, mask_input, no_image)
  b, _ = forward(tm.random_images(B, 6) * 0.1, tokens, mask_ar, mask_input, no_image)
  # Bit-identical at every real token (padding rows are never read).
  np.testing.assert_array_equal(np.asarray(a)[mask_input], np.asarray(b)[mask_input])
  # Without its image, the example is the LLM on its text (positions from 0).
  lm = model.llm
  positions = jnp.cumsum(mask_input, axis=1) - 1
  attn = vlm.make_attn_mask(jnp.asarray(mask_input), jnp.asarray(mask_ar))
  alone, _ = tm.apply(lm, lm.embed(jnp.asarray(tokens)), positions, attn)
  np.testing.assert_allclose(
    np.asarray(a)[mask_input], np.asarray(alone)[mask_input], rtol=1e-5, atol=1e-5
  )


def test_scanned_and_per_layer_models_agree(scanned):
  _, flat, forward = scanned
  unscanned = tm.abstract_vlm(scan_layers=False)
  vlm.load_flat_params(unscanned, vlm.scanned_to_per_layer(flat))
  batch = make_batch(3)
  want, _ = forward(*batch)
  got, _ = jit_forward(unscanned)(*batch)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_load_flat_params_names_the_bad_key():
  model = tm.abstract_vlm()
  flat = tm.random_flat_params(model)
  flat["llm/final_norm/scale"] = np.zeros(7, np.float32)
  with pytest.raises(ValueError, match="llm/final_norm/scale has shape"):
    vlm.load_flat_params(model, flat)
  del flat["llm/final_norm/scale"]
  with pytest.raises(KeyError, match="llm/final_norm/scale"):
    vlm.load_flat_params(model, flat)


def test_bad_inputs_fail_with_clear_errors(scanned):
  model, _, _ = scanned
  image, tokens, mask_ar, mask_input, has_image = make_batch()
  with pytest.raises(ValueError, match="mask_ar has shape"):
    model(image, tokens, mask_ar[:, :-1], mask_input, has_image)
  with pytest.raises(ValueError, match=r"ViT expects images float32\[B, 16, 16, 3\]"):
    model(image[:, :8], tokens, mask_ar, mask_input, has_image)
  with pytest.raises(ValueError, match="Unknown connector 'mlp3x'"):
    tm.abstract_vlm(connector="mlp3x")
  with pytest.raises(ValueError, match="Unknown remat_policy 'fast'"):
    tm.abstract_vlm(remat_policy="fast")
  with pytest.raises(ValueError, match="Unknown model dtype 'fp8'"):
    tm.abstract_vlm(dtype="fp8")


def test_sharded_forward_on_a_mesh_matches_single_device(scanned):
  model, _, forward = scanned
  rules = tuple(base.get_config().sharding_rules)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  graphdef, state = nnx.split(model)
  axes = vlm.param_logical_axes(state)

  def place(path, var):
    spec = sharding.logical_to_spec(axes["/".join(map(str, path))], rules)
    return jax.device_put(var.get_value(), NamedSharding(mesh, spec))

  flat_state = nnx.to_flat_state(state)
  placed = nnx.from_flat_state([(path, var.replace(place(path, var))) for path, var in flat_state])
  # Something really is split: the vocab rows over "tensor", the embed dim over "fsdp".
  emb = placed["llm"]["embedder"]["input_embedding"][...]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  image, tokens, mask_ar, mask_input, has_image = make_batch()
  batch = [np.concatenate([x, x[:1]]) for x in (image, tokens, mask_ar, mask_input, has_image)]
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    got, _ = jax.jit(lambda st, *b: nnx.merge(graphdef, st)(*b))(placed, *batch)
  want, _ = forward(*batch)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_gradient_reaches_every_param():
  """A loss on answer tokens trains every weight (nothing is accidentally detached)."""
  model, _ = tm.random_vlm(seed=5, scale=0.05)
  graphdef, params = nnx.split(model)
  image, tokens, mask_ar, mask_input, has_image = make_batch()

  def loss_fn(p):
    logits, _ = nnx.merge(graphdef, p)(image, tokens, mask_ar, mask_input, has_image)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return jnp.mean(losses * mask_ar[:, 1:])

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  assert np.isfinite(loss)
  for key, g in vlm.flat_params(grads).items():
    assert np.isfinite(g).all(), key
    assert np.abs(g).max() > 0, f"no gradient reaches {key}"


@pytest.mark.parametrize(("scan_layers", "expected"), [(True, 2), (False, 4)])
def test_remat_policy_wraps_every_layer_of_both_towers(scan_layers, expected):
  """One remat per scanned tower body, or one per layer (2 ViT + 2 LLM) unscanned."""
  model, _ = tm.random_vlm(remat_policy="nothing_saveable", scan_layers=scan_layers)
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda st, *b: nnx.merge(graphdef, st)(*b)[0])(state, *make_batch())
  assert str(jaxpr).count("remat2[") == expected
  plain = tm.abstract_vlm(scan_layers=scan_layers)
  vlm.load_flat_params(plain, tm.random_flat_params(plain))
  graphdef, state = nnx.split(plain)
  jaxpr = jax.make_jaxpr(lambda st, *b: nnx.merge(graphdef, st)(*b)[0])(state, *make_batch())
  assert "remat2[" not in str(jaxpr)
