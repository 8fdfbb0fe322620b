"""Build and read the TFDS ``llava_records`` datasets, without TensorFlow.

``build_dataset`` packages record files (per split) and image roots with the
``tfds_builders.llava_records`` builder into array_record files under
``data_dir/llava_records/<name>/<version>/``; ``name`` is the builder config's name, so one
``data_dir`` can hold several record sets. ``load_split`` gives random access
(``__len__``, ``__getitem__``) to decoded python records, which is what grain's
``MapDataset.source`` takes.

Reruns: a finished dataset is reused unless ``overwrite``. TFDS writes into an
``incomplete.*`` directory and renames it only after every split and ``dataset_info.json``
are written, so an interrupted build never looks finished; leftovers of a killed build are
removed before the next one. A reused dataset must come from the same record files (a sha256
of their bytes and the skip policy is stored with it); otherwise ``StaleDatasetError``.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, SupportsIndex

import tensorflow_datasets as tfds

from tfds_builders.llava_records import llava_records as builder_lib

BuildReport = builder_lib.BuildReport
SplitCounts = builder_lib.SplitCounts
SkippedRecord = builder_lib.SkippedRecord

PathLike = str | os.PathLike[str]
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
# TFDS's constant; its temporary build directories are "incomplete.<random>_<version>".
_INCOMPLETE_PREFIX = "incomplete."


class StaleDatasetError(RuntimeError):
  """A prepared dataset exists but was built from other record files or another skip policy."""


def dataset_path(data_dir: PathLike, name: str = "llava_records") -> pathlib.Path:
  """Where ``build_dataset(..., data_dir, name=name)`` puts the prepared dataset."""
  _check_name(name)
  version = str(builder_lib.LlavaRecords.VERSION)
  return pathlib.Path(data_dir) / builder_lib.LlavaRecords.name / name / version


def _check_name(name: str, *, building: bool = False) -> None:
  if not _NAME.match(name):
    raise ValueError(f"Dataset name {name!r} must match {_NAME.pattern}")
  reserved = [c.name for c in builder_lib.LlavaRecords.BUILDER_CONFIGS]
  if building and name in reserved:
    # TFDS refuses a custom config named like a predefined one.
    raise ValueError(f"Dataset name {name!r} is reserved for `tfds build` ({reserved})")


def _interrupted_builds(path: pathlib.Path) -> list[pathlib.Path]:
  if not path.parent.is_dir():
    return []
  pattern = f"{_INCOMPLETE_PREFIX}*_{path.name}"
  return sorted(p for p in path.parent.glob(pattern) if p.is_dir())


def read_report(data_dir: PathLike, name: str = "llava_records") -> BuildReport:
  """The report stored with a finished build.

  Raises:
    FileNotFoundError: when there is no finished build (the message mentions an interrupted
      one if its leftovers exist).
  """
  path = dataset_path(data_dir, name)
  builder = _finished_builder(path)
  return BuildReport.from_json(builder.info.metadata["build_report"], data_path=str(path))


def _finished_builder(path: pathlib.Path) -> tfds.core.DatasetBuilder:
  if not (path / "dataset_info.json").is_file():
    hint = ""
    if _interrupted_builds(path):
      hint = f" (found leftovers of an interrupted build next to it: {_interrupted_builds(path)})"
    state = "is not a finished build" if path.exists() else "does not exist"
    raise FileNotFoundError(f"TFDS dataset {path} {state}{hint}; run the build stage")
  builder = tfds.builder_from_directory(path)
  if "build_report" not in builder.info.metadata:
    raise FileNotFoundError(f"TFDS dataset {path} was not written by the llava_records builder")
  return builder


def build_dataset(
  records: Mapping[str, Sequence[PathLike]],
  image_roots: Sequence[PathLike],
  data_dir: PathLike,
  *,
  name: str = "llava_records",
  skip_bad_records: bool = False,
  overwrite: bool = False,
) -> BuildReport:
  """Packages record files and their images as a TFDS array_record dataset; prints a report.

  Args:
    records: split name -> record files (JSON array, JSONL, COMPACT concatenated arrays),
      concatenated in order.
    image_roots: directories searched in order for each record's ``image``.
    data_dir: TFDS data dir; the dataset goes to :func:`dataset_path`.
    name: the record set's name (TFDS config name).
    skip_bad_records: leave out (and report) invalid records and records whose image is
      missing, escapes its root or does not decode. Duplicate ids within a split are an
      error regardless.
    overwrite: rebuild even if a finished dataset exists.

  Returns:
    Per-split counts and the skipped records; ``reused`` tells whether nothing was built.

  Raises:
    RecordError: a bad record file or record (naming file, position and id).
    FileNotFoundError: a record file or an image root does not exist.
    StaleDatasetError: a finished dataset exists for other inputs and ``overwrite`` is False.
  """
  _check_name(name, building=True)
  path = dataset_path(data_dir, name)
  files = {
    split: tuple(str(pathlib.Path(p).absolute()) for p in ps) for split, ps in records.items()
  }
  if not files:
    raise ValueError("build_dataset needs at least one split of record files")
  for split, ps in files.items():
    for p in ps:
      if not os.path.isfile(p):
        raise FileNotFoundError(f"Record file {p} (split {split!r}) does not exist")
  for root in image_roots:
    if not os.path.isdir(root):
      raise FileNotFoundError(f"Image root {root} is not a directory")
  fingerprint = builder_lib.input_fingerprint(files, skip_bad_records)

  if path.exists() and not overwrite:
    builder = _finished_builder(path)
    if builder.info.metadata.get("fingerprint") != fingerprint:
      raise StaleDatasetError(
        f"TFDS dataset {path} was built from other inputs "
        f"({builder.info.metadata.get('inputs')}) than now ({files}, "
        f"skip_bad_records={skip_bad_records}); pass overwrite=True (--overwrite) to rebuild"
      )
    report = BuildReport.from_json(
      builder.info.metadata["build_report"], data_path=str(path), reused=True
    )
    print(report.format())
    return report

  # Only the launcher builds into its data dir, so leftovers are from a killed run.
  for leftover in _interrupted_builds(path):
    shutil.rmtree(leftover)
  if path.exists():
    shutil.rmtree(path)
  config = builder_lib.LlavaRecordsConfig(
    name=name,
    description=f"Record sets {sorted(files)} packaged by compact_jax.data.tfds_io.",
    records=files,
    image_roots=tuple(str(pathlib.Path(r).absolute()) for r in image_roots),
    skip_bad_records=skip_bad_records,
  )
  builder = builder_lib.LlavaRecords(data_dir=data_dir, config=config)
  builder.download_and_prepare(file_format="array_record")
  report = BuildReport.from_json(builder.info.metadata["build_report"], data_path=str(path))
  print(report.format())
  return report


class RecordSource:
  """Random access to one split's decoded records (a grain ``RandomAccessDataSource``).

  ``source[i]`` is the i-th record written for the split (input order, bad records skipped),
  as returned by ``tfds_builders.llava_records.decode_example``.
  """

  def __init__(self, data_source: Any, *, description: str):
    self._source = data_source
    self._description = description

  def __len__(self) -> int:
    return len(self._source)

  def _index(self, i: SupportsIndex) -> int:
    n = len(self._source)
    j = i.__index__()
    if j < 0:
      j += n
    if not 0 <= j < n:
      raise IndexError(f"index {i} out of range for {self._description} ({n} records)")
    return j

  def __getitem__(self, i: SupportsIndex) -> dict[str, Any]:
    return builder_lib.decode_example(self._source[self._index(i)])

  def __getitems__(self, indices: Sequence[SupportsIndex]) -> list[dict[str, Any]]:
    examples = self._source.__getitems__([self._index(i) for i in indices])
    return [builder_lib.decode_example(e) for e in examples]

  def __repr__(self) -> str:
    return f"RecordSource({self._description}, {len(self)} records)"


def load_split(data_dir: PathLike, split: str, *, name: str = "llava_records") -> RecordSource:
  """Random access to a prepared split's records, decoded; needs no TensorFlow.

  Each record is ``{"id": str, "image": bytes (b"" if none), "image_path": str, "has_image":
  bool, "conversations": [{"from", "value", "capability" (if the source had it), ...}],
  "k": int (-1 if absent), "source": str ("" if absent), ...other keys of the source record}``.
  Compared with the source record: ``image`` holds the bytes and ``image_path`` the path,
  ``has_image``/``k``/``source`` are always present, an int id is a string, and capability
  lists are sorted and deduplicated.

  Args:
    data_dir: the TFDS data dir given to :func:`build_dataset`.
    split: a split name; TFDS slicing (``"train[:10%]"``) also works.
    name: the record set's name.

  Raises:
    FileNotFoundError: no finished dataset.
    KeyError: no such split (the message lists the splits).
  """
  path = dataset_path(data_dir, name)
  builder = _finished_builder(path)
  base = split.split("[", 1)[0]
  if base not in builder.info.splits:
    raise KeyError(
      f"TFDS dataset {path} has no split {base!r}; splits: {list(builder.info.splits)}"
    )
  return RecordSource(builder.as_data_source(split), description=f"{path} split {split!r}")
