"""The vision stage: exact cell labels, patch-to-cell maps, a learning tower, a loadable npz."""

import json

import jax
import numpy as np
import pytest

import configs.tiny_world as tiny_world
from compact_jax.checkpoints import big_vision
from compact_jax.train import mesh as mesh_lib
from compact_jax.train import state as state_lib
from compact_jax.world import render, vision
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
  got = vision.cell_labels(scene, 64)
  names = list(vision.ATTRIBUTES)
  assert got.shape == (16, len(names))
  col = {n: got[:, names.index(n)] for n in names}
  grass, snow = (
    vision.ATTRIBUTES["ground"].index("grass"),
    vision.ATTRIBUTES["ground"].index("snow"),
  )
  expected_ground = [grass] * 8 + [snow, snow, grass, grass] * 2
  assert col["ground"].tolist() == expected_ground
  # Positions name the cell's row and column counted from 1, as captions write cells.
  assert [vision.ATTRIBUTES["row"][i] for i in col["row"]] == [
    str(r) for r in range(1, 5) for _ in range(4)
  ]
  assert [vision.ATTRIBUTES["col"][i] for i in col["col"]] == ["1", "2", "3", "4"] * 4
  # The rope ties (3, 0) to (3, 2) along row 3: it shows in the margins of both
  # object cells and all along the empty cell (3, 1) between them, nowhere else.
  assert np.flatnonzero(col["rope_line"]).tolist() == [12, 13, 14]
  objects = ["color", "kind", "letter", "motion", "rope"]

  def object_labels(cell):
    return [int(col[n][cell]) for n in objects]

  # Cell 1 = row 0, column 1; cell 14 = row 3, column 2; "none" (0) elsewhere.
  assert object_labels(1) == [
    vision.ATTRIBUTES["color"].index("orange"),
    vision.ATTRIBUTES["kind"].index("square"),
    0,
    vision.ATTRIBUTES["motion"].index("up"),
    vision.ATTRIBUTES["rope"].index("free"),
  ]
  assert object_labels(14) == [
    vision.ATTRIBUTES["color"].index("blue"),
    vision.ATTRIBUTES["kind"].index("fish"),
    vision.ATTRIBUTES["letter"].index("k"),
    0,
    vision.ATTRIBUTES["rope"].index("tied"),
  ]
  # Objects are stored row-major: (3, 0) is object 1, tied to (3, 2), object 2.
  assert object_labels(12) == [
    vision.ATTRIBUTES["color"].index("red"),
    vision.ATTRIBUTES["kind"].index("circle"),
    0,
    0,
    vision.ATTRIBUTES["rope"].index("tied"),
  ]
  rest = np.delete(np.stack([col[n] for n in objects], 1), [1, 12, 14], axis=0)
  assert not rest.any()


def test_rope_pixels_are_the_visible_rope():
  # A rope along row 0 from (0, 0) to (0, 3) at 64 px: 4 px wide around y = 8, so rows
  # 6-9; it shows all along the empty cells (0, 1) and (0, 2), 4 x 16 px each, in brown.
  scene = make_scene(obj(0, 0, "red", "square"), obj(0, 3, "blue", "square"), links=((0, 1),))
  mask = render.rope_pixels(scene, 64)
  per_cell = mask.reshape(4, 16, 4, 16).sum((1, 3))
  assert per_cell[0, 1] == per_cell[0, 2] == 64
  assert np.flatnonzero(mask[:, 16:48].any(1)).tolist() == [6, 7, 8, 9]
  assert per_cell[1:].sum() == 0
  # Squares fill their box, so only the 2 px margins next to the rope show it.
  assert per_cell[0, 0] == per_cell[0, 3] == 8
  img = render.render_scene(scene, 64)
  assert (img[mask] == render.ROPE).all()
  assert not render.rope_pixels(make_scene(*scene.objects), 64).any()


def test_cell_labels_reject_grids_positions_cannot_name():
  scene = make_scene(obj(0, 0, "red", "square"), grid_size=10)
  with pytest.raises(ValueError, match="grid_size is 10"):
    vision.cell_labels(scene, 120)


def test_chance_counts_the_grid_for_positions():
  got = vision.chance(4)
  assert got["row"] == got["col"] == 0.25
  assert got["rope_line"] == 0.5 and got["ground"] == 1 / 5
  assert got["kind"] == 1 / 10  # object attributes never answer "none"


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
