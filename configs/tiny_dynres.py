"""The tiny world at twice the resolution, seen through dynamic-resolution tiles.

  python -m compact_jax.main --config=configs/tiny_dynres.py --workdir=/tmp/tdr
  python -m compact_jax.main --config=configs/tiny_dynres.py:smoke --workdir=/tmp/tdr_smoke
  python -m compact_jax.main --config=configs/tiny_dynres.py:smoke,mode=anyres --workdir=...

As configs/tiny_world.py, except that scenes are drawn at 128 px and the model reads
them as InternVL-1.5 (or AnyRes) tiles of data.image_size = 64 px: a 64 px thumbnail
(exactly the tiny world's usual input, so the vision stage's tower fits it as before)
and a 2 x 2 grid of full-resolution tiles, whose 8 x 8 features are bilinearly
pooled to the 16-token budget, with a learnable separator after each row: 16 + 4 * (4 + 1)
= 36 valid image tokens. The LLM's fixed image prefix is 40 tokens (instead of 16): the
grid buffer holds the largest grid any allowed layout gives, here 4 x 1 tiles (8 x 2
features after the budget, plus 8 separators); the tokens an image does not use are masked.

Arguments (after the colon, comma-separated):
  smoke: as configs/tiny_world.py.
  mode: "internvl" (default) or "anyres".
"""

from __future__ import annotations

from compact_jax import configlib
from configs import tiny_world


def get_config(arg: str | None = None):
  a = configlib.parse_arg(arg, smoke=False, mode="internvl")
  c = tiny_world.get_config("smoke" if a.smoke else None)
  # Existing keys only: the locked config allows setting them.
  c.world.image_size = 128
  c.data.image_size = 64  # the tile side, the ViT's input
  d = c.model.dynamic_res
  d.mode = a.mode
  # Tiny-world images are square: InternVL's closest ratio is 1:1, and 2 x 2 wins over
  # 1 x 1 because a 128 px image fills it; AnyRes's best pinpoint is 2 x 2 as well.
  d.min_tiles, d.max_tiles = 1, 4
  d.pinpoints = ((1, 2), (2, 1), (2, 2))
  d.thumbnail = True
  d.newline = True  # `image_newline` trains with everything outside img/ (tiny_world's groups)
  d.max_visual_tokens = 16
  return c
