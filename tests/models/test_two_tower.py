"""SigLIP two-tower model: the sigmoid loss, the MAP head, and that training separates pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from compact_jax.models import siglip, two_tower, vlm
from tests.models import tiny_models as tm


def test_sigmoid_loss_matches_the_pairwise_definition():
  logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, -0.5]], np.float32)
  want = 0.0
  for i in range(3):
    for j in range(3):
      z = 1.0 if i == j else -1.0
      want -= np.log(1.0 / (1.0 + np.exp(-z * logits[i, j])))
  np.testing.assert_allclose(
    float(two_tower.sigmoid_loss(jnp.asarray(logits))), want / 3, rtol=1e-6
  )


def test_map_head_pools_by_attention_from_the_probe():
  """With one head and a zero query kernel, attention is uniform: the MAP head
  then pools the mean of the value projections."""
  v = siglip.ViTVariant(width=8, depth=1, mlp_dim=16, num_heads=1, patch_size=4)
  head = nnx.eval_shape(lambda: siglip.MAPHead(v, dtype="float32", rngs=nnx.Rngs(0)))
  flat = tm.random_flat_params(head, seed=1)
  flat["MultiHeadDotProductAttention_0/query/kernel"][:] = 0
  flat["MultiHeadDotProductAttention_0/query/bias"][:] = 0
  vlm.load_flat_params(head, flat)
  x = np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32)
  got = np.asarray(tm.apply(head, jnp.asarray(x)))
  g = lambda k: flat["MultiHeadDotProductAttention_0/" + k]  # noqa: E731
  vals = np.einsum("bnd,dh->bnh", x, g("value/kernel")[:, 0]) + g("value/bias")[0]
  att = vals.mean(1) @ g("out/kernel")[0] + g("out/bias")
  mu, var = att.mean(-1, keepdims=True), att.var(-1, keepdims=True)
  y = (att - mu) / np.sqrt(var + 1e-6) * flat["LayerNorm_0/scale"] + flat["LayerNorm_0/bias"]
  h = y @ flat["MlpBlock_0/Dense_0/kernel"] + flat["MlpBlock_0/Dense_0/bias"]
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
  want = att + h @ flat["MlpBlock_0/Dense_1/kernel"] + flat["MlpBlock_0/Dense_1/bias"]
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_few_steps_of_sigmoid_training_separate_matched_pairs():
  v = siglip.ViTVariant(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
  model = nnx.eval_shape(
    lambda: two_tower.TwoTower(
      v, v, image_size=16, vocab_size=20, max_len=4, embed_dim=16, rngs=nnx.Rngs(0)
    )
  )
  flat = tm.random_flat_params(model, seed=3, scale=0.2)
  for k in flat:  # LayerNorms start as identities, as in a real init
    if "LayerNorm" in k or "encoder_norm" in k:
      flat[k][:] = 1.0 if k.endswith("scale") else 0.0
  flat["t"][:] = np.log(10.0)
  flat["b"][:] = -10.0
  vlm.load_flat_params(model, flat)
  images = jnp.asarray(tm.random_images(4, seed=3))
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 20, (4, 4)), jnp.int32)
  graphdef, params = nnx.split(model)
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits, _ = nnx.merge(graphdef, p)(images, tokens)
      return two_tower.sigmoid_loss(logits), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, logits

  losses = []
  for _ in range(80):
    params, opt_state, loss, logits = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]
  # Each image's best text is its own caption.
  assert (np.asarray(logits).argmax(1) == np.arange(4)).all()
