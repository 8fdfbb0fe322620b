"""Small benchmark files in the layouts the loaders read, written by the tests.

Each writer lays out one format exactly as the benchmark distributes it (VLMEvalKit TSV
with base64 images, Hugging Face parquet with ``{"bytes", "path"}`` image structs, or
the original release files), so loader tests and end-to-end runs share them.
"""

from __future__ import annotations

import base64
import io
import json
import pathlib

from PIL import Image


def png(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="PNG")
  return buf.getvalue()


def jpeg(color: tuple[int, int, int]) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (8, 6), color).save(buf, format="JPEG")
  return buf.getvalue()


RED, BLUE, GREEN = png((255, 0, 0)), png((0, 0, 255)), png((0, 255, 0))


def b64(data: bytes) -> str:
  return base64.b64encode(data).decode()


def write_tsv(path: pathlib.Path, rows: list[dict]) -> None:
  """A VLMEvalKit TSV: a header row, tab-separated cells, no quoting."""
  cols = list(rows[0])
  lines = ["\t".join(cols)] + ["\t".join(str(r[c]) for c in cols) for r in rows]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(lines) + "\n")


def write_parquet(path: pathlib.Path, rows: list[dict]) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq

  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)


def write_bytes(path: pathlib.Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def write_json(path: pathlib.Path, obj) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def pope_tsv(data_dir: pathlib.Path, n: int = 6) -> None:
  """POPE.tsv under ``data_dir/pope``: n yes/no questions on two images, two splits."""
  words = ["dog", "red square", "blue circle", "cat", "car", "tree red blue dog"]
  write_tsv(data_dir / "pope" / "POPE.tsv", [
    {"index": i, "image": b64(RED if i % 2 else BLUE), "question": f"Is there a {words[i % 6]} in the image?",
     "answer": "yes" if i % 3 else "no", "category": ("random", "popular")[i % 2]}
    for i in range(n)])  # fmt: skip


def mmstar_parquet(data_dir: pathlib.Path, n: int = 4) -> None:
  """Lin-Chen/MMStar's parquet under ``data_dir/mmstar``: options embedded in the question."""
  write_parquet(data_dir / "mmstar" / "mmstar.parquet", [
    {"index": i, "question": f"Which color is it? Options: A: red, B: blue, C: green, D: gray {i}",
     "answer": "AB"[i % 2], "category": "coarse perception", "l2_category": f"l2-{i % 2}",
     "image": {"bytes": RED if i % 2 else BLUE, "path": None}} for i in range(n)])  # fmt: skip
