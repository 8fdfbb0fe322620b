"""Redraws docs/tiny_world_samples.png: the first eight scenes of seed 0 with the world
settings of configs/tiny_world.py, each 64 px image enlarged 3x (nearest neighbour).

  python docs/make_tiny_world_samples.py
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

import configs.tiny_world as tiny_world
from compact_jax.world import render as render_lib
from compact_jax.world import scene as scene_lib
from compact_jax.world.rand import Rand

OUT = pathlib.Path(__file__).resolve().parent / "tiny_world_samples.png"


def main(cols: int = 4, rows: int = 2, zoom: int = 3, gap: int = 8) -> None:
  w = tiny_world.get_config().world
  side = w.image_size * zoom
  sheet = Image.new(
    "RGB", (cols * side + (cols - 1) * gap, rows * side + (rows - 1) * gap), "white"
  )
  for i in range(cols * rows):
    rng = Rand.spawn(np.random.default_rng([0, i]))
    scene = scene_lib.sample_scene(
      rng, grid_size=w.grid_size, min_objects=w.min_objects, max_objects=w.max_objects
    )
    img = Image.fromarray(render_lib.render_scene(scene, w.image_size), "RGB")
    img = img.resize((side, side), Image.Resampling.NEAREST)
    sheet.paste(img, ((i % cols) * (side + gap), (i // cols) * (side + gap)))
  sheet.save(OUT)
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
