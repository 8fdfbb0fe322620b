"""Draws a `Scene` as an RGB image with numpy only (no fonts, no PIL drawing).

Layout of one cell of ``c = image_size // grid_size`` pixels (c = 16 at 64 px):
a margin of ``m = c // 8`` pixels of ground on every side and an object box of
``b = c - 2m`` pixels (12 at 64 px). So each object, with its ground ring, letter
plate and motion streaks, lies inside its own cell, and a ViT with patch c sees one
whole object per token.

- ground: each cell shows a fixed texture per ground type (colour plus pattern);
- rope: a brown line, 4 pixels wide at 64 px, between the two cell centres, drawn
  under objects;
- object: filled with its colour and outlined in a dark ink, so that its form reads
  the same on every fill colour; shapes are analytic masks, sprites 12x12 pixel
  art scaled to the box;
- letter: a 5x5 dark glyph on a white plate of the same size in the middle of the
  object (a bordered plate would hide most of a thin sprite's colour);
- motion: the object is shifted by m towards where it moves, and three streaks
  fill the trailing gap.

Everything is integer pixel arithmetic on fixed bitmaps, so the same scene gives
the same bytes on any machine and library version.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from compact_jax.world import scene as scene_lib

INK = np.array((20, 20, 24), np.uint8)
# Ropes have a colour of their own: drawn in ink, a rope between two neighbours
# (about 10 visible pixels in the margins) looked like a thicker outline or a motion
# streak, and the tower read "tied" on only 0.85 of occupied cells. Brown is far
# from every fill, ground and the ink.
ROPE = np.array((140, 70, 20), np.uint8)
PLATE = np.array((250, 250, 250), np.uint8)

GLYPHS: dict[str, tuple[str, ...]] = {
  "e": ("#####", "#....", "####.", "#....", "#####"),
  "h": ("#...#", "#...#", "#####", "#...#", "#...#"),
  "k": ("#...#", "#..#.", "###..", "#..#.", "#...#"),
  "l": ("#....", "#....", "#....", "#....", "#####"),
  "n": ("#...#", "##..#", "#.#.#", "#..##", "#...#"),
  "t": ("#####", "..#..", "..#..", "..#..", "..#.."),
  "x": ("#...#", ".#.#.", "..#..", ".#.#.", "#...#"),
  "z": ("#####", "...#.", "..#..", ".#...", "#####"),
}

# 'o' outline (ink), 'f' fill colour, 'w' white detail, '.' transparent. The
# centre pixel (6, 6) of every sprite is fill.
SPRITE_ART: dict[str, tuple[str, ...]] = {
  "car": (
    "............",
    "............",
    "...oooooo...",
    "..ofwwwwfo..",
    ".offwwwwffo.",
    "offffffffffo",
    "offffffffffo",
    "offffffffffo",
    "oooooooooooo",
    ".ooo....ooo.",
    ".ooo....ooo.",
    "............",
  ),
  "tree": (
    "....oooo....",
    "..ooffffoo..",
    ".offffffffo.",
    "offffffffffo",
    "offffffffffo",
    "offffffffffo",
    ".offffffffo.",
    "..oooooooo..",
    ".....oo.....",
    ".....oo.....",
    ".....oo.....",
    "...oooooo...",
  ),
  "house": (
    ".....oo.....",
    "....offo....",
    "...offffo...",
    "..offffffo..",
    ".offffffffo.",
    "oooooooooooo",
    ".offffffffo.",
    ".offwwffffo.",
    ".offwwfoofo.",
    ".offfffoofo.",
    ".offfffoofo.",
    ".oooooooooo.",
  ),
  "fish": (
    "............",
    "............",
    "...ooooo....",
    "..offfffo..o",
    ".owfffffoofo",
    "offfffffffo.",
    "offfffffffo.",
    ".offfffffofo",
    "..offfffo..o",
    "...ooooo....",
    "............",
    "............",
  ),
  "person": (
    "....oooo....",
    "...offffo...",
    "...offffo...",
    "....oooo....",
    "..oooooooo..",
    ".offffffffo.",
    "offffffffffo",
    "oo.offffo.oo",
    "...offffo...",
    "...oooooo...",
    "...oo..oo...",
    "..ooo..ooo..",
  ),
}

# Ground textures: base colour, pattern colour. The patterns differ in structure
# (vertical blades, wavy lines, sparse dots, flakes, grain) as well as in colour.
GROUND_COLORS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
  "grass": ((100, 145, 60), (60, 100, 35)),
  "water": ((70, 130, 200), (165, 210, 245)),
  "sand": ((225, 200, 145), (175, 145, 95)),
  "snow": ((238, 242, 250), (175, 190, 215)),
  "road": ((125, 125, 130), (95, 95, 100)),
}


def cell_geometry(image_size: int, grid_size: int) -> tuple[int, int, int]:
  """Returns (cell, margin, box) pixel sizes, failing on sizes we cannot draw."""
  if image_size % grid_size:
    raise ValueError(f"image_size={image_size} must be a multiple of grid_size={grid_size}")
  c = image_size // grid_size
  if c < 12:
    raise ValueError(
      f"cells of {c} px (image_size={image_size}, grid_size={grid_size}) are too small; need >= 12"
    )
  m = max(1, c // 8)
  return c, m, c - 2 * m


def _hash01(x: np.ndarray, y: np.ndarray, salt: int) -> np.ndarray:
  h = (x * 73856093) ^ (y * 19349663) ^ (salt * 83492791)
  return (h % 1009) / 1009.0


@functools.lru_cache(maxsize=32)
def ground_texture(ground: str, image_size: int) -> np.ndarray:
  """uint8[S, S, 3] texture of one ground type over the whole frame."""
  base, pattern = (np.array(c, np.uint8) for c in GROUND_COLORS[ground])
  y, x = np.mgrid[0:image_size, 0:image_size].astype(np.int64)
  if ground == "grass":
    mark = _hash01(x, y // 3, 1) < 0.16
  elif ground == "water":
    wave = np.array([0, 0, 1, 1, 1, 0])[x % 6]
    mark = (y + wave) % 5 == 0
  elif ground == "sand":
    mark = _hash01(x, y, 2) < 0.09
  elif ground == "snow":
    mark = (_hash01(x // 2, y // 2, 3) < 0.07) & ((x + y) % 2 == 0)
  elif ground == "road":
    mark = _hash01(x, y, 4) < 0.25
  else:
    raise ValueError(f"unknown ground {ground!r}")
  out = np.where(mark[..., None], pattern, base).astype(np.uint8)
  out.setflags(write=False)
  return out


def _outline(mask: np.ndarray, thickness: int) -> np.ndarray:
  inner = mask.copy()
  for _ in range(thickness):
    p = np.pad(inner, 1)
    inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
  return mask & ~inner


@functools.lru_cache(maxsize=64)
def kind_layers(kind: str, box: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(fill, ink, white) bool[box, box] masks of one kind drawn in a box."""
  if kind in SPRITE_ART:
    art = np.array([list(r) for r in SPRITE_ART[kind]])
    idx = (np.arange(box) * art.shape[0]) // box  # nearest-neighbour scaling
    art = art[idx][:, idx]
    return art == "f", art == "o", art == "w"
  y, x = np.mgrid[0:box, 0:box].astype(np.float64) + 0.5
  h = box / 2
  u, v = x - h, y - h
  if kind == "circle":
    mask = u * u + v * v <= h * h
  elif kind == "square":
    mask = (np.abs(u) <= h - 0.5) & (np.abs(v) <= h - 0.5)
  elif kind == "triangle":
    mask = np.abs(u) <= (y / box) * h + 0.25
  elif kind == "diamond":
    mask = np.abs(u) + np.abs(v) <= h + 0.25
  elif kind == "cross":
    arm = box / 6
    mask = (np.abs(u) <= arm) | (np.abs(v) <= arm)
  else:
    raise ValueError(f"unknown kind {kind!r}")
  ink = _outline(mask, max(1, box // 12))
  return mask & ~ink, ink, np.zeros_like(mask)


def object_box(o: scene_lib.WorldObject, image_size: int, grid_size: int) -> tuple[int, int]:
  """Top-left pixel (y, x) of an object's box, after its motion shift."""
  c, m, _ = cell_geometry(image_size, grid_size)
  dy, dx = {"left": (0, -m), "right": (0, m), "up": (-m, 0), "down": (m, 0)}.get(o.motion, (0, 0))
  return o.row * c + m + dy, o.col * c + m + dx


def _draw_rope(img: np.ndarray, p: tuple[float, float], q: tuple[float, float], width: float):
  s = img.shape[0]
  y, x = np.mgrid[0:s, 0:s].astype(np.float64) + 0.5
  (py, px), (qy, qx) = p, q
  dy, dx = qy - py, qx - px
  t = np.clip(((y - py) * dy + (x - px) * dx) / max(dy * dy + dx * dx, 1e-9), 0.0, 1.0)
  d2 = (y - py - t * dy) ** 2 + (x - px - t * dx) ** 2
  img[d2 <= (width / 2) ** 2] = ROPE


def _draw_streaks(img: np.ndarray, o: scene_lib.WorldObject, image_size: int, grid_size: int):
  c, m, b = cell_geometry(image_size, grid_size)
  y0, x0 = o.row * c, o.col * c
  length = 2 * m - 1  # the trailing gap is 2m wide; keep one pixel free
  for frac in (0.25, 0.5, 0.75):
    off = m + int(b * frac)
    if o.motion == "right":
      img[y0 + off, x0 : x0 + length] = INK
    elif o.motion == "left":
      img[y0 + off, x0 + c - length : x0 + c] = INK
    elif o.motion == "down":
      img[y0 : y0 + length, x0 + off] = INK
    elif o.motion == "up":
      img[y0 + c - length : y0 + c, x0 + off] = INK


def render_scene(scene: scene_lib.Scene, image_size: int) -> np.ndarray:
  """Draws a scene. Returns uint8[S, S, 3] with S = image_size."""
  g = scene.grid_size
  c, _, b = cell_geometry(image_size, g)
  img = np.empty((image_size, image_size, 3), np.uint8)
  for r in range(g):
    for col in range(g):
      tex = ground_texture(scene.ground_at(r, col), image_size)
      img[r * c : (r + 1) * c, col * c : (col + 1) * c] = tex[
        r * c : (r + 1) * c, col * c : (col + 1) * c
      ]
  for i, j in scene.links:
    a, bb = scene.objects[i], scene.objects[j]
    _draw_rope(
      img,
      ((a.row + 0.5) * c, (a.col + 0.5) * c),
      ((bb.row + 0.5) * c, (bb.col + 0.5) * c),
      width=max(4.0, c / 4),
    )
  s = max(1, b // 12)
  plate = 5 * s
  for o in scene.objects:
    if o.motion is not None:
      _draw_streaks(img, o, image_size, g)
    y, x = object_box(o, image_size, g)
    fill, ink, white = kind_layers(o.kind, b)
    view = img[y : y + b, x : x + b]
    view[fill] = np.array(scene_lib.COLORS[o.color], np.uint8)
    view[ink] = INK
    view[white] = PLATE
    if o.letter is not None:
      p0 = (b - plate) // 2
      glyph = np.array([[ch == "#" for ch in row] for row in GLYPHS[o.letter]])
      glyph = np.kron(glyph, np.ones((s, s), bool))
      view[p0 : p0 + plate, p0 : p0 + plate] = np.where(glyph[..., None], INK, PLATE)
  return img


def rope_pixels(scene: scene_lib.Scene, image_size: int) -> np.ndarray:
  """bool[S, S]: the pixels where a rope of ``scene`` shows in its picture.

  Ropes are drawn under objects and streaks, so this is what `render_scene` changes
  when the links are added, not the whole segment between the two cell centres.
  """
  if not scene.links:
    return np.zeros((image_size, image_size), bool)
  bare = render_scene(dataclasses.replace(scene, links=()), image_size)
  return (render_scene(scene, image_size) != bare).any(-1)
