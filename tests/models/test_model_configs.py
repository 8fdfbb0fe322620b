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


@pytest.mark.parametrize(
  "name,vocab,llm_params,tokens",
  [
    # HF: lmsys/vicuna-7b-v1.5 (LLaMA-2-7B shape) has 6,738,415,616 parameters.
    ("llava15_7b", 32000, 6_738_415_616, 729),  # 384 px / 14 -> 27 x 27
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
  assert _count(model, "img/Transformer/") > 400e6  # So400m


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_variants_run_a_forward_pass(name):
  c = CONFIGS[name].get_config("tiny")
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
