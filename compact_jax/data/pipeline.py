"""The grain input pipeline: records -> fixed-shape training batches.

A batch (numpy, host-local) is::

  image      float32[B, S, S, 3]   SigLIP range [-1, 1]; zeros for text-only
  has_image  bool[B]
  tokens     int32[B, T]           T is one of ``seq_buckets``
  mask_ar    int32[B, T]           0 = full-attention prefix, 1 = causal
  mask_loss  int32[B, T]           1 on answer tokens (targets)
  mask_input bool[B, T]            False on padding

With dynamic resolution (``config.model.dynamic_res``, models/anyres.py) each
example carries a global view and its tiles instead of one image::

  image       float32[B, V, S, S, 3] V = Tiling.num_slots: global view, then tiles
                                     row-major; unused slots zeros
  tile_layout int32[B, 4]            rows, cols, image height, image width (px)

Each batch is padded to the smallest bucket that holds its longest example,
so the jitted train step compiles once per bucket. Examples longer than the
largest bucket are truncated, and examples with nothing left to train on are
dropped; both are counted by :func:`analyze` before training starts and
reported, never silently.

With packing (``config.data.pack_length`` > 0, :class:`PackSpec`) examples are
instead packed first-fit-decreasing into rows of a fixed length P, counted
after the image expands into its N LLM tokens; every batch then has one shape
and the step compiles once. A packed batch (:func:`pack_rows`) is::

  image       float32[B, M, S, S, 3] M image slots per row; empty slots zeros
  has_image   bool[B, M]             slot holds an image
  tokens      int32[B, P]            text tokens; 0 at image positions and padding
  mask_ar     int32[B, P]            as above; image positions 0 (the model decides)
  mask_loss   int32[B, P]            as above; 0 at each example's first text token
  mask_input  bool[B, P]             False on padding only (image tokens are valid)
  segment_ids int32[B, P]            1, 2, ... per example in the row, 0 on padding
  positions   int32[B, P]            0, 1, ... restarting with each example
  image_index int32[B, P]            slot * N + k at image token k, -1 elsewhere

Text is truncated to the largest bucket exactly as without packing (the same
examples are kept); an example whose image and text still exceed P is an
error naming the record, raised before training.

The pipeline is a grain ``MapDataset`` end to end (source -> shard -> shuffle
-> repeat -> map -> batch), so it is deterministic for a seed, gives each host
its own shard, and its iterator state is a small JSON-able dict that the
trainer checkpoints with the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from compact_jax.data import image as image_lib
from compact_jax.data import template as template_lib
from compact_jax.data.tokenizer import Tokenizer
from compact_jax.models import anyres

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
  tiling: anyres.Tiling | None = None
  pad_fill: tuple[int, int, int] = image_lib.PAD_FILL

  def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    enc = encode_record(record, self.tokenizer, self.template)
    n = min(len(enc), self.max_len)
    img, layout = image_lib.ImagePreprocessor(self.image_size, self.tiling, self.pad_fill)(
      record["image"] if record["has_image"] else None, where=f"record {record['id']!r}"
    )
    out = {
      "image": img,
      "has_image": np.asarray(bool(record["has_image"])),
      "tokens": enc.tokens[:n],
      "mask_ar": enc.mask_ar[:n],
      "mask_loss": enc.mask_loss[:n],
    }
    if layout is not None:
      out["tile_layout"] = layout
    return out


@dataclasses.dataclass(frozen=True)
class _Collate:
  """Pads a list of examples to the smallest bucket that fits them all."""

  seq_buckets: tuple[int, ...]

  def __call__(self, examples: Sequence[Mapping[str, np.ndarray]]) -> Batch:
    length = _bucket(max(len(e["tokens"]) for e in examples), self.seq_buckets)
    return collate(examples, length)


def collate(examples: Sequence[Mapping[str, np.ndarray]], length: int) -> Batch:
  """Right-pads token fields of ``examples`` to ``length`` and stacks them (and
  ``tile_layout`` when the examples have one)."""
  b = len(examples)
  out: Batch = {
    "image": np.stack([e["image"] for e in examples]),
    "has_image": np.stack([e["has_image"] for e in examples]).astype(bool),
    "tokens": np.zeros((b, length), np.int32),
    "mask_ar": np.ones((b, length), np.int32),
    "mask_loss": np.zeros((b, length), np.int32),
    "mask_input": np.zeros((b, length), bool),
  }
  if "tile_layout" in examples[0]:
    out["tile_layout"] = np.stack([e["tile_layout"] for e in examples]).astype(np.int32)
  for i, e in enumerate(examples):
    n = len(e["tokens"])
    out["tokens"][i, :n] = e["tokens"]
    out["mask_ar"][i, :n] = e["mask_ar"]
    out["mask_loss"][i, :n] = e["mask_loss"]
    out["mask_input"][i, :n] = True
  return out


@dataclasses.dataclass(frozen=True)
class PackSpec:
  """How examples are packed into rows (``config.data.pack_*``).

  Attributes:
    length: P, LLM positions per row, image tokens included.
    max_images: M, image slots per row (the ViT runs on all of them every step).
    window: examples per first-fit-decreasing pass over the shuffled epoch;
      larger fills rows better and costs more host time per epoch.
    num_image_tokens: N, LLM positions one image takes (``VLM.num_image_tokens``).
  """

  length: int
  max_images: int
  window: int
  num_image_tokens: int

  def __post_init__(self):
    for name in ("length", "max_images", "window", "num_image_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"PackSpec.{name} must be >= 1, got {getattr(self, name)}")

  def size(self, num_text: int, has_image: bool) -> int:
    """LLM positions one example takes in a row."""
    return num_text + (self.num_image_tokens if has_image else 0)


def first_fit_decreasing(
  sizes: Sequence[int], images: Sequence[int], *, capacity: int, max_images: int
) -> list[list[int]]:
  """Greedy bin packing: items longest first (ties by index), each into the first
  row with room for both its size and its images.

  Args:
    sizes: positions each item takes.
    images: image slots each item takes (0 or 1).
    capacity: positions per row.
    max_images: image slots per row.

  Returns:
    Rows as lists of item indices, in the order the items were placed.
  """
  sizes = np.asarray(sizes, np.int64)
  images = np.asarray(images, np.int64)
  too_big = np.flatnonzero((sizes > capacity) | (images > max_images))
  if len(too_big):
    i = int(too_big[0])
    raise ValueError(
      f"first_fit_decreasing: item {i} (size {sizes[i]}, {images[i]} image(s)) does not fit "
      f"a row of {capacity} positions and {max_images} image slot(s)"
    )
  # At most one row per item: preallocate and test every open row at once.
  fill = np.zeros(len(sizes), np.int64)
  slots = np.zeros(len(sizes), np.int64)
  rows: list[list[int]] = []
  for i in np.lexsort((np.arange(len(sizes)), -sizes)):
    n = len(rows)
    fits = np.flatnonzero((fill[:n] + sizes[i] <= capacity) & (slots[:n] + images[i] <= max_images))
    r = int(fits[0]) if len(fits) else n
    if r == n:
      rows.append([])
    rows[r].append(int(i))
    fill[r] += sizes[i]
    slots[r] += images[i]
  return rows


class PackingPlan:
  """Which examples every packed batch holds: deterministic for a seed, random access.

  Epoch e shuffles the examples (numpy, seeded by ``(seed, e)``), packs each
  window of ``spec.window`` consecutive ones first-fit-decreasing, and shuffles
  the epoch's rows. Batches take ``batch_size`` rows at a time from the
  epochs' rows laid end to end, so no example is lost at an epoch's end. Only
  example sizes are needed, so batch ``i`` is known without reading any record
  before it; the iterator state stays grain's batch index.

  Args:
    sizes: int[n] positions each example takes (:meth:`PackSpec.size`).
    images: int[n] 1 where the example has an image.
    spec: the packing.
    batch_size: rows per batch.
    seed: shuffle seed.
  """

  _CACHED_EPOCHS = 4

  def __init__(
    self, sizes: np.ndarray, images: np.ndarray, spec: PackSpec, *, batch_size: int, seed: int
  ):
    if not len(sizes):
      raise ValueError("PackingPlan: no examples to pack")
    self.sizes = np.asarray(sizes, np.int64)
    self.images = np.asarray(images, np.int64)
    self.spec = spec
    self.batch_size = batch_size
    self.seed = seed
    self._setup()

  def _setup(self) -> None:
    self._offsets = [0]  # first global row of each epoch computed so far
    self._cache: dict[int, list[list[int]]] = {}
    self._lock = threading.Lock()  # grain may read batches from several threads

  def __getstate__(self) -> dict[str, Any]:
    # Picklable for grain worker processes: the cache and lock are rebuilt.
    return {k: v for k, v in self.__dict__.items() if k not in ("_offsets", "_cache", "_lock")}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._setup()

  def epoch_rows(self, epoch: int) -> list[list[int]]:
    """The rows of ``epoch``, as lists of example indices."""
    rng = np.random.default_rng((self.seed, epoch))
    order = rng.permutation(len(self.sizes))
    rows = []
    for start in range(0, len(order), self.spec.window):
      window = order[start : start + self.spec.window]
      for row in first_fit_decreasing(
        self.sizes[window],
        self.images[window],
        capacity=self.spec.length,
        max_images=self.spec.max_images,
      ):
        rows.append([int(window[j]) for j in row])
    # Decreasing-size packing leaves a window's fullest rows first; shuffling
    # the rows spreads them over the epoch's batches.
    return [rows[k] for k in rng.permutation(len(rows))]

  def _rows(self, epoch: int) -> list[list[int]]:
    if epoch not in self._cache:
      if len(self._cache) >= self._CACHED_EPOCHS:
        del self._cache[min(self._cache)]
      self._cache[epoch] = self.epoch_rows(epoch)
    return self._cache[epoch]

  def batch_rows(self, index: int) -> list[list[int]]:
    """The ``batch_size`` rows of batch ``index`` (example indices per row)."""
    first, end = index * self.batch_size, (index + 1) * self.batch_size
    with self._lock:
      while self._offsets[-1] < end:
        self._offsets.append(self._offsets[-1] + len(self._rows(len(self._offsets) - 1)))
      epoch = int(np.searchsorted(self._offsets, first, side="right")) - 1
      out: list[list[int]] = []
      while len(out) < self.batch_size:
        rows = self._rows(epoch)
        lo = max(first + len(out) - self._offsets[epoch], 0)
        out += rows[lo : lo + self.batch_size - len(out)]
        epoch += 1
    return out


def pack_rows(rows: Sequence[Sequence[Mapping[str, np.ndarray]]], spec: PackSpec) -> Batch:
  """Lays examples out in packed rows (the layout in the module docstring).

  Each example is its image's N tokens (if it has one) followed by its text.
  Its first text token gets no loss weight: an unpacked row never scores it
  (no text precedes it), and here the position before it is an image token or
  the previous example's.

  Args:
    rows: per row, the examples in it (from :class:`_Preprocess`: ``image``,
      ``has_image``, ``tokens``, ``mask_ar``, ``mask_loss``).
    spec: the packing.

  Returns:
    The packed batch, B = len(rows).
  """
  b, length, slots, n_img = len(rows), spec.length, spec.max_images, spec.num_image_tokens
  image_shape = rows[0][0]["image"].shape
  out: Batch = {
    "image": np.zeros((b, slots, *image_shape), np.float32),
    "has_image": np.zeros((b, slots), bool),
    "tokens": np.zeros((b, length), np.int32),
    "mask_ar": np.ones((b, length), np.int32),
    "mask_loss": np.zeros((b, length), np.int32),
    "mask_input": np.zeros((b, length), bool),
    "segment_ids": np.zeros((b, length), np.int32),
    "positions": np.zeros((b, length), np.int32),
    "image_index": np.full((b, length), -1, np.int32),
  }
  for r, row in enumerate(rows):
    at = slot = 0
    for segment, e in enumerate(row, start=1):
      has_image = bool(e["has_image"])
      text = at + (n_img if has_image else 0)
      end = text + len(e["tokens"])
      if end > length or (has_image and slot >= slots):
        raise ValueError(
          f"pack_rows: row {r} overflows at example {segment} ({end} positions of {length}, "
          f"{slot + has_image} image(s) of {slots})"
        )
      if has_image:
        out["image"][r, slot] = e["image"]
        out["has_image"][r, slot] = True
        out["image_index"][r, at:text] = slot * n_img + np.arange(n_img)
        out["mask_ar"][r, at:text] = 0
        slot += 1
      out["tokens"][r, text:end] = e["tokens"]
      out["mask_ar"][r, text:end] = e["mask_ar"]
      out["mask_loss"][r, text:end] = e["mask_loss"]
      out["mask_loss"][r, text] = 0
      out["mask_input"][r, at:end] = True
      out["segment_ids"][r, at:end] = segment
      out["positions"][r, at:end] = np.arange(end - at)
      at = end
  return out


@dataclasses.dataclass(frozen=True)
class _PackedBatch:
  """Batch index -> packed batch: the plan's rows, read and preprocessed."""

  source: RecordSource
  plan: PackingPlan
  preprocess: _Preprocess

  def __call__(self, index: int) -> Batch:
    rows = self.plan.batch_rows(index)
    return pack_rows(
      [[self.preprocess(self.source[i]) for i in row] for row in rows], self.plan.spec
    )


def packing_plan(
  source: RecordSource,
  tokenizer: Tokenizer,
  template: template_lib.ChatTemplate,
  spec: PackSpec,
  *,
  max_text: int,
  batch_size: int,
  seed: int,
) -> PackingPlan:
  """Tokenizes every record of ``source`` for its size and plans the packing.

  Raises:
    ValueError: naming the first record that cannot fit a row even alone.
  """
  sizes, images = [], []
  for i in range(len(source)):
    record = source[i]
    has_image = bool(record["has_image"])
    num_text = min(len(encode_record(record, tokenizer, template)), max_text)
    size = spec.size(num_text, has_image)
    if size > spec.length:
      raise ValueError(
        f"record {record['id']!r}: {size} LLM positions ({num_text} text tokens"
        f"{f' + {spec.num_image_tokens} image tokens' if has_image else ''}) exceed "
        f"data.pack_length={spec.length}; set it to at least "
        f"{spec.num_image_tokens + max_text} (image tokens + the largest seq_bucket)"
      )
    sizes.append(size)
    images.append(int(has_image))
  return PackingPlan(np.asarray(sizes), np.asarray(images), spec, batch_size=batch_size, seed=seed)


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
  pack: PackSpec | None = None,
  tiling: anyres.Tiling | None = None,
  pad_fill: tuple[int, int, int] = image_lib.PAD_FILL,
) -> grain.MapDataset:
  """An infinite, shuffled, host-sharded MapDataset of padded (or packed) batches.

  Args:
    source: decoded records.
    indices: which records to use (from :func:`analyze`).
    tokenizer, template: text encoding.
    image_size: model input resolution.
    batch_size: examples per batch on THIS host.
    seq_buckets: increasing token lengths batches are padded to.
    seed: shuffle seed; each epoch reshuffles deterministically.
    shard_index, shard_count: this host's slice of the data.
    pack: pack examples into rows (``batch_size`` rows per batch) instead of
      padding one example per row to a bucket.
    tiling: dynamic resolution (``config.model.dynamic_res``): each image becomes
      a global view plus tiles, with a ``tile_layout``; None = one image.
    pad_fill: RGB colour of pad-to-square and letterbox padding (``data.pad_fill``).
  """
  if pack is not None and tiling is not None:
    raise ValueError(
      f"data.pack_length={pack.length} (packing) and model.dynamic_res.mode={tiling.mode!r} "
      "cannot be combined yet: packed rows hold one ViT view per image slot. Set one of "
      "them off (data.pack_length=0 or model.dynamic_res.mode='')."
    )
  if len(indices) < shard_count:
    raise ValueError(f"{len(indices)} usable examples cannot feed {shard_count} hosts")
  buckets = tuple(sorted(seq_buckets))
  # Keep only trainable records, then take this host's slice of them.
  shard = _Subset(source, np.asarray(indices, np.int64)[shard_index::shard_count])
  preprocess = _Preprocess(
    tokenizer,
    template,
    image_size,
    buckets[-1],
    tiling,
    image_lib.check_fill(pad_fill, key="data.pad_fill"),
  )
  if pack is not None:
    plan = packing_plan(
      shard, tokenizer, template, pack, max_text=buckets[-1], batch_size=batch_size, seed=seed
    )
    # Batch i is a pure function of i, so grain's iterator state stays the batch index.
    return grain.MapDataset.range(sys.maxsize).map(_PackedBatch(shard, plan, preprocess))
  ds = grain.MapDataset.source(shard).shuffle(seed=seed).repeat(None).map(preprocess)
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
