"""The grain input pipeline: records -> fixed-shape training batches.

A batch (numpy, host-local) is::

  image      float32[B, S, S, 3]   SigLIP range [-1, 1]; zeros for text-only
  has_image  bool[B]
  tokens     int32[B, T]           T is one of ``seq_buckets``
  mask_ar    int32[B, T]           0 = full-attention prefix, 1 = causal
  mask_loss  int32[B, T]           1 on answer tokens (targets)
  mask_input bool[B, T]            False on padding

Each batch is padded to the smallest bucket that holds its longest example,
so the jitted train step compiles once per bucket. Examples longer than the
largest bucket are truncated, and examples with nothing left to train on are
dropped; both are counted by :func:`analyze` before training starts and
reported, never silently.

The pipeline is a grain ``MapDataset`` end to end (source -> shard -> shuffle
-> repeat -> map -> batch), so it is deterministic for a seed, gives each host
its own shard, and its iterator state is a small JSON-able dict that the
trainer checkpoints with the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from compact_jax.data import image as image_lib
from compact_jax.data import template as template_lib
from compact_jax.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


class RecordSource(Protocol):
  """Random access to decoded records (see compact_jax/data/tfds_io.py)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Mapping[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class SplitStats:
  """What tokenization does to a split, computed before training."""

  examples: int
  kept: int
  truncated: int  # longer than the largest bucket, cut (still trained on)
  fully_masked: int  # no answer token left after truncation: dropped
  length_percentiles: dict[str, int]  # p50 / p90 / p99 / max, in tokens
  bucket_counts: dict[str, int]  # examples per bucket (before batching)

  def summary(self) -> str:
    return (
      f"{self.examples} examples, {self.kept} kept; {self.truncated} truncated to the largest "
      f"bucket, {self.fully_masked} dropped as fully masked; lengths {self.length_percentiles}; "
      f"per bucket {self.bucket_counts}"
    )


def _bucket(length: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if length <= b:
      return b
  return buckets[-1]


def encode_record(
  record: Mapping[str, Any], tokenizer: Tokenizer, template: template_lib.ChatTemplate
) -> template_lib.Encoded:
  return template_lib.encode_conversation(
    record["conversations"], tokenizer, template, where=f"record {record['id']!r}"
  )


def analyze(
  source: RecordSource,
  tokenizer: Tokenizer,
  template: template_lib.ChatTemplate,
  seq_buckets: Sequence[int],
) -> tuple[SplitStats, np.ndarray]:
  """Tokenizes every record once; returns stats and the indices worth training on."""
  max_len = seq_buckets[-1]
  lengths, kept = [], []
  truncated = fully_masked = 0
  for i in range(len(source)):
    enc = encode_record(source[i], tokenizer, template)
    lengths.append(len(enc))
    if len(enc) > max_len:
      truncated += 1
    # Targets are tokens[1:]: a loss token at position 0 is never scored.
    if not enc.mask_loss[1:max_len].any():
      fully_masked += 1
      continue
    kept.append(i)
  arr = np.asarray(lengths or [0])
  pct = {f"p{p}": int(np.percentile(arr, p)) for p in (50, 90, 99)} | {"max": int(arr.max())}
  counts: dict[str, int] = {}
  for n in arr:
    key = str(_bucket(int(n), seq_buckets))
    counts[key] = counts.get(key, 0) + 1
  stats = SplitStats(
    examples=len(source),
    kept=len(kept),
    truncated=truncated,
    fully_masked=fully_masked,
    length_percentiles=pct,
    bucket_counts=counts,
  )
  return stats, np.asarray(kept, np.int64)


@dataclasses.dataclass(frozen=True)
class _Subset:
  """The records of ``source`` at ``indices``, as a random-access source."""

  source: RecordSource
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> Mapping[str, Any]:
    return self.source[int(self.indices[i])]


@dataclasses.dataclass(frozen=True)
class _Preprocess:
  """Record -> one unpadded example (a picklable callable for grain workers)."""

  tokenizer: Tokenizer
  template: template_lib.ChatTemplate
  image_size: int
  max_len: int

  def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    enc = encode_record(record, self.tokenizer, self.template)
    n = min(len(enc), self.max_len)
    if record["has_image"]:
      img = image_lib.preprocess_image(
        record["image"], self.image_size, where=f"record {record['id']!r}"
      )
    else:
      img = np.zeros((self.image_size, self.image_size, 3), np.float32)
    return {
      "image": img,
      "has_image": np.asarray(bool(record["has_image"])),
      "tokens": enc.tokens[:n],
      "mask_ar": enc.mask_ar[:n],
      "mask_loss": enc.mask_loss[:n],
    }


@dataclasses.dataclass(frozen=True)
class _Collate:
  """Pads a list of examples to the smallest bucket that fits them all."""

  seq_buckets: tuple[int, ...]

  def __call__(self, examples: Sequence[Mapping[str, np.ndarray]]) -> Batch:
    length = _bucket(max(len(e["tokens"]) for e in examples), self.seq_buckets)
    return collate(examples, length)


def collate(examples: Sequence[Mapping[str, np.ndarray]], length: int) -> Batch:
  """Right-pads token fields of ``examples`` to ``length`` and stacks them."""
  b = len(examples)
  out: Batch = {
    "image": np.stack([e["image"] for e in examples]),
    "has_image": np.stack([e["has_image"] for e in examples]).astype(bool),
    "tokens": np.zeros((b, length), np.int32),
    "mask_ar": np.ones((b, length), np.int32),
    "mask_loss": np.zeros((b, length), np.int32),
    "mask_input": np.zeros((b, length), bool),
  }
  for i, e in enumerate(examples):
    n = len(e["tokens"])
    out["tokens"][i, :n] = e["tokens"]
    out["mask_ar"][i, :n] = e["mask_ar"]
    out["mask_loss"][i, :n] = e["mask_loss"]
    out["mask_input"][i, :n] = True
  return out


def make_train_dataset(
  source: RecordSource,
  indices: np.ndarray,
  tokenizer: Tokenizer,
  template: template_lib.ChatTemplate,
  *,
  image_size: int,
  batch_size: int,
  seq_buckets: Sequence[int],
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.MapDataset:
  """An infinite, shuffled, host-sharded MapDataset of padded batches.

  Args:
    source: decoded records.
    indices: which records to use (from :func:`analyze`).
    tokenizer, template: text encoding.
    image_size: model input resolution.
    batch_size: examples per batch on THIS host.
    seq_buckets: increasing token lengths batches are padded to.
    seed: shuffle seed; each epoch reshuffles deterministically.
    shard_index, shard_count: this host's slice of the data.
  """
  if len(indices) < shard_count:
    raise ValueError(f"{len(indices)} usable examples cannot feed {shard_count} hosts")
  buckets = tuple(sorted(seq_buckets))
  # Keep only trainable records, then take this host's slice of them.
  ds = grain.MapDataset.source(_Subset(source, np.asarray(indices, np.int64)))
  ds = ds[shard_index::shard_count]
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.map(_Preprocess(tokenizer, template, image_size, buckets[-1]))
  return ds.batch(batch_size, drop_remainder=True, batch_fn=_Collate(buckets))


def make_iterator(ds: grain.MapDataset, *, num_threads: int = 1) -> grain.DatasetIterator:
  """An iterator whose state (``get_state``/``set_state``) can be checkpointed."""
  return iter(
    ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2))
  )


def iterator_state_to_json(it: grain.DatasetIterator) -> str:
  return json.dumps(it.get_state(), sort_keys=True)


def restore_iterator_state(it: grain.DatasetIterator, state_json: str) -> None:
  state = json.loads(state_json)
  logging.info("Restoring data iterator state %s", state)
  it.set_state(state)
