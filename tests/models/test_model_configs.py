"""The model-zoo configs build (abstractly: no weights) with the documented sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compact_jax.models import vlm
from configs import llava15_7b, paligemma_3b, siglip_gemma2b

CONFIGS = {"llava15_7b": llava15_7b, "siglip_gemma2b": siglip_gemma2b, "paligemma_3b": paligemma_3b}


def _abstract(c, vocab):
  return nnx.eval_shape(
    lambda: vlm.VLM.from_config(
      c.model, vocab_size=vocab, image_size=c.data.image_size, rngs=nnx.Rngs(0)
    )
  )


def _count(model, prefix):
  shapes = vlm.param_paths(nnx.state(model))
  return sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(prefix))


# transformers CLIPVisionModel(ViT-L/14, 336 px) has 303,507,456 parameters.
CLIP_L14_336 = 303_507_456


@pytest.mark.parametrize(
  "name,vocab,llm_params,tokens",
  [
    # HF: lmsys/vicuna-7b-v1.5 (LLaMA-2-7B shape) has 6,738,415,616 parameters.
    ("llava15_7b", 32000, 6_738_415_616, 576),  # CLIP-L/14 @ 336 px -> 24 x 24
    # HF: google/gemma-2b has 2,506,172,416.
    ("siglip_gemma2b", 256000, 2_506_172_416, 256),
    ("paligemma_3b", 256000, 2_506_172_416, 256),
  ],
)
def test_full_size_configs_have_the_upstream_shapes(name, vocab, llm_params, tokens):
  c = CONFIGS[name].get_config()
  model = _abstract(c, vocab)
  assert _count(model, "llm/") == llm_params
  assert model.num_image_tokens == tokens
  if name == "llava15_7b":
    assert _count(model, "img/") == CLIP_L14_336
  else:
    assert _count(model, "img/Transformer/") > 400e6  # So400m


def test_llava15_siglip_tower_is_still_so400m_at_384():
  model = _abstract(llava15_7b.get_config("tower=siglip"), 32000)
  assert model.num_image_tokens == 729  # 384 px / 14 -> 27 x 27
  assert _count(model, "img/Transformer/") > 400e6


@pytest.mark.parametrize("name", [*sorted(CONFIGS), "llava15_7b:tower=clip"])
def test_tiny_variants_run_a_forward_pass(name):
  name, _, extra = name.partition(":")
  c = CONFIGS[name].get_config(",".join(filter(None, ("tiny", extra))))
  model = _abstract(c, 64)
  b, t, s = 2, 6, c.data.image_size
  logits, _ = jax.eval_shape(
    lambda m: m(
      jnp.zeros((b, s, s, 3)),
      jnp.zeros((b, t), jnp.int32),
      jnp.ones((b, t), jnp.int32),
      jnp.ones((b, t), bool),
      jnp.ones((b,), bool),
    ),
    model,
  )
  assert logits.shape == (b, t, 64)
  assert _count(model, "") < 1e6


@pytest.mark.parametrize("causal", [False, True])
def test_causal_image_key_reaches_the_attention_mask(causal):
  # llava15_7b sets model.causal_image (LLaVA's image tokens attend causally); the base
  # default is a full-attention image prefix (PaliGemma, the tiny world).
  c = llava15_7b.get_config("tiny")
  assert c.model.causal_image
  with c.unlocked():
    c.model.causal_image = causal
  model = _abstract(c, 64)
  n, t = model.num_image_tokens, 3
  full_ar = model.full_mask_ar(n, jnp.ones((1, t), jnp.int32))
  mask = np.asarray(vlm.make_attn_mask(jnp.ones((1, n + t), bool), full_ar))[0]
  image_block = mask[:n, :n]
  expected = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
  np.testing.assert_array_equal(image_block, expected)
  assert mask[n:, :n].all()  # text always sees the whole image
