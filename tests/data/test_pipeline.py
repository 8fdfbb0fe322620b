"""The grain pipeline: buckets, truncation accounting, determinism, resumable state."""

import io

import numpy as np
from PIL import Image

from compact_jax.data import pipeline as pipeline_lib
from compact_jax.data import template as template_lib
from tests import helpers


def _png(colour) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
  return buf.getvalue()


def _records(n=24, long_every=0):
  recs = []
  for i, conv in enumerate(helpers.toy_conversations(n)):
    if long_every and i % long_every == 0:
      # A prompt so long that its answers fall past the largest bucket.
      conv = [{"from": "human", "value": "<image>\n" + "red " * 200}, conv[1]]
    recs.append(
      {
        "id": f"r{i}",
        "image": _png((i * 10, 0, 0)) if i % 5 else b"",
        "has_image": bool(i % 5),
        "conversations": conv,
      }
    )
  return recs


def _make(recs, seed=0, batch_size=4, buckets=(32, 48, 64)):
  tok = helpers.toy_tokenizer("gemma")
  template = template_lib.TEMPLATES["gemma"]
  stats, idx = pipeline_lib.analyze(recs, tok, template, buckets)
  ds = pipeline_lib.make_train_dataset(
    recs, idx, tok, template, image_size=8, batch_size=batch_size, seq_buckets=buckets, seed=seed
  )
  return stats, idx, ds


def test_analyze_counts_truncated_and_dropped():
  recs = _records(24, long_every=6)
  stats, idx, _ = _make(recs)
  long_ids = set(range(0, 24, 6))
  assert stats.examples == 24
  # Long examples exceed the largest bucket and their only answer is cut off.
  assert stats.truncated == len(long_ids)
  assert stats.fully_masked == len(long_ids)
  assert sorted(idx.tolist()) == [i for i in range(24) if i not in long_ids]


def test_batches_are_bucketed_and_masks_consistent():
  _, _, ds = _make(_records(24))
  for i in range(6):
    b = ds[i]
    assert b["tokens"].shape[1] in (32, 48, 64)
    assert b["image"].shape == (4, 8, 8, 3)
    # Padding is never attended to nor trained on, and is zero.
    assert not b["mask_loss"][~b["mask_input"]].any()
    assert (b["tokens"][~b["mask_input"]] == 0).all()
    # Each row: a prefix (ar 0) followed by causal tokens, with answers inside.
    for row in range(4):
      n = b["mask_input"][row].sum()
      ar = b["mask_ar"][row, :n]
      assert (np.diff(ar) >= 0).all() and ar[0] == 0 and b["mask_loss"][row, :n].any()
    # Text-only examples carry a zero image and has_image False.
    assert (b["image"][~b["has_image"]] == 0).all()


def test_same_seed_same_batches_other_seed_differs():
  a = _make(_records(24), seed=1)[2]
  b = _make(_records(24), seed=1)[2]
  c = _make(_records(24), seed=2)[2]
  for i in range(3):
    np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])
  assert any(not np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in range(3))


def test_iterator_state_round_trip_resumes_exactly():
  _, _, ds = _make(_records(24))
  it = pipeline_lib.make_iterator(ds)
  for _ in range(5):
    next(it)
  saved = pipeline_lib.iterator_state_to_json(it)
  expected = [next(it)["tokens"] for _ in range(4)]
  fresh = pipeline_lib.make_iterator(_make(_records(24))[2])
  pipeline_lib.restore_iterator_state(fresh, saved)
  got = [next(fresh)["tokens"] for _ in range(4)]
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(e, g)


def test_host_shards_are_disjoint_and_cover_the_data():
  recs = _records(24)
  tok = helpers.toy_tokenizer("gemma")
  template = template_lib.TEMPLATES["gemma"]
  _, idx = pipeline_lib.analyze(recs, tok, template, (64,))
  seen = []
  for shard in range(2):
    ds = pipeline_lib.make_train_dataset(
      recs,
      idx,
      tok,
      template,
      image_size=8,
      batch_size=1,
      seq_buckets=(64,),
      seed=0,
      shard_index=shard,
      shard_count=2,
    )
    seen.append({(*tuple(ds[i]["tokens"][0]), float(ds[i]["image"].sum())) for i in range(12)})
  assert not (seen[0] & seen[1])
  assert len(seen[0] | seen[1]) == 24
