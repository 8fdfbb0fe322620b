"""The vision stage: exact cell labels, patch-to-cell maps, a learning tower, a loadable npz."""

import json

import jax
import numpy as np
import pytest

import configs.tiny_world as tiny_world
from compact_jax.checkpoints import big_vision
from compact_jax.train import mesh as mesh_lib
from compact_jax.train import state as state_lib
from compact_jax.world import vision
from tests.world.hand_built import make_scene, obj
from tests.world.test_generate import run  # noqa: F401  (module fixture)


def test_cell_labels_of_a_hand_built_scene():
  scene = make_scene(
    obj(0, 1, "orange", "square", motion="up"),
    obj(3, 2, "blue", "fish", letter="k"),
    obj(3, 0, "red", "circle"),
    links=((1, 2),),
    ground="grass",
    patch=(2, 0, 2, 2),
    patch_ground="snow",
  )
  got = vision.cell_labels(scene)
  assert got.shape == (16, 6)
  grass, snow = (
    vision.ATTRIBUTES["ground"].index("grass"),
    vision.ATTRIBUTES["ground"].index("snow"),
  )
  expected_ground = [grass] * 8 + [snow, snow, grass, grass] * 2
  assert got[:, 0].tolist() == expected_ground
  # Cell 1 = row 0, column 1; cell 14 = row 3, column 2; "none" (0) elsewhere.
  assert got[1, 1:].tolist() == [
    vision.ATTRIBUTES["color"].index("orange"),
    vision.ATTRIBUTES["kind"].index("square"),
    0,
    vision.ATTRIBUTES["motion"].index("up"),
    vision.ATTRIBUTES["rope"].index("free"),
  ]
  assert got[14, 1:].tolist() == [
    vision.ATTRIBUTES["color"].index("blue"),
    vision.ATTRIBUTES["kind"].index("fish"),
    vision.ATTRIBUTES["letter"].index("k"),
    0,
    vision.ATTRIBUTES["rope"].index("tied"),
  ]
  # Objects are stored row-major: (3, 0) is object 1, tied to (3, 2), object 2.
  assert got[12, 1:].tolist() == [
    vision.ATTRIBUTES["color"].index("red"),
    vision.ATTRIBUTES["kind"].index("circle"),
    0,
    0,
    vision.ATTRIBUTES["rope"].index("tied"),
  ]
  assert not np.delete(got[:, 1:], [1, 12, 14], axis=0).any()


def test_patch_cells():
  assert vision.patch_cells(4, 64, 16).tolist() == list(range(16))
  eight = vision.patch_cells(4, 64, 8).reshape(8, 8)
  assert eight[0, :4].tolist() == [0, 0, 1, 1] and eight[7, 7] == 15 and eight[2, 5] == 6
  with pytest.raises(ValueError, match="do not tile"):
    vision.patch_cells(4, 64, 12)


def test_stage_trains_the_tower_and_writes_a_loadable_npz(run):  # noqa: F811
  root, _ = run
  config = tiny_world.get_config("smoke")
  with config.unlocked():
    config.vision.total_steps = 80
    config.vision.lr = 3e-3
  report = vision.run_vision(config, root)
  acc, chance = report["test_accuracy"], report["chance"]
  # The ground covers whole cells: even the smoke tower reads it well above chance.
  assert acc["ground"] > 2 * chance["ground"], acc
  saved = json.loads((root / "vision" / vision.REPORT_FILE).read_text())
  assert saved == report
  assert vision.run_vision(config, root) == report  # finished: skipped

  # The npz holds exactly the VLM's img/ params and loads through model_init.
  mesh = mesh_lib.make_mesh(config.mesh)
  setup, init_fn = state_lib.setup_state(config, vocab_size=64, mesh=mesh)
  with jax.set_mesh(mesh):
    params = init_fn()["params"]
  img = {k: v for k, v in mesh_lib.path_names(params).items() if k.startswith("img/")}
  npz = big_vision.NpzCheckpoint(str(root / "vision" / vision.NPZ_FILE))
  assert all(k.startswith("params/img/") for k in npz)  # the tower only, no heads
  loaded = state_lib.load_model_init(
    params, setup.shardings["params"], config.model_init, str(root)
  )
  got = mesh_lib.path_names(loaded)
  changed = [k for k in img if not np.array_equal(np.asarray(got[k]), np.asarray(img[k]))]
  assert changed, "model_init did not replace the tower's fresh init"
  # Unstacked names (big_vision stacks encoder blocks) map one to one.
  for k in ("img/embedding/kernel", "img/pos_embedding"):
    np.testing.assert_array_equal(np.asarray(got[k]), npz[f"params/{k}"])
  assert all(np.array_equal(got[k], params_k) for k, params_k in
             mesh_lib.path_names(params).items() if not k.startswith("img/"))  # fmt: skip
