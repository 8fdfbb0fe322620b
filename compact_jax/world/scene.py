"""Scene graphs of the tiny world: the vocabulary, the records, sampling and JSON.

A scene is a ``grid_size x grid_size`` board of cells. Each cell shows one kind of
ground (the base ground, or a rectangular patch of a second ground), and holds at
most one object. Objects carry a fill colour, a kind (a geometric shape or a sprite
class), an optional letter, an optional direction of motion; pairs of objects may be
tied together by a rope. Everything a question can ask is a pure function of this
record, so answers are exact; `render.py` draws it.

Objects are stored sorted by cell (row-major), links as sorted index pairs, so one
scene has one JSON form and one hash.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from compact_jax.world.rand import Rand

T = TypeVar("T")

# Fill colours, chosen far apart in hue and all clearly brighter than the dark
# outline, so that the outline (and with it the form) reads the same on every fill.
COLORS: dict[str, tuple[int, int, int]] = {
  "red": (225, 45, 45),
  "orange": (245, 145, 30),
  "yellow": (245, 220, 45),
  "green": (50, 190, 80),
  "blue": (50, 105, 240),
  "purple": (160, 75, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SPRITES: tuple[str, ...] = ("car", "tree", "house", "fish", "person")
KINDS: tuple[str, ...] = SHAPES + SPRITES
# Letters are lower-case answers; none is an English word, so a letter in a
# question never reads as part of the sentence ("a", "i" would).
LETTERS: tuple[str, ...] = ("e", "h", "k", "l", "n", "t", "x", "z")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
GROUNDS: tuple[str, ...] = ("grass", "water", "sand", "snow", "road")

PLURALS: dict[str, str] = {
  **{k: k + "s" for k in KINDS},
  "cross": "crosses",
  "fish": "fish",
  "person": "people",
  "object": "objects",
}

# Scene prior. Small palettes make attributes repeat across objects: a question
# needs distractors that share all but one of its constraints, or its
# constraints are not all necessary (see questions.py).
LETTER_PROB = 0.4
MOTION_PROB = 0.4
PATCH_PROB = 0.6
LINK_COUNT_PROBS = (0.4, 0.4, 0.2)  # P(0, 1, 2 ropes)
MAX_PALETTE = 3


@dataclasses.dataclass(frozen=True)
class WorldObject:
  """One object on the board; ``letter``/``motion`` are None when absent."""

  row: int
  col: int
  color: str
  kind: str
  letter: str | None = None
  motion: str | None = None

  @property
  def is_shape(self) -> bool:
    return self.kind in SHAPES


@dataclasses.dataclass(frozen=True)
class Scene:
  """A whole picture: ground layout, objects (row-major by cell) and ropes.

  ``patch`` is ``(row0, col0, rows, cols)`` of the cells showing ``patch_ground``
  instead of ``ground``; None for a uniform ground.
  """

  grid_size: int
  ground: str
  objects: tuple[WorldObject, ...]
  links: tuple[tuple[int, int], ...] = ()
  patch: tuple[int, int, int, int] | None = None
  patch_ground: str | None = None

  def ground_at(self, row: int, col: int) -> str:
    if self.patch is not None:
      r0, c0, h, w = self.patch
      if r0 <= row < r0 + h and c0 <= col < c0 + w:
        return self.patch_ground
    return self.ground

  @property
  def place(self) -> str | None:
    """The one ground of the whole picture, or None when it shows two."""
    return self.ground if self.patch is None else None

  def object_ground(self, i: int) -> str:
    o = self.objects[i]
    return self.ground_at(o.row, o.col)

  def region(self, i: int) -> str:
    o = self.objects[i]
    return region_name(o.row, o.col, self.grid_size)

  def linked(self, i: int, j: int) -> bool:
    return (min(i, j), max(i, j)) in self.links

  def memo(self, key: str, make: Callable[[Scene], T]) -> T:
    """``make(self)``, computed once per scene object under ``key``.

    Question search reads the same derived facts (a column of attribute values, the pairs
    in a relation) thousands of times per scene. A scene is immutable, so they are kept
    in the instance's ``__dict__``, outside the dataclass fields: equality, hashing,
    `dataclasses.replace` and JSON ignore them, and an edited copy starts empty.
    """
    memo = self.__dict__.get("_memo")
    if memo is None:
      memo = self.__dict__["_memo"] = {}
    value = memo.get(key, _MISSING)
    if value is _MISSING:
      value = memo[key] = make(self)
    return value

  def column(self, attr: str) -> tuple:
    """Per object, in index order: ``color``, ``kind``, ``letter``, ``motion``, ``region``
    or ``ground`` (the ground under it); memoised."""
    return self.memo("column:" + attr, COLUMNS[attr])

  def to_json(self) -> dict[str, Any]:
    return {
      "grid_size": self.grid_size,
      "ground": self.ground,
      "patch": list(self.patch) if self.patch is not None else None,
      "patch_ground": self.patch_ground,
      "objects": [dataclasses.asdict(o) for o in self.objects],
      "links": [list(p) for p in self.links],
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any], *, where: str = "scene") -> Scene:
    """Parses and validates `to_json` output; errors name ``where`` and the key."""
    try:
      objects = tuple(
        WorldObject(
          row=int(o["row"]),
          col=int(o["col"]),
          color=o["color"],
          kind=o["kind"],
          letter=o.get("letter"),
          motion=o.get("motion"),
        )
        for o in d["objects"]
      )
      scene = cls(
        grid_size=int(d["grid_size"]),
        ground=d["ground"],
        objects=objects,
        links=tuple((int(a), int(b)) for a, b in d.get("links", ())),
        patch=tuple(int(v) for v in d["patch"]) if d.get("patch") is not None else None,
        patch_ground=d.get("patch_ground"),
      )
    except KeyError as e:
      raise ValueError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: malformed scene ({e})") from None
    validate_scene(scene, where=where)
    return scene


_MISSING = object()
# `Scene.column`'s columns, computed afresh.
COLUMNS: dict[str, Callable[[Scene], tuple]] = {
  "color": lambda s: tuple(o.color for o in s.objects),
  "kind": lambda s: tuple(o.kind for o in s.objects),
  "letter": lambda s: tuple(o.letter for o in s.objects),
  "motion": lambda s: tuple(o.motion for o in s.objects),
  "region": lambda s: tuple(region_name(o.row, o.col, s.grid_size) for o in s.objects),
  "ground": lambda s: tuple(s.ground_at(o.row, o.col) for o in s.objects),
}


def validate_scene(scene: Scene, *, where: str = "scene") -> None:
  """Raises ValueError naming ``where`` and the offending key for a bad scene."""
  g = scene.grid_size
  if g < 1:
    raise ValueError(f"{where}: grid_size must be positive, got {g}")
  for key, value, vocab in (("ground", scene.ground, GROUNDS),):
    if value not in vocab:
      raise ValueError(f"{where}: {key}={value!r} not in {list(vocab)}")
  if scene.patch is not None:
    r0, c0, h, w = scene.patch
    if not (r0 >= 0 and c0 >= 0 and h >= 1 and w >= 1 and r0 + h <= g and c0 + w <= g):
      raise ValueError(f"{where}: patch={scene.patch} does not fit a {g}x{g} grid")
    if scene.patch_ground not in GROUNDS or scene.patch_ground == scene.ground:
      raise ValueError(
        f"{where}: patch_ground={scene.patch_ground!r} must be a ground other than {scene.ground!r}"
      )
  elif scene.patch_ground is not None:
    raise ValueError(f"{where}: patch_ground is set but patch is null")
  cells = set()
  for i, o in enumerate(scene.objects):
    at = f"{where}: objects[{i}]"
    if not (0 <= o.row < g and 0 <= o.col < g):
      raise ValueError(f"{at}: cell ({o.row}, {o.col}) outside the {g}x{g} grid")
    if (o.row, o.col) in cells:
      raise ValueError(f"{at}: cell ({o.row}, {o.col}) holds two objects")
    cells.add((o.row, o.col))
    for key, value, vocab in (
      ("color", o.color, tuple(COLORS)),
      ("kind", o.kind, KINDS),
      ("letter", o.letter, (None, *LETTERS)),
      ("motion", o.motion, (None, *DIRECTIONS)),
    ):
      if value not in vocab:
        raise ValueError(f"{at}: {key}={value!r} not in {list(vocab)}")
  order = [(o.row, o.col) for o in scene.objects]
  if order != sorted(order):
    raise ValueError(f"{where}: objects must be sorted by (row, col)")
  n = len(scene.objects)
  for a, b in scene.links:
    if not (0 <= a < b < n):
      raise ValueError(f"{where}: link ({a}, {b}) must be a sorted pair of object indices < {n}")
  if len(set(scene.links)) != len(scene.links):
    raise ValueError(f"{where}: duplicate links {list(scene.links)}")


def scene_hash(scene: Scene) -> str:
  """A hash of the scene's content, identical for identical pictures and questions."""
  blob = json.dumps(scene.to_json(), sort_keys=True, separators=(",", ":"))
  return hashlib.sha1(blob.encode()).hexdigest()


@functools.lru_cache(maxsize=4096)
def region_name(row: int, col: int, grid_size: int) -> str:
  """The part of the frame a cell lies in: "top left", ..., "center" on odd grids."""
  half = grid_size / 2

  def part(i: int, low: str, high: str) -> str:
    if i + 0.5 < half:
      return low
    if i + 0.5 > half:
      return high
    return ""

  v, h = part(row, "top", "bottom"), part(col, "left", "right")
  return " ".join(p for p in (v, h) if p) or "center"


def regions(grid_size: int) -> tuple[str, ...]:
  return tuple(
    dict.fromkeys(region_name(r, c, grid_size) for r in range(grid_size) for c in range(grid_size))
  )


# --- rope geometry (cell units) ------------------------------------------------


def rope_is_clear(
  a: tuple[int, int], b: tuple[int, int], others: Sequence[tuple[int, int]], margin: float = 0.125
) -> bool:
  """Whether a rope between cell centres ``a`` and ``b`` passes clear of other objects.

  A rope drawn under an object would hide which two objects it ties, so ropes
  may not cross any other occupied cell's object box (the cell minus ``margin``).
  """
  (ra, ca), (rb, cb) = a, b
  y0, x0, dy, dx = ra + 0.5, ca + 0.5, rb - ra, cb - ca
  for r, c in others:
    # Liang-Barsky: clip the segment's parameter range to the box, slab by slab.
    lo, hi = 0.0, 1.0
    for p0, d, bmin, bmax in (
      (y0, dy, r + margin, r + 1 - margin),
      (x0, dx, c + margin, c + 1 - margin),
    ):
      if d == 0:
        if not bmin <= p0 <= bmax:
          lo, hi = 1.0, 0.0
          break
        continue
      t1, t2 = (bmin - p0) / d, (bmax - p0) / d
      lo, hi = max(lo, min(t1, t2)), min(hi, max(t1, t2))
    if lo <= hi:
      return False
  return True


def _segments_cross(p1, p2, q1, q2) -> bool:
  def orient(a, b, c):
    return np.sign((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))

  return orient(p1, p2, q1) * orient(p1, p2, q2) < 0 and orient(q1, q2, p1) * orient(q1, q2, p2) < 0


def drawable_links(objects: Sequence[WorldObject]) -> list[tuple[int, int]]:
  """All object pairs whose rope would pass clear of the other objects."""
  cells = [(o.row, o.col) for o in objects]
  out = []
  for i in range(len(cells)):
    for j in range(i + 1, len(cells)):
      others = [c for k, c in enumerate(cells) if k not in (i, j)]
      if rope_is_clear(cells[i], cells[j], others):
        out.append((i, j))
  return out


# --- sampling ---------------------------------------------------------------------


def sample_ground(rng: Rand, grid_size: int) -> dict[str, Any]:
  """A ground layout: a base ground and, often, a rectangular patch of another."""
  ground = rng.choice(GROUNDS)
  if grid_size < 2 or rng.random() >= PATCH_PROB:
    return {"ground": ground, "patch": None, "patch_ground": None}
  while True:
    h = rng.integers(1, grid_size)
    w = rng.integers(1, grid_size)
    if 2 <= h * w <= (grid_size * grid_size) // 2:
      break
  r0 = rng.integers(0, grid_size - h + 1)
  c0 = rng.integers(0, grid_size - w + 1)
  patch_ground = rng.choice([g for g in GROUNDS if g != ground])
  return {"ground": ground, "patch": (r0, c0, h, w), "patch_ground": patch_ground}


def sample_links(rng: Rand, objects: Sequence[WorldObject]) -> tuple[tuple[int, int], ...]:
  """0-2 ropes between disjoint pairs whose ropes pass clear of everything."""
  want = rng.weighted_sample(range(len(LINK_COUNT_PROBS)), LINK_COUNT_PROBS, 1)[0]
  candidates = drawable_links(objects)
  rng.shuffle(candidates)
  chosen: list[tuple[int, int]] = []
  for i, j in candidates:
    if len(chosen) == want:
      break
    if any(i in p or j in p for p in chosen):
      continue
    seg = ((objects[i].row, objects[i].col), (objects[j].row, objects[j].col))
    if any(
      _segments_cross(*seg, (objects[a].row, objects[a].col), (objects[b].row, objects[b].col))
      for a, b in chosen
    ):
      continue
    chosen.append((i, j))
  return tuple(sorted(chosen))


def sample_scene(
  rng: np.random.Generator | Rand, *, grid_size: int, min_objects: int, max_objects: int
) -> Scene:
  """Draws a scene from the world's prior (see the module constants)."""
  rng = Rand.spawn(rng)
  if not 1 <= min_objects <= max_objects <= grid_size * grid_size:
    raise ValueError(
      f"need 1 <= min_objects <= max_objects <= {grid_size * grid_size}, "
      f"got {min_objects}, {max_objects}"
    )
  n = rng.integers(min_objects, max_objects + 1)
  cells = sorted(rng.sample(range(grid_size * grid_size), n))
  color_palette = rng.sample(list(COLORS), rng.integers(1, min(n, MAX_PALETTE) + 1))
  kind_palette = rng.sample(KINDS, rng.integers(1, min(n, MAX_PALETTE) + 1))
  objects = []
  for cell in cells:
    objects.append(
      WorldObject(
        row=cell // grid_size,
        col=cell % grid_size,
        color=rng.choice(color_palette),
        kind=rng.choice(kind_palette),
        letter=rng.choice(LETTERS) if rng.random() < LETTER_PROB else None,
        motion=rng.choice(DIRECTIONS) if rng.random() < MOTION_PROB else None,
      )
    )
  return Scene(
    grid_size=grid_size,
    objects=tuple(objects),
    links=sample_links(rng, objects),
    **sample_ground(rng, grid_size),
  )
