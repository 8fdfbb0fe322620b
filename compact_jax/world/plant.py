"""Adds distractor objects to a scene so that every constraint of a question is needed.

In a random scene a question like "What colour is the red-lettered circle in the
top left?" is rarely exact: for each constraint there must be some object that
only that constraint rules out, and that would give another answer. Such minimal
pairs are what make a capability necessary (and are what a model must learn to
tell apart), so the composer plants them.

For a constraint at hop ``d`` of a description chain (subject -> anchor ->
anchor), a distractor is a copy of the chain from hop d back to the subject: the
copy at hop d breaks exactly that constraint (another colour, another letter,
another cell for region/ground/relations, no rope for "tied to"), each copy below
it relates to the next copy as the original chain does, and the subject's copy
has another answer. Copies go to random free cells that keep the region and ground
filters they should keep. Every proposal is checked: the question must stay well
posed with the same answer, the constraint must now be necessary, and every rope
must stay clear of objects. `compose.compose_with_distractors` re-runs the full
verifier on the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from compact_jax.world import questions as q_lib
from compact_jax.world import scene as scene_lib
from compact_jax.world.rand import Rand

Scene = scene_lib.Scene
WorldObject = scene_lib.WorldObject

# Filters and queries on attributes an object carries itself (the others, region
# and ground, depend on its cell), and the WorldObject field each reads.
_OWN_ATTR = {
  "color": "color",
  "shape": "kind",
  "object": "kind",
  "letter": "letter",
  "motion": "motion",
}


def add_objects(
  scene: Scene, new: Sequence[WorldObject], new_links: Sequence[tuple[int, int]] = ()
) -> Scene:
  """Appends objects (and ropes, by index into old + new) and re-sorts by cell."""
  objs = [*scene.objects, *new]
  order = sorted(range(len(objs)), key=lambda i: (objs[i].row, objs[i].col))
  where = {old: pos for pos, old in enumerate(order)}
  links = {tuple(sorted((where[a], where[b]))) for a, b in (*scene.links, *new_links)}
  return Scene(
    scene.grid_size,
    scene.ground,
    tuple(objs[i] for i in order),
    tuple(sorted(links)),
    scene.patch,
    scene.patch_ground,
  )


def _at(o: WorldObject, cell: tuple[int, int]) -> WorldObject:
  return WorldObject(cell[0], cell[1], o.color, o.kind, o.letter, o.motion)


def ropes_clear(scene: Scene) -> bool:
  cells = [(o.row, o.col) for o in scene.objects]
  for a, b in scene.links:
    others = [c for k, c in enumerate(cells) if k not in (a, b)]
    if not scene_lib.rope_is_clear(cells[a], cells[b], others):
      return False
  return True


def _other_value(attr: str, current, rng: Rand, *, kind_pool=None):
  """A different value for ``attr`` (None counts as a value for letter/motion)."""
  if attr == "color":
    pool = list(scene_lib.COLORS)
  elif attr == "kind":
    pool = list(kind_pool)
  elif attr == "letter":
    pool = [None, *scene_lib.LETTERS]
  else:
    pool = [None, *scene_lib.DIRECTIONS]
  pool = [v for v in pool if v != current]
  return rng.choice(pool)


def _breaks(o: WorldObject, f: q_lib.Filter, rng: Rand) -> WorldObject:
  """A copy of o that fails filter f (for attributes o carries itself)."""
  attr = _OWN_ATTR[f.attr]
  if f.value == q_lib.ANY:  # "moving" / "with a letter": the copy has none
    return dataclasses.replace(o, **{attr: None})
  if attr == "kind":  # stay a shape (sprite) mostly: the closest distractor
    pool = scene_lib.SHAPES if o.is_shape and rng.random() < 0.8 else scene_lib.KINDS
    return dataclasses.replace(o, kind=_other_value("kind", o.kind, rng, kind_pool=pool))
  if attr in ("letter", "motion") and rng.random() < 0.5:
    return dataclasses.replace(o, **{attr: None})
  return dataclasses.replace(o, **{attr: _other_value(attr, getattr(o, attr), rng)})


def _with_other_answer(o: WorldObject, query: str, rng: Rand) -> WorldObject:
  attr = _OWN_ATTR.get(query)
  if attr is None:  # count, or a positional answer: the cell makes the difference
    return o
  if attr == "kind":
    pool = scene_lib.SHAPES if query == "shape" else scene_lib.SPRITES
    return dataclasses.replace(o, kind=_other_value("kind", o.kind, rng, kind_pool=pool))
  value = _other_value(attr, getattr(o, attr), rng)
  while value is None:  # the answer must still exist: another letter, not none
    value = _other_value(attr, getattr(o, attr), rng)
  return dataclasses.replace(o, **{attr: value})


def _desc_at(d: q_lib.Description, depth: int) -> q_lib.Description:
  for _ in range(depth):
    d = d.relation.anchor
  return d


def plant_distractor(
  scene: Scene,
  program: q_lib.Program,
  site: q_lib.ConstraintSite,
  answer: str,
  rng: Rand,
  *,
  tries: int = 12,
) -> Scene | None:
  """A scene with copies added so the constraint at ``site`` becomes necessary."""
  roots = [program.subject, program.other]
  root = roots[site.root]
  chain = q_lib.chain_objects(root, scene)
  if any(not ids for ids in chain):
    return None
  chain_ids = [rng.choice(sorted(ids)) for ids in chain]
  other_id = None
  if program.query in q_lib.PAIR_QUERIES:
    other = q_lib.matches(roots[1 - site.root], scene)
    if len(other) != 1:
      return None
    other_id = next(iter(other))
  g = scene.grid_size
  taken = {(o.row, o.col) for o in scene.objects}
  free = [(r, c) for r in range(g) for c in range(g) if (r, c) not in taken]
  n_copies = site.depth + 1
  if len(free) < n_copies:
    return None
  drop_idx = site.index
  # Cells each hop's copy may take: they keep the hop's region/ground filters,
  # except the one being broken, which they must fail.
  allowed = []
  for j in range(n_copies):
    desc = _desc_at(root, j)
    broken = site.filter if j == site.depth else None
    keep = [f for f in desc.filters if f.attr in ("region", "ground") and f != broken]
    positional_break = broken is not None and broken.attr in ("region", "ground")
    allowed.append(
      [
        cell
        for cell in free
        if all(_cell_fits(scene, cell, f) for f in keep)
        and not (positional_break and _cell_fits(scene, cell, broken))
      ]
    )
  if not all(allowed):
    return None
  for _ in range(tries):
    copies = []
    for j in range(site.depth, -1, -1):
      o = scene.objects[chain_ids[j]]
      if j == site.depth and site.filter is not None and site.filter.attr in _OWN_ATTR:
        o = _breaks(o, site.filter, rng)
      if j == 0 and site.root == 0 and program.query in q_lib.ATTRIBUTE_QUERIES:
        o = _with_other_answer(o, program.query, rng)
      copies.append(o)
    copies.reverse()  # copies[j] mirrors chain hop j
    placed = []
    used = set()
    for j, o in enumerate(copies):
      cands = [cell for cell in allowed[j] if cell not in used]
      if not cands:
        break
      cell = rng.choice(cands)
      used.add(cell)
      placed.append(_at(o, cell))
    if len(placed) < n_copies:
      continue
    base = len(scene.objects)
    # Copies below the broken hop are tied to each other as the originals are; the
    # copy at the broken hop is never tied to the original's anchor.
    links = []
    desc = root
    for j in range(site.depth):
      if desc.relation.kind == "tied_to":
        links.append((base + j, base + j + 1))
      desc = desc.relation.anchor
    if program.query == "tied" and answer == "no":
      links.append((base, other_id))
    s2 = add_objects(scene, placed, links)
    if not ropes_clear(s2):
      continue
    got, _ = q_lib.resolve(program, s2)
    if got != answer:
      continue
    if q_lib.answer_set_without(program, s2, index=drop_idx) == {answer}:
      continue
    return s2
  return None


def plant_copies(
  scene: Scene, program: q_lib.Program, extra: int, rng: Rand, *, tries: int = 16
) -> Scene | None:
  """A scene with ``extra`` more objects that a count question counts.

  Exact copies of counted objects, in free cells where they are counted too (the
  count goes up by exactly ``extra``). Without this, "how many" answers are mostly
  "1": a random description of a random object usually fits that object alone.
  """
  answer, _ = q_lib.resolve(program, scene)
  if program.query != "count" or answer is None:
    return None
  counted = sorted(q_lib.matches(program.subject, scene))
  g = scene.grid_size
  taken = {(o.row, o.col) for o in scene.objects}
  free = [(r, c) for r in range(g) for c in range(g) if (r, c) not in taken]
  if len(free) < extra or not counted:
    return None
  for _ in range(tries):
    cells = rng.sample(free, extra)
    copies = [
      dataclasses.replace(scene.objects[rng.choice(counted)], row=r, col=c) for r, c in cells
    ]
    s2 = add_objects(scene, copies)
    if ropes_clear(s2) and q_lib.resolve(program, s2)[0] == str(int(answer) + extra):
      return s2
  return None


def _cell_fits(scene: Scene, cell: tuple[int, int], f: q_lib.Filter) -> bool:
  if f.attr == "region":
    return scene_lib.region_name(*cell, scene.grid_size) == f.value
  return scene.ground_at(*cell) == f.value
