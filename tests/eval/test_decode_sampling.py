"""Sampling (temperature / top-k / top-p with a seed), stop tokens and stop strings."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compact_jax.eval import decode
from tests.models import tiny_models as tm

B, P, MAX_NEW, PAD = 8, 6, 6, 0
LENGTHS = np.array([6, 3, 6, 3, 3, 6, 3, 6])
HAS_IMAGE = np.array([True, False, True, True, False, True, True, False])
NEVER = -1


@pytest.fixture(scope="module")
def setup():
  model, _ = tm.random_vlm(seed=7)
  rng = np.random.default_rng(7)
  tokens = rng.integers(1, tm.VOCAB, (B, P)).astype(np.int32)
  mask = np.arange(P)[None, :] >= (P - LENGTHS)[:, None]
  tokens[~mask] = PAD
  graphdef, state = nnx.split(model)
  return model, graphdef, state, (tm.random_images(B, 7), tokens, mask, HAS_IMAGE)


def test_filter_logits_hand_computed():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  neg = np.finfo(np.float32).min
  top2 = np.asarray(decode.filter_logits(logits, top_k=2, top_p=1.0))
  assert (top2[0, 2:] == neg).all() and np.isfinite(top2[0, :2]).all() and (top2[0, :2] > neg).all()
  # Mass before each token: 0, .5, .7, .85, .95 -> top_p=0.8 keeps the first three.
  nucleus = np.asarray(decode.filter_logits(logits, top_k=0, top_p=0.8))
  assert (nucleus[0, :3] > neg).all() and (nucleus[0, 3:] == neg).all()
  assert (np.asarray(decode.filter_logits(logits, top_k=0, top_p=0.3))[0, 1:] == neg).all()


@pytest.fixture(scope="module")
def hot(setup):
  _, graphdef, _, _ = setup
  return decode.make_decoder(graphdef, max_new_tokens=MAX_NEW, eos_id=NEVER, pad_id=PAD,
                             sampling=decode.Sampling(temperature=2.0, top_p=0.95, seed=0))  # fmt: skip


def test_stop_ids_match_the_reference_and_top_k_one_is_greedy(setup):
  model, graphdef, state, batch = setup
  free = decode.greedy_decode_reference(
    model, *batch, max_new_tokens=MAX_NEW, eos_id=NEVER, pad_id=PAD
  )
  stop = int(free[0, 2])  # a token row 0 emits at step 2
  greedy = decode.make_decoder(
    graphdef, max_new_tokens=MAX_NEW, eos_id=NEVER, pad_id=PAD, stop_ids=(stop,)
  )
  got = np.asarray(greedy(state, *batch))
  for row, full_row in zip(got, free):
    hits = np.flatnonzero(full_row == stop)
    if hits.size == 0:
      np.testing.assert_array_equal(row, full_row)
    else:
      end = hits[0]
      np.testing.assert_array_equal(row[: end + 1], full_row[: end + 1])
      assert (row[end + 1 :] == PAD).all()
  assert (got[0, 3:] == PAD).all()
  top1 = decode.make_decoder(graphdef, max_new_tokens=MAX_NEW, eos_id=NEVER, pad_id=PAD, stop_ids=(stop,),
                             sampling=decode.Sampling(temperature=1.0, top_k=1, seed=3))  # fmt: skip
  np.testing.assert_array_equal(np.asarray(top1(state, *batch)), got)


def test_sampling_is_seeded_and_batch_size_invariant_given_row_ids(setup, hot):
  model, _, state, (images, tokens, mask, has_image) = setup
  ids = np.arange(100, 100 + B)
  a = np.asarray(hot(state, images, tokens, mask, has_image, ids))
  b = np.asarray(hot(state, images, tokens, mask, has_image, ids, seed=0))
  c = np.asarray(hot(state, images, tokens, mask, has_image, ids, seed=1))
  np.testing.assert_array_equal(a, b)  # same seed, same tokens
  assert (a != c).mean() > 0.3  # another seed, other tokens
  free = decode.greedy_decode_reference(model, images, tokens, mask, has_image, max_new_tokens=MAX_NEW,
                                        eos_id=NEVER, pad_id=PAD)  # fmt: skip
  assert (a != free).mean() > 0.3  # and not greedy
  assert hot.num_traces == 1  # seeds are traced values
  for i in (1, 4):  # short prompts alone, unpadded, with their own ids
    s = P - LENGTHS[i]
    alone = hot(
      state,
      images[i : i + 1],
      tokens[i : i + 1, s:],
      mask[i : i + 1, s:],
      has_image[i : i + 1],
      ids[i : i + 1],
    )
    np.testing.assert_array_equal(np.asarray(alone)[0], a[i])


def test_trim_and_stop_strings():
  assert decode.trim_generated([5, 6, 0, 7, 9, 8], stop_ids=(9,), pad_id=0) == [5, 6, 7]
  assert decode.cut_at_stop_strings("yes.\nUSER: next", ["USER:", "\n\n"]) == "yes.\n"
  assert decode.cut_at_stop_strings("no stop here", ["###"]) == "no stop here"
  with pytest.raises(ValueError, match="top_p must be in"):
    decode.Sampling(temperature=1.0, top_p=0.0)
