"""KV-cache greedy decoding against full forward passes; batch independence; no retracing."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from compact_jax.eval import decode
from tests.models import tiny_models as tm

B, P, MAX_NEW, PAD = 8, 6, 12, 0
LENGTHS = np.array([6, 3, 6, 3, 3, 6, 3, 6])  # valid prompt tokens per row
HAS_IMAGE = np.array([True, False, True, True, False, True, True, False])
NEVER = -1  # an EOS id no argmax can produce


@pytest.fixture(scope="module")
def setup():
  model, _ = tm.random_vlm(seed=7)
  rng = np.random.default_rng(7)
  tokens = rng.integers(1, tm.VOCAB, (B, P)).astype(np.int32)
  mask = np.arange(P)[None, :] >= (P - LENGTHS)[:, None]  # left padding
  tokens[~mask] = PAD
  images = tm.random_images(B, 7)
  free = decode.greedy_decode_reference(
    model, images, tokens, mask, HAS_IMAGE, max_new_tokens=MAX_NEW, eos_id=NEVER, pad_id=PAD
  )
  # An EOS the model really emits mid-answer in some rows: the most common
  # token after step 0.
  values, counts = np.unique(free[:, 1:], return_counts=True)
  eos = int(values[np.argmax(counts)])
  return model, (images, tokens, mask, HAS_IMAGE), free, eos


def test_generations_are_not_degenerate(setup):
  _, _, free, _ = setup
  # Guards the other tests' power: a model that repeats one token would make
  # cache/reference agreement trivial.
  assert len(np.unique(free)) >= 6
  assert sum(len(np.unique(row)) >= 3 for row in free) >= 3


def test_kv_cache_decoder_equals_full_forward_reference(setup):
  model, batch, free, eos = setup
  graphdef, state = nnx.split(model)
  decoder = decode.make_greedy_decoder(graphdef, max_new_tokens=MAX_NEW, eos_id=eos, pad_id=PAD)
  got = np.asarray(decoder(state, *batch))
  want = decode.greedy_decode_reference(
    model, *batch, max_new_tokens=MAX_NEW, eos_id=eos, pad_id=PAD
  )
  assert got.shape == (B, MAX_NEW) and got.dtype == np.int32
  np.testing.assert_array_equal(got, want)
  # EOS is kept, everything after it is padding, and before it the answer is
  # the unstopped one.
  cut = 0
  for row, full_row in zip(got, free):
    hits = np.flatnonzero(row == eos)
    if hits.size == 0:
      np.testing.assert_array_equal(row, full_row)
      continue
    end = hits[0]
    np.testing.assert_array_equal(row[: end + 1], full_row[: end + 1])
    np.testing.assert_array_equal(row[end + 1 :], PAD)
    cut += end < MAX_NEW - 1
  assert cut >= 1, "the chosen EOS should stop at least one row early"


def test_batch_of_one_equals_batch_of_eight_and_nothing_retraces(setup):
  model, (images, tokens, mask, has_image), free, _ = setup
  graphdef, state = nnx.split(model)
  decoder = decode.make_greedy_decoder(graphdef, max_new_tokens=MAX_NEW, eos_id=NEVER, pad_id=PAD)
  batched = np.asarray(decoder(state, images, tokens, mask, has_image))
  np.testing.assert_array_equal(batched, free)  # all MAX_NEW steps, no EOS
  assert decoder.num_traces == 1
  # The short prompts alone, without left padding: other positions, another
  # cache length, no batch mates. Four calls, one new shape.
  short = np.flatnonzero(LENGTHS < P)
  for i in short:
    start = P - LENGTHS[i]
    alone = decoder(
      state,
      images[i : i + 1],
      tokens[i : i + 1, start:],
      mask[i : i + 1, start:],
      has_image[i : i + 1],
    )
    np.testing.assert_array_equal(np.asarray(alone)[0], batched[i], err_msg=f"row {i}")
  assert len(short) == 4 and decoder.num_traces == 2
  again = decoder(state, tm.random_images(B, 8), tokens, mask, has_image)
  assert decoder.num_traces == 2
  # Text-only rows ignore their pixels.
  np.testing.assert_array_equal(np.asarray(again)[~has_image], batched[~has_image])


def test_bad_prompts_fail_before_tracing(setup):
  model, (images, tokens, mask, has_image), _, _ = setup
  graphdef, state = nnx.split(model)
  decoder = decode.make_greedy_decoder(graphdef, max_new_tokens=4, eos_id=NEVER, pad_id=PAD)
  right_padded = mask[:, ::-1]
  with pytest.raises(ValueError, match=r"left-padded with a non-empty prompt: rows \[1, 3, 4, 6\]"):
    decoder(state, images, tokens, right_padded, has_image)
  holes = mask.copy()
  holes[0, 2] = False
  with pytest.raises(ValueError, match=r"rows \[0\] have padding after a valid token"):
    decoder(state, images, tokens, holes, has_image)
  with pytest.raises(ValueError, match="has_image has shape"):
    decoder(state, images, tokens, mask, has_image[:3])
  assert decoder.num_traces == 0
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    decode.make_greedy_decoder(graphdef, max_new_tokens=0, eos_id=1, pad_id=PAD)


def test_partial_lora_and_causal_image_decoding_match_the_reference(setup):
  """The cached decoder honours the VLM's image-token options: Partial LoRA
  (adapters at image tokens only, never at generated text) and LLaVA's causal
  image attention."""
  from compact_jax.models import lora, vlm

  model, batch, _, _ = setup
  flat = vlm.flat_params(nnx.state(model))
  variant = tm.abstract_vlm(causal_image=True)
  vlm.load_flat_params(variant, {k: np.asarray(v) for k, v in flat.items()})
  config = lora.LoraConfig((r"^llm/layers/attn/(q|kv)_einsum/w$",), rank=2, partial=True)
  lora.apply_lora(variant, config, seed=3)
  state = nnx.state(variant, nnx.LoRAParam)
  rng = np.random.default_rng(3)
  for _, var in nnx.to_flat_state(state):
    var.set_value(np.asarray(0.5 * rng.standard_normal(var.shape), np.float32))
  nnx.update(variant, state)
  graphdef, params = nnx.split(variant)
  decoder = decode.make_greedy_decoder(graphdef, max_new_tokens=4, eos_id=NEVER, pad_id=PAD)
  got = np.asarray(decoder(params, *batch))
  want = decode.greedy_decode_reference(variant, *batch, max_new_tokens=4, eos_id=NEVER, pad_id=PAD)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
  ("eqn", "x_shape", "w_shape", "index"),
  [
    ("BSD,KDH->BSKH", (2, 3, 4), (2, 1, 4, 5), 1),  # fused kv_einsum, second slice
    ("BTD,NDH->BTNH", (2, 3, 4), (3, 4, 5), None),
    ("BTNH,NHD->BTD", (2, 3, 3, 5), (3, 5, 4), None),
    ("BTD,DF->BTF", (2, 3, 4), (2, 4, 6), 0),  # fused gating_einsum, first slice
    ("BTD,FD->BTF", (2, 3, 4), (6, 4), None),  # weight stored [out, in]
    ("BTD,DF->BFT", (2, 3, 4), (4, 6), None),  # output not [lead, kept]: plain einsum
  ],
)
def test_decode_weight_view_equals_the_einsum_on_the_stored_weights(eqn, x_shape, w_shape, index):
  """The matmul view the decoder sets up (``prepare_decode_weights``) reproduces
  ``einsum(eqn, x, W[index])`` on the checkpoint-layout weight, at first use and reuse."""
  import jax.numpy as jnp

  from compact_jax import models

  rng = np.random.default_rng(0)

  class Holder(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.asarray(rng.normal(size=w_shape), jnp.float32))

  holder = Holder()
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  w = np.asarray(holder.w[...])
  expected = np.einsum(eqn.replace(" ", ""), np.asarray(x), w if index is None else w[index])
  models.prepare_decode_weights(holder)
  for _ in range(2):  # build the cached matrix, then reuse it
    got = models.project(eqn, x, holder, "w", jnp.float32, index=index)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
  assert holder.w[...].shape == w_shape  # the stored parameter keeps its layout
