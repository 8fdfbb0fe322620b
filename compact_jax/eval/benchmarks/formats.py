"""Readers for the formats benchmarks are distributed in, and the missing-data error.

- VLMEvalKit TSV: one row per question, images as base64 in an ``image`` column;
  a row whose ``image`` is short and numeric refers to the row with that
  ``index`` (VLMEvalKit stores each image once).
- Hugging Face parquet as lmms-eval loads it: ``datasets.Image`` columns are
  structs ``{"bytes", "path"}``.
- The original releases: JSON, JSONL and image folders.

Nothing here downloads: a benchmark whose files are absent raises ``MissingData``
naming every layout it accepts and where each comes from.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

Row = dict[str, Any]


class MissingData(FileNotFoundError):
  """A benchmark's files are not where the suite looks; the message says what to place."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """One accepted way of laying out a benchmark's files under its data dir.

  Attributes:
    pattern: glob (relative to the benchmark dir) of the file(s) that select it.
    describe: what to place there, for the error message.
    source: where those files come from.
    read: (matched files, benchmark dir) -> rows.
  """

  pattern: str
  describe: str
  source: str
  read: Callable[[list[pathlib.Path], pathlib.Path], list[Row]]


def load_rows(
  name: str, bench_dir: pathlib.Path, layouts: Sequence[Layout]
) -> tuple[str, list[Row]]:
  """(the pattern of the first layout present, its rows); ``MissingData`` if none is."""
  for layout in layouts:
    files = sorted(bench_dir.glob(layout.pattern)) if bench_dir.is_dir() else []
    if files:
      rows = layout.read(files, bench_dir)
      if not rows:
        raise ValueError(f"{name}: {[str(f) for f in files]} hold no rows")
      return layout.pattern, rows
  lines = [
    f"Benchmark {name!r}: no data under {bench_dir} (config.bench.data_dir/{name}). "
    "Nothing is downloaded at run time; place one of these layouts there:"
  ]
  for layout in layouts:
    lines.append(f"  - {layout.pattern}: {layout.describe}\n      from {layout.source}")
  raise MissingData("\n".join(lines))


# --- VLMEvalKit TSV -------------------------------------------------------------------------


def decode_b64(text: str, *, where: str) -> bytes:
  try:
    return base64.b64decode(text, validate=False)
  except (binascii.Error, ValueError) as e:
    raise ValueError(f"{where}: the image column is not valid base64 ({e})") from None


def read_tsv(files: list[pathlib.Path], bench_dir: pathlib.Path | None = None) -> list[Row]:
  """Rows of VLMEvalKit TSV files, ``image`` decoded to bytes (references resolved)."""
  del bench_dir
  csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default
  rows: list[Row] = []
  for path in files:
    with open(path, newline="", encoding="utf-8") as f:
      file_rows = list(csv.DictReader(f, delimiter="\t"))
    if file_rows and "index" not in file_rows[0]:
      raise ValueError(
        f"{path}: a VLMEvalKit TSV needs an 'index' column, got {list(file_rows[0])}"
      )
    by_index = {str(r["index"]): r for r in file_rows}
    for n, r in enumerate(file_rows):
      where = f"{path} row {n + 2} (index {r.get('index')})"
      img = r.get("image")
      if img:
        # VLMEvalKit stores a repeated image once; other rows hold that row's index.
        if len(img) <= 64 and img.strip().isdigit():
          target = by_index.get(img.strip())
          if target is None:
            raise ValueError(f"{where}: image refers to index {img} which is not in the file")
          img = target["image"]
        r = {**r, "image": decode_b64(img, where=where), "_where": where, "_file": path.name}
      else:
        r = {**r, "image": None, "_where": where, "_file": path.name}
      rows.append(r)
  return rows


def literal_list(value: Any, *, where: str) -> list[str]:
  """A list of answers from a TSV cell (VLMEvalKit writes Python list literals)."""
  if isinstance(value, list | tuple):
    return [str(v) for v in value]
  text = str(value).strip()
  if text.startswith("["):
    try:
      parsed = ast.literal_eval(text)  # literals only: no code runs
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"{where}: cannot read the answer list {text[:80]!r} ({e})") from None
    return [str(v) for v in parsed]
  return [text]


# --- Hugging Face parquet -----------------------------------------------------------------


def read_parquet(files: list[pathlib.Path], bench_dir: pathlib.Path | None = None) -> list[Row]:
  """Rows of parquet shards; image structs ``{"bytes", "path"}`` become bytes."""
  del bench_dir
  try:
    import pyarrow.parquet as pq
  except ImportError as e:  # pragma: no cover - pyarrow is in requirements.txt
    raise ImportError("Reading Hugging Face parquet needs pyarrow (pip install pyarrow)") from e
  rows: list[Row] = []
  for path in files:
    for n, r in enumerate(pq.read_table(path).to_pylist()):
      for key, value in r.items():
        if isinstance(value, dict) and "bytes" in value:
          r[key] = value["bytes"]
      r["_where"] = f"{path} row {n}"
      r["_file"] = path.name
      rows.append(r)
  return rows


# --- original releases ------------------------------------------------------------------


def read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_jsonl(path: pathlib.Path) -> list[Row]:
  rows = []
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {n + 1} is not valid JSON ({e.msg})") from None
  return rows


def read_image_file(root: pathlib.Path, rel: str, *, where: str) -> bytes:
  path = root / rel
  if not path.is_file():
    raise FileNotFoundError(f"{where}: image {str(path)!r} does not exist")
  return path.read_bytes()


def field(row: Row, *names: str, default: Any = dataclasses.MISSING) -> Any:
  """The first of ``names`` present in ``row`` (formats name one column differently)."""
  for n in names:
    if n in row and row[n] is not None:
      return row[n]
  if default is not dataclasses.MISSING:
    return default
  raise KeyError(f"{row.get('_where', 'row')}: none of the columns {list(names)} is present "
                 f"(columns: {sorted(k for k in row if not k.startswith('_'))})")  # fmt: skip
