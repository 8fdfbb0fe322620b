"""The renderer draws what the scene graph says."""

import numpy as np
import pytest

from compact_jax.world import render
from compact_jax.world import scene as scene_lib
from tests.world.hand_built import make_scene, obj

S = 64  # 4x4 cells of 16 px: margin 2, object box 12


def _fill_colour(name):
  return np.array(scene_lib.COLORS[name], np.uint8)


@pytest.mark.parametrize("kind", scene_lib.KINDS)
def test_centre_pixel_has_fill_colour(kind):
  s = make_scene(obj(1, 2, "purple", kind), obj(3, 0, "yellow", kind, motion="up"))
  img = render.render_scene(s, S)
  for o in s.objects:
    y, x = render.object_box(o, S, 4)
    assert (img[y + 6, x + 6] == _fill_colour(o.color)).all(), (kind, o)
  # The motion shift moves the box up by the margin (2 px) inside its cell.
  assert render.object_box(s.objects[0], S, 4) == (1 * 16 + 2, 2 * 16 + 2)
  assert render.object_box(s.objects[1], S, 4) == (3 * 16, 0 * 16 + 2)


def test_form_is_outlined_in_ink_whatever_the_fill():
  # The outline (ink pixels) of a shape is identical for every fill colour.
  inks = []
  for color in scene_lib.COLORS:
    img = render.render_scene(make_scene(obj(0, 0, color, "triangle"), ground="snow"), S)
    inks.append((img[2:14, 2:14] == render.INK).all(-1))
  assert all((ink == inks[0]).all() for ink in inks)
  assert inks[0].sum() > 12


def test_grounds_are_distinguishable():
  means = {}
  for g in scene_lib.GROUNDS:
    img = render.render_scene(make_scene(ground=g), S).astype(float)
    base, pattern = render.GROUND_COLORS[g]
    # Every pixel is the ground's base or pattern colour.
    is_base = (img == base).all(-1)
    is_pattern = (img == pattern).all(-1)
    assert (is_base | is_pattern).all()
    assert 0.02 < is_pattern.mean() < 0.5
    means[g] = img.mean((0, 1))
  names = list(means)
  for i, a in enumerate(names):
    for b in names[i + 1 :]:
      assert np.abs(means[a] - means[b]).max() > 30, (a, b)


def test_patch_cells_show_the_patch_ground():
  s = make_scene(ground="grass", patch=(2, 2, 2, 2), patch_ground="snow")
  img = render.render_scene(s, S)
  snow = render.ground_texture("snow", S)
  grass = render.ground_texture("grass", S)
  assert (img[32:, 32:] == snow[32:, 32:]).all()
  assert (img[:32] == grass[:32]).all()


def test_letter_plate_shows_glyph():
  img = render.render_scene(make_scene(obj(0, 0, "blue", "square", letter="t")), S)
  plate = img[2 + 3 : 2 + 8, 2 + 3 : 2 + 8]  # 5x5 plate centred in the 12 px box
  glyph = np.array([[ch == "#" for ch in row] for row in render.GLYPHS["t"]])
  assert (plate[glyph] == render.INK).all()
  assert (plate[~glyph] == render.PLATE).all()


def test_motion_streaks_trail_the_object():
  moving = render.render_scene(make_scene(obj(1, 1, "red", "circle", motion="right")), S)
  still = render.render_scene(make_scene(obj(1, 1, "red", "circle")), S)
  cell_m, cell_s = moving[16:32, 16:32], still[16:32, 16:32]
  trail = (cell_m[:, 0:3] == render.INK).all(-1)  # the trailing (left) 3 columns
  assert trail.sum(0).tolist() == [3, 3, 3]  # three horizontal streaks
  assert sorted(set(np.nonzero(trail)[0])) == [2 + 3, 2 + 6, 2 + 9]  # at 1/4, 1/2, 3/4 of the box
  assert not (cell_s[:, 0:2] == render.INK).all(-1).any()  # the still box starts at column 2
  # The object moved right by the margin: its outline now reaches the cell's last column.
  assert (cell_m[:, 15] == render.INK).all(-1).any()
  assert not (cell_s[:, 14:] == render.INK).all(-1).any()


def test_rope_between_tied_objects():
  s = make_scene(obj(0, 0), obj(0, 3, "blue"), links=[(0, 1)])
  img = render.render_scene(s, S)
  # Between the two boxes, 4 px around y = 8, in the rope's own colour.
  band = (img[6:10, 14:50] == render.ROPE).all(-1)
  assert band.all()
  assert not (img[[5, 10], 14:50] == render.ROPE).all(-1).any()
  untied = render.render_scene(make_scene(obj(0, 0), obj(0, 3, "blue")), S)
  assert not (untied == render.ROPE).all(-1).any()


def test_deterministic_and_sizes():
  s = make_scene(
    obj(0, 0, "green", "fish", letter="z", motion="down"), obj(2, 1, "orange", "house")
  )
  a, b = render.render_scene(s, S), render.render_scene(s, S)
  assert a.dtype == np.uint8 and a.shape == (S, S, 3) and (a == b).all()
  big = render.render_scene(s, 128)  # 32 px cells: sprites scale to a 24 px box
  y, x = render.object_box(s.objects[1], 128, 4)
  assert (big[y + 12, x + 12] == _fill_colour("orange")).all()
  with pytest.raises(ValueError, match="multiple of grid_size"):
    render.render_scene(s, 66)
  with pytest.raises(ValueError, match="too small"):
    render.render_scene(s, 32)
