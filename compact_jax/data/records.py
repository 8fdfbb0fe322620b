"""LLaVA conversation records: reading, validating, resolving images, writing.

A record is the project's interchange unit (see DESIGN.md, "Interchange formats")::

  {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat ...?", "capability": [...]},
                     {"from": "gpt", "value": "..."}, ...],
   "k": 2, "source": "compact", ...any other keys...}

``image`` is relative to an image root and absent for text-only records. Three file forms
hold records, and :func:`read_records` tells them apart by itself:

* a JSON array (LLaVA-665K's ``llava_v1_5_mix665k.json``),
* JSONL, one object per line (what :func:`write_jsonl` writes),
* COMPACT's generator output: pretty-printed one-element arrays written one after another
  (``[ {...} ]\\n[ {...} ]\\n``), which is not valid JSON as a whole.

Every top-level value may be an object (one record) or an array of objects, so the three forms
are one grammar and a file mixing them also reads. Unknown keys are kept everywhere.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from compact_jax import capabilities as capabilities_lib

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")
# Keys that decoded TFDS records add next to the record's own; a source record may not use
# them, or loading it back would be ambiguous.
RESERVED_KEYS = ("has_image", "image_path")

PathLike = str | os.PathLike[str]


class RecordError(ValueError):
  """A bad record or record file. The message names the file, position and record id."""

  def __init__(self, problem: str, *, where: str = "", record_id: str | None = None):
    self.problem = problem
    self.where = where
    self.record_id = record_id
    parts = [p for p in (where, f"record {record_id!r}" if record_id is not None else "") if p]
    super().__init__(": ".join([*parts, problem]))


@dataclasses.dataclass(frozen=True)
class LocatedRecord:
  """A record plus where it came from, for error messages.

  Attributes:
    record: the parsed JSON object (any value, not yet validated).
    path: the file it was read from.
    line: 1-based line at which the record's text starts.
    index: 0-based position of the record in the file (counting every record read).
  """

  record: Any
  path: pathlib.Path
  line: int
  index: int

  @property
  def where(self) -> str:
    return f"{self.path}:{self.line} (record #{self.index})"


_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Where a new top-level value can start after a syntax error: a line opening with { or [.
# JSONL lines and COMPACT's concatenated arrays start there; the inside of a pretty-printed
# array is indented, so resyncing never lands in the middle of a value.
_RESYNC = re.compile(r"\n(?=[\[{])")


class _LineCounter:
  """Maps character offsets to 1-based line numbers, for offsets given in increasing order."""

  def __init__(self, text: str):
    self._text = text
    self._pos = 0
    self._line = 1

  def line(self, pos: int) -> int:
    if pos < self._pos:  # rare: restart rather than assume monotone calls
      self._pos, self._line = 0, 1
    self._line += self._text.count("\n", self._pos, pos)
    self._pos = pos
    return self._line


def _position(text: str, pos: int, *, bom: int = 0) -> str:
  """``line L column C (byte B)`` for a character offset; B is the 0-based offset in the file."""
  line = text.count("\n", 0, pos) + 1
  col = pos - (text.rfind("\n", 0, pos) + 1) + 1
  return f"line {line} column {col} (byte {bom + len(text[:pos].encode('utf-8'))})"


def iter_records(
  path: PathLike, *, on_error: Callable[[RecordError], None] | None = None
) -> Iterator[LocatedRecord]:
  """Yields the records of a JSON, JSONL or concatenated-arrays file, in file order.

  Args:
    path: the file.
    on_error: if given, a syntax error or a non-object array element is passed to it and
      reading goes on: a bad element is skipped alone; after a syntax error reading resumes
      at the first line after the start of the broken value that starts with ``{`` or ``[``
      (the next JSONL line or COMPACT array), or at the end of the file, and the error says
      where. If None, the first such problem raises.

  Raises:
    RecordError: naming the file and the line, column and character offset.
  """
  path = pathlib.Path(path)
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise RecordError(f"cannot read record file: {e}", where=str(path)) from e
  try:
    text = raw.decode("utf-8-sig")
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
  except UnicodeDecodeError as e:
    raise RecordError(f"not UTF-8 at byte {e.start}: {e.reason}", where=str(path)) from e

  decoder = json.JSONDecoder()
  lines = _LineCounter(text)
  index = 0
  n = len(text)

  def fail(problem: str, pos: int, then: str = "") -> None:
    err = RecordError(f"{problem} at {_position(text, pos, bom=bom)}{then}", where=str(path))
    if on_error is None:
      raise err
    on_error(err)

  def skip_ws(pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()

  pos = skip_ws(0)
  while pos < n:
    start = pos
    value_start = start  # the value being parsed when an error strikes
    try:
      if text[pos] == "{":
        obj, pos = decoder.raw_decode(text, pos)
        yield LocatedRecord(obj, path, lines.line(start), index)
        index += 1
      elif text[pos] == "[":
        # Walk the array one element at a time so that every record gets its own line
        # number; json.loads on the whole array would lose them.
        pos = skip_ws(pos + 1)
        closed = pos < n and text[pos] == "]"
        if closed:
          pos += 1
        while not closed:
          value_start = pos
          obj, pos = decoder.raw_decode(text, pos)
          if isinstance(obj, dict):
            yield LocatedRecord(obj, path, lines.line(value_start), index)
          else:
            fail(f"array element is not a record object (got {type(obj).__name__})", value_start)
          index += 1
          pos = skip_ws(pos)
          if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
          elif pos < n and text[pos] == "]":
            pos += 1
            closed = True
          else:
            raise json.JSONDecodeError("Expecting ',' or ']' after an array element", text, pos)
      else:
        raise json.JSONDecodeError("Expecting '{' or '[' to start a record", text, pos)
    except json.JSONDecodeError as e:
      # Resume at the first line opening a value after the start of the broken one, not after
      # the error: a truncated JSONL line makes the decoder run on into the next line.
      resume = _RESYNC.search(text, value_start + 1)
      end = resume.end() if resume else n
      then = (
        f"; resuming at {_position(text, end, bom=bom)}"
        if resume
        else "; skipped the rest of the file"
      )
      fail(f"invalid JSON: {e.msg.removesuffix(' at')}", e.pos, then if on_error else "")
      pos = end
    pos = skip_ws(pos)


def read_records(path: PathLike) -> list[dict[str, Any]]:
  """Reads every record of a JSON array, JSONL or COMPACT concatenated-arrays file.

  Raises:
    RecordError: on a syntax error or a non-object record, naming the file and position.
  """
  out = []
  for located in iter_records(path):
    if not isinstance(located.record, dict):
      raise RecordError(
        f"record is a {type(located.record).__name__}, not an object", where=located.where
      )
    out.append(located.record)
  return out


def record_id(record: Any) -> str | None:
  """The record's id as a string (ints become their decimal form), or None if unusable."""
  if not isinstance(record, Mapping):
    return None
  rid = record.get("id")
  if isinstance(rid, bool):
    return None
  if isinstance(rid, int):
    return str(rid)
  if isinstance(rid, str) and rid:
    return rid
  return None


def _is_utf8_encodable(text: str) -> bool:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def validate_record(record: Any, *, where: str) -> None:
  """Checks one record against the LLaVA conversation schema.

  Checked: ``id`` is a non-empty string or an int; ``conversations`` is a non-empty list of
  objects with ``from`` in {human, gpt} and a string ``value``; a turn's ``capability``, if
  present, is a list of known capability names; ``image``, if present, is a non-empty string;
  ``<image>`` occurs exactly once, in the first human turn, when there is an image and never
  when there is not (where in that turn is free: LLaVA's loader moves it to the front);
  ``k``, if present, is an int >= 0; ``source``, if present, is a string; strings stored as
  text encode as UTF-8 (no lone surrogates); the record does not
  use the reserved keys ``has_image`` / ``image_path``. Role alternation is left to the chat
  template, which knows what it can render.

  Args:
    record: the parsed JSON value.
    where: where it came from (file and line), named in errors with the record id.

  Raises:
    RecordError: naming ``where``, the record id and the problem.
  """
  if not isinstance(record, Mapping):
    raise RecordError(f"record is a {type(record).__name__}, not an object", where=where)
  rid = record_id(record)

  def bad(problem: str) -> RecordError:
    return RecordError(problem, where=where, record_id=rid)

  if "id" not in record:
    raise bad("missing 'id'")
  if rid is None:
    raise bad(f"'id' must be a non-empty string or an int, got {record['id']!r}")
  for key in RESERVED_KEYS:
    if key in record:
      raise bad(f"key {key!r} is reserved for decoded TFDS records")

  has_image = "image" in record
  if has_image and not (isinstance(record["image"], str) and record["image"]):
    raise bad(f"'image' must be a non-empty relative path string, got {record['image']!r}")

  convs = record.get("conversations")
  if "conversations" not in record:
    raise bad("missing 'conversations'")
  if not isinstance(convs, list) or not convs:
    raise bad("'conversations' must be a non-empty list of turns")
  first_human = None
  for i, turn in enumerate(convs):
    if not isinstance(turn, Mapping):
      raise bad(f"conversations[{i}] is a {type(turn).__name__}, not an object")
    role = turn.get("from")
    if role not in ROLES:
      raise bad(f"conversations[{i}]['from'] must be one of {list(ROLES)}, got {role!r}")
    if not isinstance(turn.get("value"), str):
      raise bad(f"conversations[{i}]['value'] must be a string, got {turn.get('value')!r}")
    if "capability" in turn:
      caps = turn["capability"]
      if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise bad(f"conversations[{i}]['capability'] must be a list of names, got {caps!r}")
      try:
        capabilities_lib.canonical(caps)
      except ValueError as e:
        raise bad(f"conversations[{i}]['capability']: {e}") from None
    if role == "human" and first_human is None:
      first_human = i

  counts = [turn["value"].count(IMAGE_TOKEN) for turn in convs]
  if has_image:
    if first_human is None or counts[first_human] != 1 or sum(counts) != 1:
      where_tokens = [i for i, c in enumerate(counts) for _ in range(c)]
      raise bad(
        f"a record with an image needs exactly one {IMAGE_TOKEN!r}, in its first human turn "
        f"(conversations[{first_human}]); found it in turns {where_tokens}"
      )
  elif sum(counts):
    raise bad(f"text-only record (no 'image' key) contains {IMAGE_TOKEN!r}")

  # Text features store UTF-8; a lone surrogate (legal as a JSON escape) cannot be encoded.
  texts = [("id", rid), ("image", record.get("image", "")), ("source", record.get("source", ""))]
  texts += [(f"conversations[{i}]['value']", t["value"]) for i, t in enumerate(convs)]
  for what, text in texts:
    if isinstance(text, str) and not _is_utf8_encodable(text):
      raise bad(f"{what} contains characters that are not valid Unicode (lone surrogates)")

  if "k" in record:
    k = record["k"]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < 2**31:
      raise bad(f"'k' must be an int >= 0, got {k!r}")
  if "source" in record and not isinstance(record["source"], str):
    raise bad(f"'source' must be a string, got {record['source']!r}")


def resolve_image(
  image_rel: str,
  roots: Sequence[PathLike],
  *,
  record_id: str | None = None,
  where: str = "",
) -> pathlib.Path:
  """Finds a record's image: the first root that holds ``image_rel``.

  A path must stay inside its root: absolute paths, ``..`` components and symlinks that
  resolve outside the root are errors (a root that is itself a symlink is fine, since roots
  are resolved first). A root whose candidate path escapes is an error even if a later root
  would hold the file, so that what is read never depends on a link that leaves the tree.

  Args:
    image_rel: the record's ``image`` value.
    roots: image root directories, searched in order.
    record_id: named in errors.
    where: the record's file and line, named in errors.

  Returns:
    The resolved path of the image file.

  Raises:
    RecordError: on an absolute or escaping path, or when no root holds the file (the message
      lists the roots searched).
  """

  def bad(problem: str) -> RecordError:
    return RecordError(problem, where=where, record_id=record_id)

  rel = pathlib.PurePosixPath(image_rel)
  if not image_rel or rel.is_absolute() or pathlib.PureWindowsPath(image_rel).is_absolute():
    raise bad(f"image path {image_rel!r} must be relative to an image root")
  if ".." in rel.parts:
    raise bad(f"image path {image_rel!r} escapes its root ('..' is not allowed)")
  if not roots:
    raise bad(f"image {image_rel!r} cannot be found: no image roots were given")
  for root in roots:
    root_real = pathlib.Path(root).resolve()
    candidate = root_real / rel
    if not os.path.lexists(candidate):
      continue
    real = candidate.resolve()
    if not real.is_relative_to(root_real):
      raise bad(
        f"image path {image_rel!r} under root {str(root_real)!r} resolves to {real}, outside the root"
      )
    if real.is_file():
      return real
    if real.exists():
      raise bad(f"image path {image_rel!r} under root {str(root_real)!r} is not a regular file")
  searched = ", ".join(repr(str(r)) for r in roots)
  raise bad(f"image {image_rel!r} not found in any image root (searched: {searched})")


def write_jsonl(records: Iterable[Mapping[str, Any]], path: PathLike) -> None:
  """Writes records as JSONL, atomically: readers see the old file or the whole new one.

  The text goes to a temporary file in the same directory, is flushed to disk, and is renamed
  over ``path``; a crash leaves at most a stray ``.tmp`` file, never a truncated ``path``.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for record in records:
        f.write(json.dumps(record, ensure_ascii=False))
        f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
