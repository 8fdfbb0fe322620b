"""The generate stage: record contract, determinism, resume, held-out sets, statistics."""

import collections
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from compact_jax import capabilities as caps_lib
from compact_jax.world import generate, verify
from compact_jax.world import questions as Q
from compact_jax.world import scene as scene_lib
from compact_jax.world.rand import Rand
from configs import base

SUFFIX = base.SHORT_ANSWER


def make_config(train=120, test=60, seed=3, **world):
  c = base.get_config()
  c.seed = seed
  c.world.num_train_images = train
  c.world.num_test_images = test
  c.world.num_workers = 0
  for key, value in world.items():
    setattr(c.world, key, value)
  return c


def files(root: Path) -> dict[str, bytes]:
  """Every output file's bytes, except summary.json (it holds the run time)."""
  out = {}
  for p in sorted((root / "generate").rglob("*")):
    if p.is_file() and p.name != "summary.json":
      out[str(p.relative_to(root))] = p.read_bytes()
  return out


def read_jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen")
  summary = generate.run_generate(make_config(), root)
  return root, summary


def test_records_follow_the_contract(run):
  root, _ = run
  out = root / "generate"
  heldout = {tuple(s.split("+")) for s in base.get_config().world.heldout_combinations}
  for split, n, ks in (("train", 120, (1, 2, 3)), ("test", 60, (1, 2, 3, 4, 5))):
    records = read_jsonl(out / f"{split}.jsonl")
    scenes = read_jsonl(out / "scenes" / f"{split}.jsonl")
    assert [r["id"] for r in records] == [f"tw_{split}_{i:06d}" for i in range(n)]
    assert [s["id"] for s in scenes] == [r["id"] for r in records]
    for rec, sc in zip(records, scenes):
      assert rec["image"] == f"images/{split}/{rec['id']}.png"
      assert rec["source"] == "tiny_world" and rec["k"] in ks
      with Image.open(out / rec["image"]) as im:
        assert im.mode == "RGB" and im.size == (64, 64)
      turns = rec["conversations"]
      assert 2 <= len(turns) // 2 <= 3 and len(turns) % 2 == 0
      scene = scene_lib.Scene.from_json(sc["scene"], where=rec["id"])
      combos = set()
      for i, (human, gpt, q) in enumerate(zip(turns[::2], turns[1::2], sc["questions"])):
        assert human["from"] == "human" and gpt["from"] == "gpt"
        caps = tuple(human["capability"])
        assert caps == caps_lib.canonical(caps) and human["k"] == len(caps) == rec["k"]
        assert human["heldout"] == (caps in heldout)
        if split == "train":
          assert caps not in heldout
        combos.add(caps)
        program = Q.Program.from_json(q["program"])
        text = Q.question_text(program)
        if i == 0:
          assert human["value"] == f"<image>\n{text}{SUFFIX}"
        else:
          assert human["value"] == text
        assert human["qtype"] == Q.qtype(program)
        # Independent re-check of every written question on the written scene.
        report = verify.verify_question(scene, program, caps, Rand(i))
        assert report.ok, (rec["id"], text, report.failures)
        assert gpt["value"] == report.answer == q["answer"]
      assert len(combos) == len(turns) // 2  # no capability set twice in one image


def test_summary_matches_the_files(run):
  root, summary = run
  out = root / "generate"
  for split in ("train", "test"):
    records = read_jsonl(out / f"{split}.jsonl")
    sp = summary["splits"][split]
    humans = [t for r in records for t in r["conversations"][::2]]
    assert sp["images"] == len(records) and sp["questions"] == len(humans)
    per_k = collections.Counter(str(t["k"]) for t in humans)
    assert {k: v["questions"] for k, v in sp["per_k"].items()} == dict(per_k)
    per_cap = collections.Counter(c for t in humans for c in t["capability"])
    assert sp["per_capability"] == {c: per_cap[c] for c in caps_lib.CAPABILITIES}
    assert sp["heldout_questions"] == sum(t["heldout"] for t in humans)
  train = {s["hash"] for s in read_jsonl(out / "scenes" / "train.jsonl")}
  test = [s["hash"] for s in read_jsonl(out / "scenes" / "test.jsonl")]
  assert summary["test_train_overlap"] == sum(h in train for h in test) == 0
  assert json.loads((out / "summary.json").read_text()) == summary


def test_answers_are_not_degenerate_and_every_k1_capability_occurs(run):
  _, summary = run
  for query, st in summary["splits"]["train"]["answers_by_query"].items():
    if st["questions"] >= 20:
      assert st["distinct_answers"] >= 2 and st["top_answer_fraction"] < 0.75, (query, st)
  k1 = summary["splits"]["train"]["per_capability_and_k"]
  assert all(k1[c].get("1", 0) > 0 for c in caps_lib.CAPABILITIES), k1


def test_same_seed_same_bytes_other_seed_other_data(run, tmp_path):
  root, summary = run
  again = generate.run_generate(make_config(), tmp_path / "a")
  assert files(tmp_path / "a") == files(root)
  assert {k: v for k, v in again.items() if k != "seconds"} == {
    k: v for k, v in summary.items() if k != "seconds"
  }
  generate.run_generate(make_config(train=20, test=8, seed=4), tmp_path / "b")
  first = [files(d)["generate/train.jsonl"].split(b"\n")[0] for d in (tmp_path / "b", root)]
  assert first[0] != first[1]


@pytest.mark.parametrize("split, cut", [("train", 47), ("test", 23)])
def test_resume_after_interruption_gives_identical_output(run, tmp_path, split, cut):
  root, summary = run
  work = tmp_path / "w"
  shutil.copytree(root, work)
  out = work / "generate"
  (out / "summary.json").unlink()
  rec = out / f"{split}.jsonl"
  lines = rec.read_bytes().split(b"\n")
  # Killed while writing record `cut`: its line is torn, its image and scene line
  # already exist, later ones do not (their images must not be needed).
  rec.write_bytes(b"\n".join(lines[:cut]) + b"\n" + lines[cut][:25])
  scenes = out / "scenes" / f"{split}.jsonl"
  scenes.write_bytes(b"\n".join(scenes.read_bytes().split(b"\n")[: cut + 1]) + b"\n")
  if split == "train":  # nothing of test was written yet
    (out / "test.jsonl").unlink()
    (out / "scenes" / "test.jsonl").unlink()
    shutil.rmtree(out / "images" / "test")
  for png in sorted((out / "images" / split).glob("*.png"))[cut + 1 :]:
    png.unlink()
  resumed = generate.run_generate(make_config(), work)
  assert files(work) == files(root)
  assert resumed["splits"] == summary["splits"]


def test_finished_stage_is_skipped_and_overwrite_starts_clean(run, tmp_path):
  root, summary = run
  work = tmp_path / "w"
  shutil.copytree(root, work)
  marker = work / "generate" / "train.jsonl"
  marker.write_text("not regenerated\n")
  assert generate.run_generate(make_config(), work) == summary
  assert marker.read_text() == "not regenerated\n"
  c = make_config()
  c.overwrite = True
  (work / "generate" / "stray.txt").write_text("x")
  generate.run_generate(c, work)
  assert files(work) == files(root)


def test_partial_run_with_other_settings_is_an_error(tmp_path):
  c = make_config(train=10, test=4)
  generate.run_generate(c, tmp_path)
  (tmp_path / "generate" / "summary.json").unlink()
  with pytest.raises(ValueError, match=r"other world settings \(keys \['max_objects'\]\)"):
    generate.run_generate(make_config(train=10, test=4, max_objects=4), tmp_path)


def test_heldout_combinations_are_asked_in_test_only(tmp_path):
  c = make_config(train=30, test=20, train_k=(3,), test_k=(3,), heldout_test_rate=1.0)
  summary = generate.run_generate(c, tmp_path)
  assert summary["splits"]["train"]["heldout_questions"] == 0
  assert summary["splits"]["train"]["rejections"]["heldout_sets_skipped_in_train"] > 0
  test = read_jsonl(tmp_path / "generate" / "test.jsonl")
  marked = [t for r in test for t in r["conversations"][::2] if t["heldout"]]
  assert len(marked) >= 10
  assert {"+".join(t["capability"]) for t in marked} <= set(c.world.heldout_combinations)


def test_worker_processes_give_the_same_output(tmp_path):
  generate.run_generate(make_config(train=32, test=16), tmp_path / "one")
  generate.run_generate(make_config(train=32, test=16, num_workers=2), tmp_path / "two")
  assert files(tmp_path / "one") == files(tmp_path / "two")


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("questions_per_image", (3, 2), "questions_per_image"),
    ("capability_weights", {"colour": 2.0}, "capability_weights"),
    ("heldout_combinations", ("color+size",), "heldout_combinations 'color\\+size'"),
    ("test_k", (0, 11), "test_k"),
    ("max_objects", 20, "3/4 of the cells"),
  ],
)
def test_bad_world_settings_are_rejected(key, value, message):
  c = make_config()
  c.world[key] = value
  with pytest.raises(ValueError, match=message):
    generate.WorldSettings.from_config(c)
