"""TFDS builder that packages LLaVA conversation records and their images as array_record.

One builder serves every record set (the tiny world, COMPACT output, LLaVA-665K mixes). It
writes ``array_record`` by default so that grain gets random access, and it runs without
TensorFlow: TFDS 4.9.10 can prepare array_record TF-free only with Tensor/Text/bytes features
(``tfds.features.Image`` and nested ``Sequence(Sequence(...))`` need TF to encode), so images
are stored as their original encoded bytes, validated by a full PIL decode at build time and
decoded later in the input pipeline.

Features of one example (see :func:`encode_record` / :func:`decode_example`):

* ``id`` Text; ``image`` bytes (encoded file, ``b""`` for text-only); ``image_path`` Text
  (the record's ``image`` value, ``""`` if absent); ``has_image`` bool;
* ``conversations`` Sequence of ``{from, value, capability, has_capability, extra}``:
  ``capability`` is the turn's canonical (sorted, deduplicated) names joined by ``+``, the
  same spelling as ``config.world.heldout_combinations``; ``has_capability`` tells an absent
  key from an empty list; ``extra`` is a JSON object of the turn's other keys (``""`` if none);
* ``k`` int32 (-1 if absent); ``source`` Text (``""`` if absent); ``extra`` JSON object of
  the record's other keys (``""`` if none).

Examples keep the input order (``disable_shuffling``; keys are running indices per split), so
``source[i]`` is the i-th accepted record. Duplicate ids within a split are always an error,
even with ``skip_bad_records``: COMPACT restarts ids at ``llava_0`` on every run, so a
duplicate means a mix was not re-id'd, and keeping either copy silently would be a guess. Ids
shared between splits are only reported.

Programmatic use (what the launcher's build stage does, via
``compact_jax.data.tfds_io.build_dataset``)::

  config = LlavaRecordsConfig(name="tiny_world", records={"train": ["a.jsonl"]},
                              image_roots=["images"], skip_bad_records=False)
  LlavaRecords(data_dir=out, config=config).download_and_prepare()

Command line. The ``tfds`` entry point of TFDS 4.9.10 imports TensorFlow, apache-beam and
mlcroissant at startup (for other subcommands), so it needs ``pip install tensorflow-cpu
apache-beam mlcroissant`` next to this package; the build itself never touches them. All three
forms below were run that way (tensorflow-cpu 2.21, apache-beam 2.77) and read back TF-free:

* manual dir: put ``{split}.json`` or ``{split}.jsonl`` (any split names) and the images they
  name in one directory, then::

    tfds build tfds_builders/llava_records --manual_dir=DIR --data_dir=OUT

  This builds the ``manual`` config (images are looked up under DIR) into
  ``OUT/llava_records/manual/1.0.0``.
* explicit inputs, as a JSON config (TFDS rebuilds the config from it)::

    tfds build tfds_builders/llava_records --data_dir=OUT --config='{"name": "mix",
      "records": {"train": ["/d/train.json"]}, "image_roots": ["/d/images"],
      "skip_bad_records": true}'

  A JSON config without ``records`` reads the manual dir as above (``image_roots`` then
  defaults to the manual dir).
* the installed package also works as ``tfds build llava_records
  --imports=tfds_builders.llava_records``.

The builder defaults to ``file_format="array_record"``; ``--file_format=tfrecord`` is honoured
(TF users) but grain cannot read it. Read the result with
``compact_jax.data.tfds_io.load_split(OUT, split, name=<config name>)``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from compact_jax import capabilities as capabilities_lib
from compact_jax.data import records as records_lib

CAPABILITY_SEPARATOR = "+"
_TURN_KEYS = ("from", "value", "capability")
_RECORD_KEYS = ("id", "image", "conversations", "k", "source")
# Record files per split in the manual dir; the split name is the file stem.
_MANUAL_SUFFIXES = (".json", ".jsonl")
_SPLIT_NAME = re.compile(r"^\w+$")
# Images are read and decode-checked this many at a time on a small thread pool (PIL decodes
# with the GIL released), which bounds memory on large record sets.
_IMAGE_WINDOW = 64
_IMAGE_THREADS = 4
# How many skipped records a printed report lists before summarising.
_REPORT_MAX_SKIPPED = 20


@dataclasses.dataclass(eq=False)
class LlavaRecordsConfig(tfds.core.BuilderConfig):
  """What to package.

  Attributes:
    records: split name -> record files (JSON array, JSONL or COMPACT concatenated arrays),
      concatenated in the order given. Empty: read ``{split}.json|jsonl`` from the manual dir.
    image_roots: directories searched in order for each record's ``image``. Empty with
      ``records`` given: no record may have an image; empty in manual mode: the manual dir.
    skip_bad_records: skip (and report) records that fail validation or whose image is
      missing or undecodable, instead of failing. Duplicate ids still fail.
  """

  records: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  image_roots: Sequence[str] = ()
  skip_bad_records: bool = False

  def __post_init__(self):
    # JSON configs from the CLI arrive with lists and plain strings; paths may be Path objects.
    self.records = {str(s): tuple(str(p) for p in files) for s, files in self.records.items()}
    self.image_roots = tuple(str(r) for r in self.image_roots)
    for split, files in self.records.items():
      if not _SPLIT_NAME.match(split):
        raise ValueError(f"Split name {split!r} must be letters, digits and underscores")
      if not files:
        raise ValueError(f"Split {split!r} lists no record files")


@dataclasses.dataclass
class SplitCounts:
  """What one split holds after a build.

  Attributes:
    records: records written.
    turns: conversation turns in them.
    with_image: records with an image.
    text_only: records without one.
    skipped: bad records left out (``skip_bad_records``).
    by_k: records per ``k`` (-1: no ``k``), keys as strings so the report is plain JSON.
  """

  records: int = 0
  turns: int = 0
  with_image: int = 0
  text_only: int = 0
  skipped: int = 0
  by_k: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SkippedRecord:
  """A record left out of the build, and why (the message names file, line and id)."""

  split: str
  reason: str


@dataclasses.dataclass
class BuildReport:
  """The outcome of a build, stored in the dataset's ``metadata.json``.

  Attributes:
    data_path: the prepared dataset's directory (set when read back, not stored).
    splits: per-split counts.
    skipped: every record left out, in input order.
    shared_ids: how many ids occur in more than one split (leakage check, not an error).
    shared_id_examples: a few of them.
    reused: True when ``build_dataset`` found the dataset already prepared.
  """

  data_path: str = ""
  splits: dict[str, SplitCounts] = dataclasses.field(default_factory=dict)
  skipped: list[SkippedRecord] = dataclasses.field(default_factory=list)
  shared_ids: int = 0
  shared_id_examples: list[str] = dataclasses.field(default_factory=list)
  reused: bool = False

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    # Properties of where and how it is read, not of the dataset (which may be moved).
    del out["data_path"], out["reused"]
    return out

  @classmethod
  def from_json(
    cls, d: Mapping[str, Any], *, data_path: str = "", reused: bool = False
  ) -> BuildReport:
    return cls(
      data_path=data_path,
      splits={s: SplitCounts(**c) for s, c in d["splits"].items()},
      skipped=[SkippedRecord(**s) for s in d["skipped"]],
      shared_ids=d["shared_ids"],
      shared_id_examples=list(d["shared_id_examples"]),
      reused=reused,
    )

  def format(self) -> str:
    """A human-readable table of the counts, then the skipped records."""
    state = "reused" if self.reused else "built"
    lines = [f"TFDS dataset {state}: {self.data_path}"]
    header = ("split", "records", "turns", "with_image", "text_only", "skipped", "by_k")
    rows = [header]
    for split, c in self.splits.items():
      by_k = ", ".join(f"{k}:{n}" for k, n in sorted(c.by_k.items(), key=lambda kv: int(kv[0])))
      rows.append((split, c.records, c.turns, c.with_image, c.text_only, c.skipped, by_k))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for r in rows:
      lines.append("  " + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    if self.shared_ids:
      lines.append(
        f"  warning: {self.shared_ids} id(s) occur in more than one split, "
        f"e.g. {self.shared_id_examples}"
      )
    if self.skipped:
      lines.append(f"  skipped {len(self.skipped)} bad record(s):")
      for s in self.skipped[:_REPORT_MAX_SKIPPED]:
        lines.append(f"    [{s.split}] {s.reason}")
      if len(self.skipped) > _REPORT_MAX_SKIPPED:
        lines.append(f"    ... and {len(self.skipped) - _REPORT_MAX_SKIPPED} more")
    return "\n".join(lines)


def input_fingerprint(records: Mapping[str, Sequence[str]], skip_bad_records: bool) -> str:
  """sha256 over the record files' bytes (per split, in order) and the skip policy.

  Images are not hashed (too many); a build reused over edited images needs ``overwrite``.
  """
  h = hashlib.sha256()
  h.update(json.dumps({"version": str(LlavaRecords.VERSION), "skip": skip_bad_records}).encode())
  for split in sorted(records):
    h.update(f"\0split {split}\0".encode())
    for path in records[split]:
      file_hash = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          file_hash.update(chunk)
      h.update(file_hash.digest())
  return h.hexdigest()


def check_image(data: bytes) -> None:
  """Fully decodes encoded image bytes; raises if PIL cannot (truncated, corrupt, not an image).

  ``load()`` rather than ``verify()``: verify does not decode pixels, and a truncated JPEG
  passes it (PIL 13), to fail later inside a training run.
  """
  with PIL.Image.open(io.BytesIO(data)) as im:
    im.load()


def _json_or_empty(d: Mapping[str, Any]) -> str:
  # ensure_ascii keeps lone surrogates and other oddities representable as Text.
  return json.dumps(d, sort_keys=True) if d else ""


def encode_record(record: Mapping[str, Any], image: bytes) -> dict[str, Any]:
  """A validated record and its image bytes -> a TFDS example (see the module docstring)."""
  turns = []
  for turn in record["conversations"]:
    caps = turn.get("capability")
    turns.append(
      {
        "from": turn["from"],
        "value": turn["value"],
        "capability": CAPABILITY_SEPARATOR.join(capabilities_lib.canonical(caps or ())),
        "has_capability": "capability" in turn,
        "extra": _json_or_empty({k: v for k, v in turn.items() if k not in _TURN_KEYS}),
      }
    )
  return {
    "id": records_lib.record_id(record),
    "image": image,
    "image_path": record.get("image", ""),
    "has_image": "image" in record,
    "conversations": turns,
    "k": np.int32(record.get("k", -1)),
    "source": record.get("source", ""),
    "extra": _json_or_empty({k: v for k, v in record.items() if k not in _RECORD_KEYS}),
  }


def _text(value: bytes | str) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_example(example: Mapping[str, Any]) -> dict[str, Any]:
  """A TFDS example as read from array_record -> a python record.

  Returns ``{"id": str, "image": bytes, "image_path": str, "has_image": bool,
  "conversations": [{"from", "value", "capability" (if the source turn had it), ...turn
  extras}], "k": int, "source": str, ...record extras}``.
  """
  convs = example["conversations"]
  turns = []
  for i in range(len(convs["from"])):
    turn: dict[str, Any] = {"from": _text(convs["from"][i]), "value": _text(convs["value"][i])}
    if bool(convs["has_capability"][i]):
      caps = _text(convs["capability"][i])
      turn["capability"] = caps.split(CAPABILITY_SEPARATOR) if caps else []
    extra = _text(convs["extra"][i])
    if extra:
      turn.update(json.loads(extra))
    turns.append(turn)
  out: dict[str, Any] = {
    "id": _text(example["id"]),
    "image": bytes(example["image"]),
    "image_path": _text(example["image_path"]),
    "has_image": bool(example["has_image"]),
    "conversations": turns,
    "k": int(example["k"]),
    "source": _text(example["source"]),
  }
  extra = _text(example["extra"])
  if extra:
    out.update(json.loads(extra))
  return out


@dataclasses.dataclass(frozen=True)
class _Item:
  """A record that passed validation, waiting for its image to be read."""

  where: str
  record: Mapping[str, Any]
  image_file: pathlib.Path | None


class LlavaRecords(tfds.core.GeneratorBasedBuilder):
  """LLaVA conversation records (any source) with their images, for random access."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
    LlavaRecordsConfig(
      name="manual", description="{split}.json|jsonl and their images from --manual_dir."
    )
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put one record file per split in the manual dir, named {split}.json or {split}.jsonl
  (JSON array, JSONL, or COMPACT's concatenated one-element arrays), and the images the
  records name, at those paths relative to the manual dir.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 finds this file through `importlib_resources`, which it declares only for
    # Python < 3.9, so preparing any builder defined in a package fails with
    # ModuleNotFoundError (tensorflow/datasets#11212, open). This is TFDS's own fallback.
    return epath.Path(__file__)

  def __init__(self, *, file_format: str | None = None, **kwargs: Any):
    # array_record is what grain reads and the only format TFDS writes without TensorFlow.
    super().__init__(file_format=file_format or "array_record", **kwargs)
    self._report = BuildReport()

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__.split("\n\n")[0],
      features=tfds.features.FeaturesDict(
        {
          "id": text(),
          "image": tfds.features.Tensor(shape=(), dtype=np.object_),
          "image_path": text(),
          "has_image": tfds.features.Tensor(shape=(), dtype=np.bool_),
          "conversations": tfds.features.Sequence(
            {
              "from": text(),
              "value": text(),
              "capability": text(),
              "has_capability": tfds.features.Tensor(shape=(), dtype=np.bool_),
              "extra": text(),
            }
          ),
          "k": tfds.features.Tensor(shape=(), dtype=np.int32),
          "source": text(),
          "extra": text(),
        }
      ),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(),
    )

  def _inputs(self, dl_manager) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """(split -> record files, image roots), from the config or the manual dir."""
    cfg: LlavaRecordsConfig = self.builder_config
    if cfg.records:
      return dict(cfg.records), tuple(cfg.image_roots)
    manual = pathlib.Path(dl_manager.manual_dir)
    records: dict[str, tuple[str, ...]] = {}
    for path in sorted(manual.iterdir()):
      if path.suffix in _MANUAL_SUFFIXES and path.is_file():
        if path.stem in records:
          raise ValueError(
            f"Manual dir {manual} has two record files for split {path.stem!r}: "
            f"{records[path.stem][0]} and {path}"
          )
        if not _SPLIT_NAME.match(path.stem):
          raise ValueError(f"Record file {path}: split name {path.stem!r} is not \\w+")
        records[path.stem] = (str(path),)
    if not records:
      raise ValueError(
        f"Manual dir {manual} holds no {{split}}.json or {{split}}.jsonl record files"
      )
    return records, tuple(cfg.image_roots) or (str(manual),)

  def _split_generators(self, dl_manager):
    records, roots = self._inputs(dl_manager)
    skip = self.builder_config.skip_bad_records
    self._report = BuildReport()
    items: dict[str, list[_Item]] = {}
    ids_by_split: dict[str, set[str]] = {}
    for split, files in records.items():
      counts = self._report.splits.setdefault(split, SplitCounts())

      def skipped(err: records_lib.RecordError, split=split, counts=counts) -> None:
        if not skip:
          raise err
        counts.skipped += 1
        self._report.skipped.append(SkippedRecord(split=split, reason=str(err)))

      items[split] = self._validate_split(split, files, roots, skipped)
      ids_by_split[split] = {records_lib.record_id(item.record) for item in items[split]}
      if not items[split]:
        raise records_lib.RecordError(
          f"split {split!r} has no valid records ({counts.skipped} skipped)",
          where=", ".join(files),
        )
    id_splits = collections.Counter(i for ids in ids_by_split.values() for i in ids)
    shared = sorted(i for i, n in id_splits.items() if n > 1)
    self._report.shared_ids = len(shared)
    self._report.shared_id_examples = shared[:5]
    self.info.metadata["inputs"] = {
      "records": {s: list(f) for s, f in records.items()},
      "image_roots": list(roots),
      "skip_bad_records": skip,
    }
    self.info.metadata["fingerprint"] = input_fingerprint(records, skip)
    return {
      split: self._generate_examples(split, split_items) for split, split_items in items.items()
    }

  def _validate_split(self, split, files, roots, skipped) -> list[_Item]:
    """Parses, validates and locates the images of one split's records; no image is read."""
    skip = self.builder_config.skip_bad_records
    items: list[_Item] = []
    first_seen: dict[str, str] = {}
    for path in files:
      for located in records_lib.iter_records(path, on_error=skipped if skip else None):
        record, where = located.record, located.where
        # Duplicates are checked on every record with a usable id, before anything else,
        # so that skip mode never turns "two records claim one id" into "keep one of them".
        rid = records_lib.record_id(record)
        if rid is not None:
          if rid in first_seen:
            raise records_lib.RecordError(
              f"duplicate id in split {split!r} (first at {first_seen[rid]}); ids must be "
              "unique per split (re-id merged sources)",
              where=where,
              record_id=rid,
            )
          first_seen[rid] = where
        try:
          records_lib.validate_record(record, where=where)
          image_file = None
          if "image" in record:
            image_file = records_lib.resolve_image(
              record["image"], roots, record_id=rid, where=where
            )
        except records_lib.RecordError as err:
          skipped(err)
          continue
        items.append(_Item(where=where, record=record, image_file=image_file))
    return items

  def _generate_examples(self, split: str, items: list[_Item]) -> Iterator:
    skip = self.builder_config.skip_bad_records
    counts = self._report.splits[split]

    def load(item: _Item) -> bytes | records_lib.RecordError:
      if item.image_file is None:
        return b""
      try:
        data = item.image_file.read_bytes()
        check_image(data)
      except Exception as e:  # PIL raises many types for bad data
        return records_lib.RecordError(
          f"image {item.record['image']!r} ({item.image_file}) cannot be decoded: "
          f"{type(e).__name__}: {e}",
          where=item.where,
          record_id=records_lib.record_id(item.record),
        )
      return data

    key = 0
    with concurrent.futures.ThreadPoolExecutor(_IMAGE_THREADS) as pool:
      for start in range(0, len(items), _IMAGE_WINDOW):
        window = items[start : start + _IMAGE_WINDOW]
        for item, image in zip(window, pool.map(load, window)):
          if isinstance(image, records_lib.RecordError):
            if not skip:
              raise image
            counts.skipped += 1
            self._report.skipped.append(SkippedRecord(split=split, reason=str(image)))
            continue
          example = encode_record(item.record, image)
          counts.records += 1
          counts.turns += len(example["conversations"])
          counts.with_image += bool(example["has_image"])
          counts.text_only += not example["has_image"]
          k = str(int(example["k"]))
          counts.by_k[k] = counts.by_k.get(k, 0) + 1
          yield key, example
          key += 1
    if counts.records == 0:
      raise records_lib.RecordError(
        f"split {split!r}: every record was skipped ({counts.skipped}); nothing to write"
      )
    # The info (with this metadata) is written only after every split has been generated,
    # inside TFDS's temporary directory, so the report lands atomically with the data.
    self.info.metadata["build_report"] = self._report.to_json()
    logging.info("llava_records split %r: %s", split, counts)
