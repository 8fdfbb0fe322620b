"""Scene records: JSON round trip, validation errors, regions, ropes, sampling."""

import dataclasses
import json

import numpy as np
import pytest

from compact_jax.world import scene as scene_lib
from compact_jax.world.rand import Rand
from tests.world.hand_built import make_scene, obj


def test_json_round_trip_and_hash():
  s = make_scene(
    obj(0, 0, "red", "car", letter="k", motion="left"),
    obj(2, 3, "blue", "triangle"),
    links=[(0, 1)],
    patch=(1, 1, 2, 2),
    patch_ground="snow",
  )
  text = json.dumps(s.to_json())
  back = scene_lib.Scene.from_json(json.loads(text))
  assert back == s
  assert scene_lib.scene_hash(back) == scene_lib.scene_hash(s)
  moved = make_scene(
    obj(0, 1, "red", "car", letter="k", motion="left"), obj(2, 3, "blue", "triangle")
  )
  assert scene_lib.scene_hash(moved) != scene_lib.scene_hash(s)


@pytest.mark.parametrize(
  "mutate, message",
  [
    (lambda d: d["objects"][0].update(color="pink"), "objects[0]: color='pink'"),
    (lambda d: d["objects"][1].update(row=9), "objects[1]: cell (9, 3) outside"),
    (lambda d: d["objects"][1].update(row=0, col=0), "objects[1]: cell (0, 0) holds two"),
    (lambda d: d.update(links=[[0, 5]]), "link (0, 5)"),
    (lambda d: d.update(ground="lava"), "ground='lava'"),
    (lambda d: d.update(patch=[3, 3, 2, 2]), "patch=(3, 3, 2, 2) does not fit"),
    (lambda d: d.pop("objects"), "missing key 'objects'"),
  ],
)
def test_bad_scene_names_record_and_key(mutate, message):
  d = make_scene(obj(0, 0), obj(2, 3, "blue", "square")).to_json()
  mutate(d)
  with pytest.raises(ValueError, match="tw_test_000003") as e:
    scene_lib.Scene.from_json(d, where="tw_test_000003")
  assert message in str(e.value)


def test_region_names():
  assert scene_lib.region_name(0, 0, 4) == "top left"
  assert scene_lib.region_name(1, 2, 4) == "top right"
  assert scene_lib.region_name(3, 1, 4) == "bottom left"
  assert scene_lib.region_name(2, 3, 4) == "bottom right"
  # Odd grids have a middle row and a center column.
  assert scene_lib.region_name(1, 1, 3) == "center"
  assert scene_lib.region_name(0, 1, 3) == "top"
  assert scene_lib.region_name(1, 2, 3) == "right"
  assert len(scene_lib.regions(4)) == 4


def test_ground_patch():
  s = make_scene(obj(1, 1), obj(3, 3), ground="sand", patch=(0, 0, 2, 2), patch_ground="water")
  assert s.object_ground(0) == "water" and s.object_ground(1) == "sand"
  assert s.place is None
  assert make_scene(obj(1, 1), ground="road").place == "road"


def test_rope_clearance():
  # A rope along row 0 from column 0 to 3 passes through cells (0,1), (0,2).
  assert not scene_lib.rope_is_clear((0, 0), (0, 3), [(0, 2)])
  assert scene_lib.rope_is_clear((0, 0), (0, 3), [(1, 2)])
  # The diagonal from (0,0) to (2,2) crosses the centre of (1,1) but not (1,0).
  assert not scene_lib.rope_is_clear((0, 0), (2, 2), [(1, 1)])
  assert scene_lib.rope_is_clear((0, 0), (2, 2), [(1, 0), (0, 1)])


def test_sampled_scenes_are_valid_and_deterministic():
  a = [scene_lib.sample_scene(Rand(7), grid_size=4, min_objects=1, max_objects=5)]
  b = [scene_lib.sample_scene(Rand(7), grid_size=4, min_objects=1, max_objects=5)]
  assert a == b
  rng = np.random.default_rng(0)
  for _ in range(200):
    s = scene_lib.sample_scene(rng, grid_size=4, min_objects=2, max_objects=6)
    scene_lib.validate_scene(s)
    assert 2 <= len(s.objects) <= 6
    cells = [(o.row, o.col) for o in s.objects]
    for i, j in s.links:
      others = [c for k, c in enumerate(cells) if k not in (i, j)]
      assert scene_lib.rope_is_clear(cells[i], cells[j], others)
    assert len({x for link in s.links for x in link}) == 2 * len(s.links)  # disjoint pairs


def test_memo_is_invisible_to_equality_hashing_and_copies():
  s = make_scene(obj(0, 0, color="red", kind="car"), obj(0, 2, color="blue", kind="circle"))
  twin = make_scene(obj(0, 0, color="red", kind="car"), obj(0, 2, color="blue", kind="circle"))
  h = hash(s)
  assert s.column("color") == ("red", "blue") and s.column("kind") == ("car", "circle")
  assert s.column("region") == tuple(s.region(i) for i in range(2))
  calls = []
  assert s.memo("x", lambda sc: calls.append(1) or len(sc.objects)) == 2
  assert s.memo("x", lambda sc: calls.append(1) or 0) == 2 and calls == [1]  # computed once
  assert s == twin and hash(s) == h == hash(twin) and s.to_json() == twin.to_json()
  moved = dataclasses.replace(s, objects=(obj(1, 1, color="green", kind="car"),))
  assert moved.column("color") == ("green",)  # a copy does not inherit the memo
