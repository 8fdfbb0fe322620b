"""The llava_records builder via compact_jax.data.tfds_io, without TensorFlow.

Round trips of LLaVA-665K-style and COMPACT records, every bad-input case, skip counting,
reruns (reuse, stale inputs, overwrite), crash safety, and the `tfds build` code path.
"""

import copy
import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import simple_parsing
from PIL import Image

from compact_jax.data import records, tfds_io
from tfds_builders.llava_records import llava_records as builder_lib

REPO = pathlib.Path(__file__).resolve().parents[2]


def _save(root: pathlib.Path, rel: str, image: Image.Image, fmt: str) -> bytes:
  path = root / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, format=fmt)
  return path.read_bytes()


def _noise(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture
def corpus(tmp_path):
  """LLaVA-665K-style records (own root) and COMPACT output (other root), with their images.

  Returns a dict: files per split, roots, the input records per split, and per image path
  the file bytes and (for lossless PNGs) the pixel array that was saved.
  """
  llava_root, compact_root = tmp_path / "playground", tmp_path / "compact_images"
  pixels = {
    "gqa/images/2354786.png": _noise(1, (6, 5)),  # grayscale
    "ocr_vqa/images/1459398.png": _noise(2, (4, 7)) % 16,  # palette indices
    "vg/VG_100K/2.png": _noise(3, (5, 5, 4)),  # RGBA
    "img_0.png": _noise(4, (8, 8, 3)),
  }
  files = {}
  files["coco/train2017/000000033471.jpg"] = _save(
    llava_root, "coco/train2017/000000033471.jpg", Image.fromarray(_noise(0, (6, 8, 3))), "JPEG"
  )
  files["gqa/images/2354786.png"] = _save(
    llava_root,
    "gqa/images/2354786.png",
    Image.fromarray(pixels["gqa/images/2354786.png"], "L"),
    "PNG",
  )
  palette = Image.fromarray(pixels["ocr_vqa/images/1459398.png"], "P")
  palette.putpalette(list(_noise(5, (16 * 3,))))
  files["ocr_vqa/images/1459398.png"] = _save(
    llava_root, "ocr_vqa/images/1459398.png", palette, "PNG"
  )
  files["vg/VG_100K/2.png"] = _save(
    llava_root, "vg/VG_100K/2.png", Image.fromarray(pixels["vg/VG_100K/2.png"], "RGBA"), "PNG"
  )
  files["img_0.png"] = _save(compact_root, "img_0.png", Image.fromarray(pixels["img_0.png"]), "PNG")
  files["img_1.jpg"] = _save(
    compact_root, "img_1.jpg", Image.fromarray(_noise(6, (9, 9, 3))), "JPEG"
  )

  def turns(*pairs, **first_extra):
    out = []
    for q, a in pairs:
      out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    out[0].update(first_extra)
    return out

  llava = [
    {
      "id": "000000033471",
      "image": "coco/train2017/000000033471.jpg",
      "conversations": turns(
        ("<image>\nWhat are the colors of the bus in the image?", "White and red."),
        ("What feature can be seen on the back of the bus?", "An advertisement."),
      ),
    },
    {
      "id": "i6IyJda_0",
      "model": "",
      "conversations": turns(
        ("Résume ce texte : « bonjour »", "Salut 👋"),
        ("And in Japanese?", "こんにちは"),
      ),
    },
    {
      "id": "2354786",
      "image": "gqa/images/2354786.png",
      "conversations": turns(
        ("Is the sky dark?\n<image>", "Yes"),
        ("What is on the table?", "Cup"),
        ("Which side is the man on?", "Left"),
      ),
    },
    {
      "id": 1459398,  # an int id: stored as "1459398"
      "image": "ocr_vqa/images/1459398.png",
      "conversations": turns(("<image>\nWho wrote this book?", "Jane Doe")),
    },
    {
      "id": "vg_2",
      "image": "vg/VG_100K/2.png",
      "conversations": [
        {"from": "human", "value": "<image>\nDescribe the region."},
        {"from": "gpt", "value": "A dog.", "weight": 0.5, "bbox": [0.1, 0.2, 0.3, None]},
      ],
      "dataset": {"name": "vg", "nested": [1, {"a": True}]},
    },
  ]
  compact = [
    {
      "id": "llava_0",
      "image": "img_0.png",
      "conversations": [
        {
          "from": "human",
          "value": "<image>\nHow many red cups?\nAnswer the question using a single word or phrase.",
          "capability": ["color", "counting"],
        },
        {"from": "gpt", "value": "3"},
        # Not sorted: stored canonical (sorted), a documented normalisation.
        {
          "from": "human",
          "value": "Where is this?",
          "capability": ["scene_understanding", "object_recognition"],
        },
        {"from": "gpt", "value": "kitchen"},
      ],
      "k": 2,
      "source": "compact",
    },
    {
      "id": "llava_1",
      "image": "img_1.jpg",
      "conversations": [
        {"from": "human", "value": "<image>\nWhat shape?", "capability": ["shape"]},
        {"from": "gpt", "value": "round"},
        {"from": "human", "value": "Empty list kept apart from absent", "capability": []},
        {"from": "gpt", "value": "ok"},
      ],
      "k": 1,
      "source": "compact",
    },
  ]
  test = [{**compact[0], "k": 3}]  # shares its id with train: reported, not an error

  llava_file = tmp_path / "llava_v1_5_mix665k.json"
  llava_file.write_text(json.dumps(llava, indent=1, ensure_ascii=False), encoding="utf-8")
  compact_file = tmp_path / "output_k2.json"
  compact_file.write_text("".join(json.dumps([r], indent=4) + "\n" for r in compact))
  test_file = tmp_path / "test.jsonl"
  records.write_jsonl(test, test_file)
  return {
    "records": {"train": [llava_file, compact_file], "test": [test_file]},
    "roots": [llava_root, compact_root],
    "inputs": {"train": llava + compact, "test": test},
    "files": files,
    "pixels": pixels,
  }


def expected_record(rec: dict, files: dict) -> dict:
  """What load_split returns for an input record: the documented normalisations only."""
  out = copy.deepcopy(rec)
  out["id"] = str(rec["id"])
  out["image"] = files[rec["image"]] if "image" in rec else b""
  out["image_path"] = rec.get("image", "")
  out["has_image"] = "image" in rec
  out.setdefault("k", -1)
  out.setdefault("source", "")
  for turn in out["conversations"]:
    if "capability" in turn:
      turn["capability"] = sorted(set(turn["capability"]))
  return out


def test_round_trip_llava_and_compact(corpus, tmp_path, capsys):
  data_dir = tmp_path / "tfds"
  report = tfds_io.build_dataset(corpus["records"], corpus["roots"], data_dir, name="mix")
  for split, inputs in corpus["inputs"].items():
    source = tfds_io.load_split(data_dir, split, name="mix")
    assert len(source) == len(inputs)
    got = [source[i] for i in range(len(source))]
    assert got == [expected_record(r, corpus["files"]) for r in inputs]
    assert source.__getitems__([len(got) - 1, 0]) == [got[-1], got[0]]
    assert source[-1] == got[-1]
    with pytest.raises(IndexError, match=split):
      source[len(source)]

  # Lossless images decode to exactly the pixels that were saved (mode included).
  train = tfds_io.load_split(data_dir, "train", name="mix")
  by_path = {r["image_path"]: r["image"] for r in (train[i] for i in range(len(train)))}
  for rel, pixels in corpus["pixels"].items():
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(by_path[rel]))), pixels)

  # Counts against the inputs: 7 train records, 1 of them text-only.
  c = report.splits["train"]
  assert (c.records, c.with_image, c.text_only, c.skipped) == (7, 6, 1, 0)
  assert c.turns == sum(len(r["conversations"]) for r in corpus["inputs"]["train"])
  assert c.by_k == {"-1": 5, "2": 1, "1": 1}
  assert report.splits["test"].by_k == {"3": 1}
  assert (report.shared_ids, report.shared_id_examples) == (1, ["llava_0"])
  assert not report.reused and report.data_path == str(tfds_io.dataset_path(data_dir, "mix"))
  printed = capsys.readouterr().out
  assert "TFDS dataset built" in printed and "1 id(s) occur in more than one split" in printed
  assert tfds_io.read_report(data_dir, "mix").splits == report.splits


def test_split_slicing_and_unknown_split(corpus, tmp_path):
  data_dir = tmp_path / "tfds"
  tfds_io.build_dataset(corpus["records"], corpus["roots"], data_dir)
  head = tfds_io.load_split(data_dir, "train[:2]")
  assert [head[i]["id"] for i in range(len(head))] == ["000000033471", "i6IyJda_0"]
  with pytest.raises(KeyError, match=r"no split 'validation'.*\['train', 'test'\]"):
    tfds_io.load_split(data_dir, "validation")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tfds_io.load_split(data_dir, "train", name="other")


# --- bad input -------------------------------------------------------------------------------


def _good(rid: str, image: str = "ok.png") -> dict:
  return {
    "id": rid,
    "image": image,
    "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}],
  }


@pytest.fixture
def bad_root(tmp_path):
  """An image root with one good image, junk, a truncated PNG, and links out of the root."""
  root = tmp_path / "images"
  root.mkdir()
  Image.new("RGB", (4, 4), "red").save(root / "ok.png")
  (root / "junk.jpg").write_bytes(b"this is not a JPEG")
  buf = io.BytesIO()
  Image.fromarray(_noise(7, (32, 32, 3))).save(buf, format="PNG")
  (root / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  buf = io.BytesIO()
  Image.fromarray(_noise(8, (32, 32, 3))).save(buf, format="JPEG")
  # PIL's verify() accepts this one; only a full decode notices.
  (root / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  Image.new("RGB", (4, 4), "blue").save(tmp_path / "outside.png")
  (root / "link.png").symlink_to(tmp_path / "outside.png")
  return root


BAD_CASES = {
  # name: (record, words the error must contain besides the file and id)
  "missing_image": (_good("m1", "coco/missing.png"), ["coco/missing.png", "not found"]),
  "undecodable_image": (_good("u1", "junk.jpg"), ["junk.jpg", "cannot be decoded"]),
  "truncated_png": (_good("t1", "trunc.png"), ["trunc.png", "cannot be decoded"]),
  "truncated_jpeg": (_good("t2", "trunc.jpg"), ["trunc.jpg", "cannot be decoded"]),
  "missing_conversations": ({"id": "f1", "image": "ok.png"}, ["missing 'conversations'"]),
  "bad_turn": (
    {**_good("f2"), "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt"}]},
    ["conversations[1]['value']"],
  ),
  "dotdot_escape": (_good("e1", "../outside.png"), ["../outside.png", "escapes"]),
  "symlink_escape": (_good("e2", "link.png"), ["link.png", "outside the root"]),
  "image_token_missing": (
    {**_good("i1"), "conversations": [{"from": "human", "value": "Q"}]},
    ["'<image>'"],
  ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_fails_naming_id_and_file(case, bad_root, tmp_path):
  record, words = BAD_CASES[case]
  path = tmp_path / "recs.jsonl"
  records.write_jsonl([_good("g0"), record], path)
  data_dir = tmp_path / "tfds"
  with pytest.raises(records.RecordError) as e:
    tfds_io.build_dataset({"train": [path]}, [bad_root], data_dir)
  msg = str(e.value)
  assert f"{path}:2" in msg and f"record {record['id']!r}" in msg, msg
  for word in words:
    assert word in msg, msg
  assert not tfds_io.dataset_path(data_dir).exists()
  assert not list(tfds_io.dataset_path(data_dir).parent.glob("incomplete.*"))


def test_bad_json_fails_naming_file_and_position(bad_root, tmp_path):
  path = tmp_path / "recs.jsonl"
  text = json.dumps(_good("g0")) + '\n{"id": "x", "image": "ok.png",\n'
  path.write_text(text)
  # The object is cut off: the decoder fails at the end of the file, line 3 column 1.
  at = rf"at line 3 column 1 \(byte {len(text)}\)$"
  with pytest.raises(records.RecordError, match=rf"^{path}: invalid JSON: .* {at}"):
    tfds_io.build_dataset({"train": [path]}, [bad_root], tmp_path / "tfds")


@pytest.mark.parametrize("skip", [False, True])
def test_duplicate_ids_in_a_split_always_fail(skip, bad_root, tmp_path):
  a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
  records.write_jsonl([_good("llava_0"), _good("llava_1")], a)
  b.write_text(json.dumps([_good("llava_7"), _good("llava_1")], indent=2))
  with pytest.raises(records.RecordError) as e:
    tfds_io.build_dataset({"train": [a, b]}, [bad_root], tmp_path / "tfds", skip_bad_records=skip)
  msg = str(e.value)
  assert "duplicate id" in msg and "record 'llava_1'" in msg
  assert f"{b}:" in msg and f"first at {a}:2" in msg


def test_skip_bad_records_counts_and_reports(bad_root, tmp_path, capsys):
  lines = [json.dumps(_good("g1"))]
  lines += [json.dumps(BAD_CASES[case][0]) for case in sorted(BAD_CASES)]
  lines += [
    json.dumps(_good("g2")),
    '{"id": "broken", "conversations": [',
    json.dumps(_good("g3", "./ok.png")),
  ]
  path = tmp_path / "recs.jsonl"
  path.write_text("\n".join(lines) + "\n")
  data_dir = tmp_path / "tfds"
  report = tfds_io.build_dataset({"train": [path]}, [bad_root], data_dir, skip_bad_records=True)

  n_bad = len(BAD_CASES) + 1  # plus the syntax error
  c = report.splits["train"]
  assert (c.records, c.skipped, c.with_image, c.turns) == (3, n_bad, 3, 6)
  assert len(report.skipped) == n_bad
  reasons = "\n".join(s.reason for s in report.skipped)
  for case in BAD_CASES:
    assert f"record {BAD_CASES[case][0]['id']!r}" in reasons, case
  assert f"{path}: invalid JSON" in reasons
  source = tfds_io.load_split(data_dir, "train")
  assert [source[i]["id"] for i in range(len(source))] == ["g1", "g2", "g3"]
  printed = capsys.readouterr().out
  assert f"skipped {n_bad} bad record(s)" in printed and "record 'u1'" in printed
  assert tfds_io.read_report(data_dir).skipped == report.skipped


def test_split_with_only_bad_records_fails_even_when_skipping(bad_root, tmp_path):
  path = tmp_path / "recs.jsonl"
  records.write_jsonl([_good("m1", "missing.png")], path)
  with pytest.raises(
    records.RecordError, match=r"split 'train' has no valid records \(1 skipped\)"
  ):
    tfds_io.build_dataset({"train": [path]}, [bad_root], tmp_path / "tfds", skip_bad_records=True)


def test_missing_record_file_and_bad_names(bad_root, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.json \(split 'train'\)"):
    tfds_io.build_dataset({"train": [tmp_path / "nope.json"]}, [bad_root], tmp_path / "tfds")
  path = tmp_path / "recs.jsonl"
  records.write_jsonl([_good("g1")], path)
  with pytest.raises(FileNotFoundError, match=r"Image root .*/typo is not a directory"):
    tfds_io.build_dataset({"train": [path]}, [bad_root, tmp_path / "typo"], tmp_path / "tfds")
  with pytest.raises(ValueError, match="reserved"):
    tfds_io.build_dataset({"train": [path]}, [bad_root], tmp_path / "tfds", name="manual")
  with pytest.raises(ValueError, match="must match"):
    tfds_io.build_dataset({"train": [path]}, [bad_root], tmp_path / "tfds", name="../x")


# --- reruns and crashes --------------------------------------------------------------------------


def test_rerun_reuses_detects_stale_inputs_and_overwrites(bad_root, tmp_path):
  path = tmp_path / "recs.jsonl"
  records.write_jsonl([_good("g1"), _good("g2")], path)
  data_dir = tmp_path / "tfds"
  first = tfds_io.build_dataset({"train": [path]}, [bad_root], data_dir)
  shard = next(tfds_io.dataset_path(data_dir).glob("*.array_record-*"))
  stamp = shard.stat().st_mtime_ns

  again = tfds_io.build_dataset({"train": [path]}, [bad_root], data_dir)
  assert again.reused and not first.reused
  assert again.splits == first.splits
  assert shard.stat().st_mtime_ns == stamp  # nothing was rewritten

  with pytest.raises(tfds_io.StaleDatasetError, match="other inputs"):
    tfds_io.build_dataset({"train": [path]}, [bad_root], data_dir, skip_bad_records=True)
  records.write_jsonl([_good("g1"), _good("g2"), _good("g3")], path)
  with pytest.raises(tfds_io.StaleDatasetError, match="overwrite"):
    tfds_io.build_dataset({"train": [path]}, [bad_root], data_dir)
  rebuilt = tfds_io.build_dataset({"train": [path]}, [bad_root], data_dir, overwrite=True)
  assert not rebuilt.reused and rebuilt.splits["train"].records == 3
  assert len(tfds_io.load_split(data_dir, "train")) == 3


class _Crash(BaseException):
  """Stands for an interrupt: not an Exception, so no skip logic may swallow it."""


def test_exception_mid_build_leaves_no_finished_dataset(bad_root, tmp_path, monkeypatch):
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  records.write_jsonl([_good("g1"), _good("g2")], a)
  records.write_jsonl([_good("h1")], b)
  data_dir = tmp_path / "tfds"
  real, calls = builder_lib.check_image, []

  def crash_on_third(data):
    calls.append(1)
    if len(calls) == 3:  # the first image of the second split
      raise _Crash
    real(data)

  monkeypatch.setattr(builder_lib, "check_image", crash_on_third)
  with pytest.raises(_Crash):
    tfds_io.build_dataset({"train": [a], "test": [b]}, [bad_root], data_dir)
  with pytest.raises(FileNotFoundError):
    tfds_io.load_split(data_dir, "train")
  monkeypatch.setattr(builder_lib, "check_image", real)
  report = tfds_io.build_dataset({"train": [a], "test": [b]}, [bad_root], data_dir)
  assert not report.reused and len(tfds_io.load_split(data_dir, "test")) == 1


def test_killed_build_is_not_mistaken_for_finished(bad_root, tmp_path):
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  records.write_jsonl([_good("g1"), _good("g2")], a)
  records.write_jsonl([_good("h1")], b)
  data_dir = tmp_path / "tfds"
  inputs = {"train": [str(a)], "test": [str(b)]}
  # SIGKILL runs no cleanup: TFDS's temporary directory stays behind with the train split.
  script = textwrap.dedent(f"""
    import os, signal
    from compact_jax.data import tfds_io
    from tfds_builders.llava_records import llava_records as b
    real, calls = b.check_image, []
    def check(data):
      calls.append(1)
      if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
      real(data)
    b.check_image = check
    tfds_io.build_dataset({inputs!r}, [{str(bad_root)!r}], {str(data_dir)!r})
  """)
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True)
  assert proc.returncode == -9, proc.stderr.decode()[-2000:]
  path = tfds_io.dataset_path(data_dir)
  leftovers = list(path.parent.glob("incomplete.*"))
  assert len(leftovers) == 1 and list(leftovers[0].glob("*train.array_record*"))
  assert not path.exists()
  with pytest.raises(FileNotFoundError, match="interrupted build"):
    tfds_io.load_split(data_dir, "train")

  report = tfds_io.build_dataset(inputs, [bad_root], data_dir)
  assert not report.reused
  assert not list(path.parent.glob("incomplete.*"))
  assert [tfds_io.load_split(data_dir, "train")[i]["id"] for i in range(2)] == ["g1", "g2"]


# --- `tfds build` ----------------------------------------------------------------------------------


def _tfds_build(argv: list[str]) -> None:
  """Runs `tfds build ARGV` in-process. The real entry point (scripts/cli/main.py) imports
  TensorFlow for an unrelated subcommand's type hints; the build command itself does not.

  The CLI imports the builder as the top-level module `llava_records.llava_records`, once per
  process (TFDS keeps a registry per module name), so both CLI tests share that import.
  """
  from tensorflow_datasets.scripts.cli import build as build_cli

  simple_parsing.parse(build_cli.Args, args=argv).execute()


def test_tfds_build_cli_manual_dir(corpus, tmp_path):
  manual = tmp_path / "manual"
  # The manual dir is the image root: copy both roots' images and rewrite nothing.
  for root in corpus["roots"]:
    for f in root.rglob("*"):
      if f.is_file():
        dest = manual / f.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.read_bytes())
  records.write_jsonl(corpus["inputs"]["train"], manual / "train.jsonl")
  (manual / "test.json").write_text(json.dumps(corpus["inputs"]["test"]))
  out = tmp_path / "out"
  _tfds_build(
    [str(REPO / "tfds_builders/llava_records"), "--manual_dir", str(manual), "--data_dir", str(out)]
  )
  for split, inputs in corpus["inputs"].items():
    source = tfds_io.load_split(out, split, name="manual")
    assert [source[i] for i in range(len(source))] == [
      expected_record(r, corpus["files"]) for r in inputs
    ]


def test_tfds_build_cli_json_config(corpus, tmp_path):
  config = {
    "name": "from_cli",
    "records": {s: [str(p) for p in ps] for s, ps in corpus["records"].items()},
    "image_roots": [str(r) for r in corpus["roots"]],
  }
  out = tmp_path / "out"
  _tfds_build(
    [
      str(REPO / "tfds_builders/llava_records"),
      "--data_dir",
      str(out),
      "--config",
      json.dumps(config),
    ]
  )
  source = tfds_io.load_split(out, "train", name="from_cli")
  expected = [expected_record(r, corpus["files"]) for r in corpus["inputs"]["train"]]
  assert [source[i] for i in range(len(source))] == expected
  # The same inputs through build_dataset are recognised as already built.
  assert tfds_io.build_dataset(corpus["records"], corpus["roots"], out, name="from_cli").reused
