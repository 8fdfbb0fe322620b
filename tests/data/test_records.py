"""Record files: the three forms, parse errors, validation, image paths, atomic writes."""

import json
import os
import pathlib

import pytest

from compact_jax.data import records

LLAVA = [
  {
    "id": "000000033471",
    "image": "coco/train2017/000000033471.jpg",
    "conversations": [
      {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
      {"from": "gpt", "value": "The bus in the image is white and red."},
      {"from": "human", "value": "What feature can be seen on the back of the bus?"},
      {"from": "gpt", "value": "The back of the bus features an advertisement."},
    ],
  },
  {
    "id": "i6IyJda_0",
    "model": "",
    "conversations": [
      {
        "from": "human",
        "value": "How to tell if a customer segment is well segmented? In 3 bullet points.",
      },
      {"from": "gpt", "value": "1. Homogeneity\n2. Distinctiveness\n3. Stability — « ok »"},
    ],
  },
]


def _write(tmp_path: pathlib.Path, name: str, text: str) -> pathlib.Path:
  path = tmp_path / name
  path.write_text(text, encoding="utf-8")
  return path


def _compact_text(recs) -> str:
  # Exactly what COMPACT's processor does per image: json.dump([entry], f, indent=4); "\n".
  return "".join(json.dumps([r], indent=4) + "\n" for r in recs)


def test_three_forms_read_the_same_records(tmp_path):
  array = _write(tmp_path, "a.json", json.dumps(LLAVA, indent=2))
  jsonl = _write(tmp_path, "a.jsonl", "".join(json.dumps(r) + "\n" for r in LLAVA))
  compact = _write(tmp_path, "a_compact.json", _compact_text(LLAVA))
  for path in (array, jsonl, compact):
    assert records.read_records(path) == LLAVA, path
  # The concatenated form really is not JSON as a whole; the reader must not rely on json.load.
  with pytest.raises(json.JSONDecodeError):
    json.loads(compact.read_text())


def test_line_numbers_point_at_each_record(tmp_path):
  text = _compact_text(LLAVA)
  path = _write(tmp_path, "c.json", text)
  lines = text.split("\n")
  # Each one-element array opens with "[" and its record's "{" on the next line.
  expected = [i + 2 for i, line in enumerate(lines) if line == "["]
  located = list(records.iter_records(path))
  assert [r.line for r in located] == expected
  assert [r.index for r in located] == [0, 1]
  assert located[1].where == f"{path}:{expected[1]} (record #1)"


def test_empty_array_bom_and_whitespace(tmp_path):
  assert records.read_records(_write(tmp_path, "e.json", " [ ]\n")) == []
  assert records.read_records(_write(tmp_path, "w.jsonl", "\n\n")) == []
  bom = tmp_path / "bom.jsonl"
  bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(LLAVA[0]).encode() + b"\n")
  assert records.read_records(bom) == [LLAVA[0]]


def test_syntax_error_names_file_line_column_and_byte(tmp_path):
  good = json.dumps(LLAVA[1], ensure_ascii=False)
  bad = '{"id": "x", "conversations": []  "extra": 1}'
  text = f"{good}\n{good}\n{bad}\n"
  path = _write(tmp_path, "bad.jsonl", text)
  # Independent expectation: the decoder stops at the quote that should have been a comma.
  err_col = bad.index('  "extra"') + 3
  err_byte = len(f"{good}\n{good}\n".encode()) + err_col - 1
  with pytest.raises(records.RecordError) as e:
    records.read_records(path)
  msg = str(e.value)
  assert str(path) in msg
  assert f"line 3 column {err_col} (byte {err_byte})" in msg


def test_unterminated_array_and_trailing_comma(tmp_path):
  path = _write(tmp_path, "u.json", json.dumps(LLAVA)[:-1])
  with pytest.raises(records.RecordError, match=r"u\.json.*line 1"):
    records.read_records(path)
  path = _write(tmp_path, "t.json", '[{"id": "a"},\n]')
  with pytest.raises(records.RecordError, match=r"Expecting value at line 2 column 1"):
    records.read_records(path)


def test_non_object_element_is_an_error_with_position(tmp_path):
  path = _write(tmp_path, "n.json", '[\n  {"id": "a"},\n  "oops"\n]')
  with pytest.raises(records.RecordError, match=r"n\.json.*not a record object.*line 3 column 3"):
    records.read_records(path)


def test_on_error_resyncs_at_next_line_and_keeps_good_records(tmp_path):
  # A generator killed mid-write leaves a truncated JSONL line; the rest must survive.
  a, b, c = ({"id": i, "conversations": []} for i in "abc")
  text = f"{json.dumps(a)}\n{json.dumps(b)[:9]}\n{json.dumps(c)}\n"
  path = _write(tmp_path, "trunc.jsonl", text)
  errors = []
  got = [r.record for r in records.iter_records(path, on_error=errors.append)]
  assert got == [a, c]
  assert len(errors) == 1
  assert "trunc.jsonl" in str(errors[0]) and "line 2" in str(errors[0])
  assert "resuming at line 3" in str(errors[0])


def test_on_error_skips_one_concatenated_array(tmp_path):
  recs = [{"id": f"llava_{i}", "conversations": []} for i in range(3)]
  text = _compact_text(recs).replace('"llava_1",', '"llava_1"', 1)
  path = _write(tmp_path, "c.json", text)
  errors = []
  got = [r.record["id"] for r in records.iter_records(path, on_error=errors.append)]
  assert got == ["llava_0", "llava_2"]
  assert len(errors) == 1


def test_unreadable_and_non_utf8_files(tmp_path):
  with pytest.raises(records.RecordError, match=r"missing\.json"):
    records.read_records(tmp_path / "missing.json")
  path = tmp_path / "latin1.jsonl"
  raw = b'{"id": "caf\xe9"}\n'
  path.write_bytes(raw)
  byte = raw.index(b"\xe9")  # 0-based, like the offsets in syntax errors
  with pytest.raises(records.RecordError, match=rf"latin1\.jsonl.*not UTF-8 at byte {byte}"):
    records.read_records(path)


def _rec(**overrides):
  rec = {
    "id": "r1",
    "image": "a.png",
    "conversations": [
      {"from": "human", "value": "<image>\nQ?", "capability": ["color", "counting"]},
      {"from": "gpt", "value": "2"},
    ],
  }
  rec.update(overrides)
  return {k: v for k, v in rec.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize(
  "record",
  [
    _rec(),
    _rec(id=12, k=2, source="compact", generator={"model": "x"}),
    # LLaVA-665K has the image token after the question in some records.
    _rec(conversations=[{"from": "human", "value": "Q?\n<image>"}, {"from": "gpt", "value": "a"}]),
    # Text-only: no image key, no image token.
    _rec(image=_DROP, model="", conversations=LLAVA[1]["conversations"]),
    _rec(k=0),
  ],
)
def test_valid_records_pass(record):
  records.validate_record(record, where="f.json:1")


@pytest.mark.parametrize(
  ("record", "problem"),
  [
    ("not a dict", "not an object"),
    (_rec(id=_DROP), "missing 'id'"),
    (_rec(id=""), "'id' must be"),
    (_rec(id=True), "'id' must be"),
    (_rec(id=1.5), "'id' must be"),
    (_rec(conversations=_DROP), "missing 'conversations'"),
    (_rec(conversations=[]), "non-empty list"),
    (_rec(conversations=["hi"]), r"conversations\[0\] is a str"),
    (_rec(conversations=[{"from": "user", "value": "<image>"}]), r"\['from'\] must be one of"),
    (
      _rec(conversations=[{"from": "human", "value": ["<image>"]}]),
      r"\['value'\] must be a string",
    ),
    (
      _rec(conversations=[{"from": "human", "value": "<image>", "capability": "color"}]),
      "list of names",
    ),
    (
      _rec(conversations=[{"from": "human", "value": "<image>", "capability": ["colour"]}]),
      "Unknown capability",
    ),
    (_rec(conversations=[{"from": "human", "value": "Q?"}]), "exactly one '<image>'"),
    (_rec(conversations=[{"from": "human", "value": "<image><image>"}]), "exactly one '<image>'"),
    (
      _rec(
        conversations=[
          {"from": "human", "value": "Q"},
          {"from": "gpt", "value": "a"},
          {"from": "human", "value": "<image>"},
        ]
      ),
      r"first human turn \(conversations\[0\]\); found it in turns \[2\]",
    ),
    (_rec(image=_DROP), "text-only record"),
    (_rec(image=""), "'image' must be"),
    (_rec(image=["a.png", "b.png"]), "'image' must be"),
    (_rec(k=-1), "'k' must be"),
    (_rec(k="2"), "'k' must be"),
    (_rec(k=True), "'k' must be"),
    (_rec(source=3), "'source' must be"),
    (_rec(has_image=True), "reserved"),
    (_rec(conversations=[{"from": "human", "value": "<image>\ud800"}]), "not valid Unicode"),
  ],
)
def test_invalid_records_name_place_id_and_problem(record, problem):
  with pytest.raises(records.RecordError, match=problem) as e:
    records.validate_record(record, where="data/f.json:7")
  assert str(e.value).startswith("data/f.json:7")
  rid = records.record_id(record)
  if rid is not None:
    assert f"record {rid!r}" in str(e.value)


def test_resolve_image_searches_roots_in_order(tmp_path):
  r1, r2 = tmp_path / "r1", tmp_path / "r2"
  (r1 / "coco").mkdir(parents=True)
  (r2 / "coco").mkdir(parents=True)
  (r2 / "coco/a.jpg").write_bytes(b"2")
  assert records.resolve_image("coco/a.jpg", [r1, r2]) == (r2 / "coco/a.jpg").resolve()
  (r1 / "coco/a.jpg").write_bytes(b"1")
  assert records.resolve_image("coco/a.jpg", [r1, r2]) == (r1 / "coco/a.jpg").resolve()
  # A root that is itself a symlink is fine.
  (tmp_path / "link_root").symlink_to(r2, target_is_directory=True)
  assert records.resolve_image("./coco/a.jpg", [tmp_path / "link_root"]).read_bytes() == b"2"


def test_resolve_image_errors_name_id_path_and_roots(tmp_path):
  root = tmp_path / "root"
  root.mkdir()
  (tmp_path / "secret.png").write_bytes(b"x")
  (root / "sub").mkdir()
  (root / "sub/escape.png").symlink_to(tmp_path / "secret.png")
  (root / "dir.png").mkdir()

  def err(rel, roots=(root,)):
    with pytest.raises(records.RecordError) as e:
      records.resolve_image(rel, roots, record_id="rec_9", where="f.jsonl:3")
    msg = str(e.value)
    assert msg.startswith("f.jsonl:3: record 'rec_9': ") and repr(rel) in msg
    return msg

  assert "relative" in err(str(tmp_path / "secret.png"))
  assert "'..'" in err("../secret.png")
  assert "'..'" in err("sub/../../secret.png")
  assert "outside the root" in err("sub/escape.png")
  assert "not a regular file" in err("dir.png")
  msg = err("nope.png", (root, tmp_path / "other"))
  assert "not found" in msg and repr(str(root)) in msg and repr(str(tmp_path / "other")) in msg
  assert "no image roots" in err("a.png", ())


def test_write_jsonl_round_trip(tmp_path):
  path = tmp_path / "out" / "recs.jsonl"
  records.write_jsonl(LLAVA, path)
  assert records.read_records(path) == LLAVA
  assert len(path.read_text(encoding="utf-8").splitlines()) == len(LLAVA)
  assert "«" in path.read_text(encoding="utf-8")  # not \u-escaped


def test_write_jsonl_is_atomic_on_failure(tmp_path):
  path = tmp_path / "recs.jsonl"
  records.write_jsonl(LLAVA, path)
  before = path.read_bytes()

  def failing():
    yield LLAVA[0]
    raise RuntimeError("generator crashed")

  with pytest.raises(RuntimeError, match="generator crashed"):
    records.write_jsonl(failing(), path)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["recs.jsonl"]
