"""Gemma-style decoder: variants, RoPE, grouped-query attention, the KV cache, dtypes, init."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compact_jax.models import llm, vlm
from tests.models import numpy_reference as ref
from tests.models import tiny_models as tm

V = 64


def random_decoder(
  variant: llm.LLMVariant = tm.LLM, seed: int = 0, **kw
) -> tuple[llm.Decoder, dict]:
  model = nnx.eval_shape(lambda: llm.Decoder(variant, V, rngs=nnx.Rngs(0), **kw))
  flat = tm.random_flat_params(model, seed)
  vlm.load_flat_params(model, flat)
  return model, flat


def causal(b: int, t: int) -> jax.Array:
  return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))


def test_variants_and_the_gemma_2b_parameter_count():
  assert llm.decode_variant("tiny") == llm.LLMVariant(192, 4, 4, 1, 48, 768)
  assert llm.decode_variant("smoke") == llm.LLMVariant(32, 1, 2, 1, 16, 64)
  # HF's google/gemma-2b reports 2,506,172,416 parameters (vocab 256000, tied head).
  model = nnx.eval_shape(lambda: llm.Decoder("gemma_2b", 256000, rngs=nnx.Rngs(0)))
  shapes = vlm.param_paths(nnx.state(model))
  assert sum(int(np.prod(s)) for s in shapes.values()) == 2_506_172_416
  with pytest.raises(ValueError, match="Unknown LLM variant 'gemma_99b'"):
    llm.decode_variant("gemma_99b")
  with pytest.raises(ValueError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
    llm.LLMVariant(48, 1, 4, 3, 16, 96)


def test_rope_is_a_complex_rotation_and_depends_on_relative_position():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
  pos = np.array([[0, 1, 2, 3, 4], [7, 9, 11, 100, 1000]], np.int32)
  got = np.asarray(llm.apply_rope(jnp.asarray(x), jnp.asarray(pos)))
  for b in range(2):
    for n in range(3):
      np.testing.assert_allclose(
        got[b, :, n], ref.rope(x[b, :, n].astype(np.float64), pos[b]), atol=2e-4
      )
  # q.k after RoPE depends on positions only through their difference.
  q, k = x[:1, :1], x[:1, 1:2]
  dots = [
    float(
      jnp.sum(llm.apply_rope(q, jnp.array([[m + s]])) * llm.apply_rope(k, jnp.array([[n + s]])))
    )
    for m, n, s in ((3, 1, 0), (3, 1, 50), (10, 8, 0))
  ]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


def test_grouped_query_attention_equals_multi_head_with_repeated_kv():
  """K kv heads serve query heads in contiguous groups, as HF's repeat_kv."""
  gqa_v = tm.LLM  # 4 query heads, 2 kv heads
  mha_v = llm.LLMVariant(gqa_v.width, gqa_v.depth, 4, 4, gqa_v.head_dim, gqa_v.mlp_dim)
  gqa = nnx.eval_shape(lambda: llm.Attention(gqa_v, dtype="float32", rngs=nnx.Rngs(0)))
  mha = nnx.eval_shape(lambda: llm.Attention(mha_v, dtype="float32", rngs=nnx.Rngs(0)))
  flat = tm.random_flat_params(gqa)
  vlm.load_flat_params(gqa, flat)
  vlm.load_flat_params(mha, {**flat, "kv_einsum/w": np.repeat(flat["kv_einsum/w"], 2, axis=1)})
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, gqa_v.width)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  want, _ = tm.apply(mha, x, pos, causal(2, 6))
  got, _ = tm.apply(gqa, x, pos, causal(2, 6))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_kv_cache_steps_reproduce_the_full_forward():
  model, _ = random_decoder(seed=2)
  graphdef, state = nnx.split(model)
  b, t = 2, 6
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, V, (b, t)))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t)) + jnp.array([[0], [3]])  # any offsets
  want, _ = tm.apply(model, model.embed(tokens), positions, causal(b, t))

  @jax.jit
  def step(st, x, pos, mask, cache, index):
    m = nnx.merge(graphdef, st)
    logits, aux = m(m.embed(x), pos, mask, cache=cache, cache_index=index)
    return logits, aux["kv_cache"]

  cache = model.init_cache(b, t)
  assert cache.k.shape == (2, b, t, 2, 16)
  allowed = causal(b, t)
  got = []
  for i in range(t):
    logits, cache = step(
      state, tokens[:, i : i + 1], positions[:, i : i + 1], allowed[:, i : i + 1], cache, i
    )
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, axis=1), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_tracks_float32():
  f32, flat = random_decoder(seed=4)
  bf16 = nnx.eval_shape(lambda: llm.Decoder(tm.LLM, V, dtype="bfloat16", rngs=nnx.Rngs(0)))
  vlm.load_flat_params(bf16, flat)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, V, (2, 6)))
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  want, _ = tm.apply(f32, f32.embed(tokens), pos, causal(2, 6))
  got, aux = tm.apply(bf16, bf16.embed(tokens), pos, causal(2, 6))
  assert got.dtype == jnp.float32 and aux["pre_logits"].dtype == jnp.bfloat16
  # Params stay float32 whatever the compute dtype.
  assert all(v.dtype == np.float32 for v in vlm.flat_params(nnx.state(bf16)).values())
  got, want = np.asarray(got), np.asarray(want)
  assert np.abs(got - want).mean() < 0.05 * np.abs(want).mean()
  assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_init_draws_distinct_layers_and_zero_centred_norms():
  def init():
    return nnx.state(llm.Decoder(tm.LLM, V, rngs=nnx.Rngs(0)))

  flat = vlm.flat_params(jax.jit(init)())
  # Gemma's RMSNorm scale is zero-centred: 0 means "multiply by 1".
  np.testing.assert_array_equal(flat["layers/pre_attention_norm/scale"], 0.0)
  np.testing.assert_array_equal(flat["final_norm/scale"], 0.0)
  q = np.asarray(flat["layers/attn/q_einsum/w"])  # [L, N, D, H], fan-in D = 48
  assert not np.allclose(q[0], q[1]), "stacked layers must be initialised independently"
  assert 0.8 < q.std() * np.sqrt(tm.LLM.width) < 1.2
  emb = np.asarray(flat["embedder/input_embedding"])
  # With the sqrt(D) input scale, embedded tokens start at unit scale.
  assert 0.8 < emb.std() * np.sqrt(tm.LLM.width) < 1.2
