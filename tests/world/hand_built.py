"""Hand-built scenes for the world tests."""

from compact_jax.world import scene as scene_lib


def obj(row, col, color="red", kind="circle", letter=None, motion=None) -> scene_lib.WorldObject:
  return scene_lib.WorldObject(row, col, color, kind, letter, motion)


def make_scene(*objects, ground="grass", links=(), patch=None, patch_ground=None, grid_size=4):
  """A scene with objects sorted by cell, as the sampler makes them."""
  objs = tuple(sorted(objects, key=lambda o: (o.row, o.col)))
  scene = scene_lib.Scene(grid_size, ground, objs, tuple(links), patch, patch_ground)
  scene_lib.validate_scene(scene)
  return scene
