"""Dense captions: exact text for hand-built scenes, one per train image, no test images."""

import pytest

from compact_jax.world import caption
from compact_jax.world import scene as scene_lib
from tests.world.hand_built import make_scene, obj
from tests.world.test_generate import read_jsonl, run  # noqa: F401  (module fixture)


def test_caption_of_a_hand_built_scene():
  scene = make_scene(
    obj(2, 2, "yellow", "house", letter="e"),
    obj(0, 1, "orange", "square", motion="up"),
    obj(3, 1, "blue", "fish", letter="k", motion="left"),
    ground="grass",
    patch=(0, 0, 2, 2),
    patch_ground="snow",
    links=((1, 2),),
  )
  assert caption.describe(scene) == (
    "grass, snow patch. 12 orange square moving up. 33 yellow house letter e. "
    "42 blue fish letter k moving left. rope 33 42."
  )
  plain = make_scene(obj(3, 0, "red", "circle"), ground="water")
  assert caption.describe(plain) == "water. 41 red circle."


def test_large_grids_separate_row_and_column():
  scene = make_scene(obj(10, 2, "green", "tree"), ground="road", grid_size=12)
  assert caption.describe(scene) == "road. 11,3 green tree."


def test_generate_writes_one_caption_per_train_image(run):  # noqa: F811
  root, summary = run
  out = root / "generate"
  assert summary["captions"] == "captions.jsonl"
  caps = read_jsonl(out / "captions.jsonl")
  train = read_jsonl(out / "train.jsonl")
  assert [c["id"] for c in caps] == [r["id"] + "_caption" for r in train]
  scenes = {
    d["id"]: scene_lib.Scene.from_json(d["scene"]) for d in read_jsonl(out / "scenes/train.jsonl")
  }
  for cap, rec in zip(caps, train):
    assert cap["image"] == rec["image"] and (out / cap["image"]).exists()
    human, gpt = cap["conversations"]
    assert human == {"from": "human", "value": "<image>\n" + caption.PROMPT}
    assert gpt["value"] == caption.describe(scenes[rec["id"]])
  test_images = {r["image"] for r in read_jsonl(out / "test.jsonl")}
  assert not test_images & {c["image"] for c in caps}


def test_a_record_without_a_scene_is_named(tmp_path):
  with pytest.raises(ValueError, match="'x_7' has no scene graph"):
    list(caption.caption_records([{"id": "x_7", "image": "a.png"}], {}))
