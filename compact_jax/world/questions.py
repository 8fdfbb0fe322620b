"""Questions as programs over a scene graph: semantics, capabilities, English text.

A `Program` is a query applied to one object (or a pair, or the whole scene) picked
out by a `Description`: filters on the object's own attributes plus at most one
relation to an anchor object, which is described the same way (depth <= 2).

Each filter, relation and query carries exactly one capability, and the
capabilities of a program are the union of those of its parts (see the tables
below and the mapping in ``compact_jax/world/__init__.py``).

Two semantics:
- `resolve` is the question as asked: every description in it (the subject, the
  other object of a pair, each anchor) must pick out exactly one object ("the
  car"), and the queried attribute must exist (a letter query needs a letter).
  The one exception is an anchor with no constraints at all, read "another
  object": it is indefinite ("the object to the left of another object").
  It returns the one answer, or None with a reason.
- `answer_set` is the charitable reading used to test necessity after constraints
  were dropped: an anchor means "some object that fits", a subject that fits
  several objects gives one reading per object, and the result is the set of
  answers over all readings (UNDEFINED where a reading has no answer). A
  question is answerable without some constraints iff this set is exactly
  ``{answer}``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

from compact_jax.world import scene as scene_lib

ANY = "*"  # filter value: has some letter / is moving at all
UNDEFINED = "<undefined>"

FILTER_CAPABILITY: dict[str, str] = {
  "color": "color",
  "shape": "shape",
  "object": "object_recognition",
  "letter": "text_recognition",
  "motion": "action_recognition",
  "region": "spatial_recognition",
  "ground": "scene_understanding",
}
SPATIAL_RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
RELATION_CAPABILITY: dict[str, str] = {
  **{r: "spatial_relationship" for r in SPATIAL_RELATIONS},
  "tied_to": "object_interaction",
}
# Attribute queries ask about one object; pair queries about two; scene queries
# about the picture as a whole (these take no description, so they are k=1).
ATTRIBUTE_QUERIES: tuple[str, ...] = (
  "color",
  "shape",
  "object",
  "letter",
  "motion",
  "region",
  "ground",
  "count",
)
PAIR_QUERIES: tuple[str, ...] = ("relation", "tied")
SCENE_QUERIES: tuple[str, ...] = ("place", "arrangement", "any_tied")
QUERY_CAPABILITY: dict[str, str] = {
  "color": "color",
  "shape": "shape",
  "object": "object_recognition",
  "letter": "text_recognition",
  "motion": "action_recognition",
  "region": "spatial_recognition",
  "ground": "scene_understanding",
  "count": "counting",
  "relation": "spatial_relationship",
  "tied": "object_interaction",
  "place": "scene_understanding",
  "arrangement": "spatial_relationship",
  "any_tied": "object_interaction",
}


@dataclasses.dataclass(frozen=True)
class Filter:
  """The object's ``attr`` equals ``value`` (``ANY``: has a letter / is moving)."""

  attr: str
  value: str

  @property
  def capability(self) -> str:
    return FILTER_CAPABILITY[self.attr]

  def __post_init__(self):
    if self.attr not in FILTER_CAPABILITY:
      raise ValueError(f"unknown filter attribute {self.attr!r}")

  def holds(self, scene: scene_lib.Scene, i: int) -> bool:
    v = _FILTER_VALUE[self.attr](scene, i)
    return v is not None if self.value == ANY else v == self.value


_FILTER_VALUE = {
  "color": lambda s, i: s.objects[i].color,
  "shape": lambda s, i: s.objects[i].kind,
  "object": lambda s, i: s.objects[i].kind,
  "letter": lambda s, i: s.objects[i].letter,
  "motion": lambda s, i: s.objects[i].motion,
  "region": lambda s, i: s.region(i),
  "ground": lambda s, i: s.object_ground(i),
}


@dataclasses.dataclass(frozen=True)
class Relation:
  """The object stands in relation ``kind`` to the object ``anchor`` describes."""

  kind: str
  anchor: Description

  @property
  def capability(self) -> str:
    return RELATION_CAPABILITY[self.kind]


@dataclasses.dataclass(frozen=True)
class Description:
  """A noun phrase: filters on an object plus at most one relation."""

  filters: tuple[Filter, ...] = ()
  relation: Relation | None = None


@dataclasses.dataclass(frozen=True)
class Program:
  """``query`` applied to ``subject`` (and ``other`` for pair queries)."""

  query: str
  subject: Description | None = None
  other: Description | None = None

  def __post_init__(self):
    if self.query not in QUERY_CAPABILITY:
      raise ValueError(f"unknown query {self.query!r}")
    needs = 2 if self.query in PAIR_QUERIES else 1 if self.query in ATTRIBUTE_QUERIES else 0
    has = (self.subject is not None) + (self.other is not None)
    if has != needs or (needs == 1 and self.subject is None):
      raise ValueError(f"query {self.query!r} takes {needs} description(s), got {has}")

  @property
  def capabilities(self) -> frozenset[str]:
    caps = {QUERY_CAPABILITY[self.query]}
    for f, r in iter_constraints(self):
      caps.add(f.capability if f is not None else r.capability)
    return frozenset(caps)

  def to_json(self) -> dict[str, Any]:
    return {
      "query": self.query,
      "subject": _desc_to_json(self.subject),
      "other": _desc_to_json(self.other),
    }

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> Program:
    return cls(d["query"], _desc_from_json(d.get("subject")), _desc_from_json(d.get("other")))


def _desc_to_json(d: Description | None) -> dict[str, Any] | None:
  if d is None:
    return None
  out: dict[str, Any] = {"filters": [[f.attr, f.value] for f in d.filters]}
  if d.relation is not None:
    out["relation"] = {"kind": d.relation.kind, "anchor": _desc_to_json(d.relation.anchor)}
  return out


def _desc_from_json(d: dict[str, Any] | None) -> Description | None:
  if d is None:
    return None
  rel = d.get("relation")
  return Description(
    tuple(Filter(a, v) for a, v in d["filters"]),
    Relation(rel["kind"], _desc_from_json(rel["anchor"])) if rel else None,
  )


# --- traversal and editing ------------------------------------------------------


def _roots(p: Program) -> tuple[Description, ...]:
  return tuple(d for d in (p.subject, p.other) if d is not None)


def _iter_desc(d: Description) -> Iterator[tuple[Filter | None, Relation | None]]:
  for f in d.filters:
    yield f, None
  if d.relation is not None:
    yield None, d.relation
    yield from _iter_desc(d.relation.anchor)


def iter_constraints(p: Program) -> Iterator[tuple[Filter | None, Relation | None]]:
  """Every filter and relation of a program, depth first (relation before its anchor)."""
  for d in _roots(p):
    yield from _iter_desc(d)


@dataclasses.dataclass(frozen=True)
class ConstraintSite:
  """Where a constraint sits: description ``root`` (0 subject, 1 other), ``depth`` hops."""

  index: int  # position in `iter_constraints`
  root: int
  depth: int
  filter: Filter | None
  relation: Relation | None


def constraint_sites(p: Program) -> list[ConstraintSite]:
  out = []
  for r, d in enumerate(_roots(p)):
    depth = 0
    while d is not None:
      for f in d.filters:
        out.append(ConstraintSite(len(out), r, depth, f, None))
      if d.relation is None:
        break
      out.append(ConstraintSite(len(out), r, depth, None, d.relation))
      d, depth = d.relation.anchor, depth + 1
  return out


def chain_objects(d: Description, scene: scene_lib.Scene) -> list[frozenset[int]]:
  """The objects each node of a description chain fits: [subject, anchor, anchor's anchor]."""
  out = [matches(d, scene)]
  while d.relation is not None:
    d = d.relation.anchor
    out.append(matches(d, scene))
  return out


def _map_desc(d: Description, keep) -> Description:
  filters = tuple(f for f in d.filters if keep(f, None))
  rel = d.relation
  if rel is not None:
    rel = Relation(rel.kind, _map_desc(rel.anchor, keep)) if keep(None, rel) else None
  return Description(filters, rel)


def _map_program(p: Program, keep) -> Program:
  return Program(
    p.query,
    _map_desc(p.subject, keep) if p.subject is not None else None,
    _map_desc(p.other, keep) if p.other is not None else None,
  )


def without_capability(p: Program, capability: str) -> Program:
  """Drops every filter and relation (with its anchor) that carries ``capability``."""
  return _map_program(
    p, lambda f, r: (f.capability if f is not None else r.capability) != capability
  )


def without_constraint(p: Program, index: int) -> Program:
  """Drops the ``index``-th constraint of `iter_constraints` (a relation with its anchor)."""
  counter = iter(range(1 << 30))
  return _map_program(p, lambda f, r: next(counter) != index)


def describe_constraint(f: Filter | None, r: Relation | None) -> str:
  return f"{f.attr}={f.value}" if f is not None else f"{r.kind}(...)"


# --- semantics -------------------------------------------------------------------


def relation_holds(scene: scene_lib.Scene, kind: str, i: int, j: int) -> bool:
  """Whether object i is ``kind`` object j.

  Spatial relations are read along a row or column, as one reads a grid: "left
  of the car" is in the car's row, anywhere to its left; "above" in its column.
  """
  if kind in _GRID_RELATIONS:
    return _GRID_RELATIONS[kind](scene.objects[i], scene.objects[j])
  if kind == "tied_to":
    return scene.linked(i, j)
  raise ValueError(f"unknown relation {kind!r}")


# kind -> whether object a is `kind` object b, read along b's row or column.
_GRID_RELATIONS = {
  "left_of": lambda a, b: a.row == b.row and a.col < b.col,
  "right_of": lambda a, b: a.row == b.row and a.col > b.col,
  "above": lambda a, b: a.col == b.col and a.row < b.row,
  "below": lambda a, b: a.col == b.col and a.row > b.row,
}


# The `Scene.column` each filter attribute reads.
_FILTER_COLUMN = {
  "color": "color",
  "shape": "kind",
  "object": "kind",
  "letter": "letter",
  "motion": "motion",
  "region": "region",
  "ground": "ground",
}


def _bits(mask: int) -> list[int]:
  """The object indices set in ``mask``, ascending."""
  out = []
  while mask:
    low = mask & -mask
    out.append(low.bit_length() - 1)
    mask ^= low
  return out


class _SceneIndex:
  """A scene's objects as bitmasks (bit i = object i), for the semantics below.

  Question search evaluates tens of thousands of descriptions per scene; as masks a
  filter is one ``&`` and a relation one ``|`` per anchor. Everything is built lazily:
  a scene resolved once (a perturbed copy in verification) pays only for what it reads.
  Kept on the scene (`Scene.memo`), which is immutable.
  """

  __slots__ = ("_filters", "_pre", "_related", "_values", "all", "scene")

  def __init__(self, scene: scene_lib.Scene):
    self.scene = scene
    self.all = (1 << len(scene.objects)) - 1
    self._filters: dict[str, dict[str, int]] = {}  # filter attr -> value -> mask
    self._pre: dict[tuple[str, int], int] = {}  # (kind, a) -> `_preimage`
    self._related: dict[tuple[str, int], int] = {}
    self._values: dict[str, tuple[str, ...]] = {}  # attribute query -> value per object

  def filter_mask(self, attr: str, value: str) -> int:
    """The objects that `Filter(attr, value)` holds for."""
    masks = self._filters.get(attr)
    if masks is None:
      masks = {}
      # The column straight from the objects: `Scene.column` would keep it on the scene too,
      # wasted on the many scenes (perturbed copies) that are resolved once.
      for i, v in enumerate(scene_lib.COLUMNS[_FILTER_COLUMN[attr]](self.scene)):
        masks[v] = masks.get(v, 0) | 1 << i
      # Filter.holds: ANY is "has some value", tested before equality.
      masks[ANY] = self.all & ~masks.get(None, 0)
      self._filters[attr] = masks
    return masks.get(value, 0)

  def related(self, kind: str, anchors: int) -> int:
    """The objects i that stand in ``kind`` to some anchor a != i in ``anchors``."""
    key = (kind, anchors)
    out = self._related.get(key)
    if out is None:
      out = 0
      for a in _bits(anchors):
        pre = self._pre.get((kind, a))
        if pre is None:
          pre = self._pre[kind, a] = _preimage(self.scene, kind, a)
        out |= pre
      self._related[key] = out
    return out

  def values(self, query: str) -> tuple[str, ...]:
    """`attribute_value` of each object."""
    out = self._values.get(query)
    if out is None:
      s = self.scene
      out = self._values[query] = tuple(attribute_value(query, s, i) for i in range(len(s.objects)))
    return out


def _preimage(scene: scene_lib.Scene, kind: str, a: int) -> int:
  """The mask of objects i != a for which `relation_holds(scene, kind, i, a)`."""
  out = 0
  if kind == "tied_to":
    for x, y in scene.links:
      if x < y:  # `Scene.linked` looks up the sorted pair
        if y == a:
          out |= 1 << x
        elif x == a:
          out |= 1 << y
    return out
  b = scene.objects[a]
  if kind not in _GRID_RELATIONS:
    raise ValueError(f"unknown relation {kind!r}")
  holds = _GRID_RELATIONS[kind]
  for i, o in enumerate(scene.objects):
    if holds(o, b):
      out |= 1 << i
  return out & ~(1 << a)


def _index(scene: scene_lib.Scene) -> _SceneIndex:
  return scene.memo("index", _SceneIndex)


def _mask(d: Description, ix: _SceneIndex) -> int:
  m = ix.all
  for f in d.filters:
    m &= ix.filter_mask(f.attr, f.value)
  if d.relation is not None and m:
    m &= ix.related(d.relation.kind, _mask(d.relation.anchor, ix))
  return m


def matches(d: Description, scene: scene_lib.Scene) -> frozenset[int]:
  """Objects fitting a description; an anchor counts if any object fits it."""
  return frozenset(_bits(_mask(d, _index(scene))))


def _numbered(p: Program) -> tuple:
  """The program's descriptions with each constraint numbered as in `iter_constraints`,
  cached on the program: per root ``(filters, relation)``, where filters are
  ``((index, capability, attr, value), ...)`` and the relation is ``(index, capability,
  kind, anchor)`` or None. Lets the checks drop constraints without building programs."""
  out = p.__dict__.get("_numbered")
  if out is None:
    counter = itertools.count()

    def number(d: Description) -> tuple:
      filters = tuple((next(counter), f.capability, f.attr, f.value) for f in d.filters)
      rel = d.relation
      if rel is not None:
        rel = (next(counter), rel.capability, rel.kind, number(rel.anchor))
      return filters, rel

    out = p.__dict__["_numbered"] = tuple(number(d) for d in _roots(p))
  return out


def constraint_count(p: Program) -> int:
  """How many constraints `iter_constraints` yields."""
  count = 0
  for filters, rel in _numbered(p):
    while True:
      count += len(filters)
      if rel is None:
        break
      count += 1
      filters, rel = rel[3]
  return count


def _mask_without(nd: tuple, ix: _SceneIndex, capability: str | None, index: int) -> int:
  filters, rel = nd
  m = ix.all
  for i, cap, attr, value in filters:
    if i != index and cap != capability:
      m &= ix.filter_mask(attr, value)
  if rel is not None and m:
    i, cap, kind, anchor = rel
    if i != index and cap != capability:
      m &= ix.related(kind, _mask_without(anchor, ix, capability, index))
  return m


def attribute_value(query: str, scene: scene_lib.Scene, i: int) -> str:
  """The answer of an attribute query about object i (UNDEFINED if it has none)."""
  o = scene.objects[i]
  if query == "color":
    return o.color
  if query == "shape":
    return o.kind if o.is_shape else UNDEFINED
  if query == "object":
    return o.kind if not o.is_shape else UNDEFINED
  if query == "letter":
    return o.letter or UNDEFINED
  if query == "motion":
    return o.motion or UNDEFINED
  if query == "region":
    return scene.region(i)
  if query == "ground":
    return scene.object_ground(i)
  raise ValueError(f"{query!r} is not an attribute query")


def pair_value(query: str, scene: scene_lib.Scene, i: int, j: int) -> str:
  a, b = scene.objects[i], scene.objects[j]
  if query == "tied":
    return "yes" if scene.linked(i, j) else "no"
  if query == "relation":  # where i is compared to j, for pairs sharing a row or column
    if a.row == b.row:
      return "left" if a.col < b.col else "right"
    if a.col == b.col:
      return "above" if a.row < b.row else "below"
    return UNDEFINED
  raise ValueError(f"{query!r} is not a pair query")


def scene_value(query: str, scene: scene_lib.Scene) -> str:
  if query == "place":
    return scene.place or UNDEFINED
  if query == "any_tied":
    return "yes" if scene.links else "no"
  if query == "arrangement":
    if len(scene.objects) != 2:
      return UNDEFINED
    a, b = scene.objects
    return "horizontally" if a.row == b.row else "vertically" if a.col == b.col else "diagonally"
  raise ValueError(f"{query!r} is not a scene query")


def _answers(query: str, scene: scene_lib.Scene, ix: _SceneIndex, masks: list[int]) -> frozenset:
  if query in SCENE_QUERIES:
    return frozenset({scene_value(query, scene)})
  if query == "count":
    return frozenset({str(masks[0].bit_count())})
  if query in PAIR_QUERIES:
    others = _bits(masks[1])
    return frozenset(
      pair_value(query, scene, i, j) for i in _bits(masks[0]) for j in others if i != j
    )
  values = ix.values(query)
  return frozenset(values[i] for i in _bits(masks[0]))


def answer_set(p: Program, scene: scene_lib.Scene) -> frozenset[str]:
  """All answers over the charitable readings of a program (module docstring)."""
  ix = _index(scene)
  return _answers(p.query, scene, ix, [_mask(d, ix) for d in _roots(p)])


def answer_set_without(
  p: Program, scene: scene_lib.Scene, *, capability: str | None = None, index: int = -1
) -> frozenset[str]:
  """``answer_set(without_capability(p, capability), scene)`` or, with ``index``,
  ``answer_set(without_constraint(p, index), scene)``, without building the program."""
  ix = _index(scene)
  masks = [_mask_without(nd, ix, capability, index) for nd in _numbered(p)]
  return _answers(p.query, scene, ix, masks)


def _unique_anchors(d: Description, ix: _SceneIndex) -> str | None:
  if d.relation is None:
    return None
  anchor = d.relation.anchor
  if anchor.filters == () and anchor.relation is None:  # "another object": any will do
    return None
  n = _mask(anchor, ix).bit_count()
  if n != 1:
    return f"anchor {noun_phrase(anchor)!r} fits {n} objects"
  return _unique_anchors(anchor, ix)


def resolve(p: Program, scene: scene_lib.Scene) -> tuple[str | None, str]:
  """The answer to the program as asked, or (None, why it is not well posed)."""
  ix = _index(scene)
  roots = _roots(p)
  for d in roots:
    why = _unique_anchors(d, ix)
    if why:
      return None, why
  if p.query in SCENE_QUERIES:
    v = scene_value(p.query, scene)
    return (None, f"{p.query} is undefined in this scene") if v == UNDEFINED else (v, "")
  if p.query == "count":
    return str(_mask(p.subject, ix).bit_count()), ""
  ids = []
  for d in roots:
    m = _mask(d, ix)
    n = m.bit_count()
    if n != 1:
      return None, f"{noun_phrase(d)!r} fits {n} objects"
    ids.append(m.bit_length() - 1)
  if p.query in PAIR_QUERIES:
    if ids[0] == ids[1]:
      return None, "both descriptions fit the same object"
    v = pair_value(p.query, scene, *ids)
  else:
    v = ix.values(p.query)[ids[0]]
  return (None, f"{p.query} is undefined for the object") if v == UNDEFINED else (v, "")


# --- English -------------------------------------------------------------------

_RELATION_WORDS = {
  "left_of": "to the left of",
  "right_of": "to the right of",
  "above": "above",
  "below": "below",
  "tied_to": "tied to",
}


def noun_phrase(d: Description, *, plural: bool = False) -> str:
  """ "the red circle with the letter k in the top left to the left of the car"."""
  pre, post = [], []
  head = "object"
  for f in d.filters:
    if f.attr == "color":
      pre.append(f.value)
    elif f.attr in ("shape", "object"):
      head = f.value
    elif f.attr == "letter":
      post.append("with a letter" if f.value == ANY else f"with the letter {f.value}")
    elif f.attr == "motion":
      if f.value == ANY:
        pre.insert(0, "moving")
      else:
        post.append(f"moving {f.value}")
    elif f.attr == "region":
      post.append(f"in the {f.value}")
    elif f.attr == "ground":
      post.append(f"on the {f.value}")
  if d.relation is not None:
    anchor = d.relation.anchor
    anchor_np = "another object" if anchor == Description() else noun_phrase(anchor)
    post.append(f"{_RELATION_WORDS[d.relation.kind]} {anchor_np}")
  words = [*pre, scene_lib.PLURALS[head] if plural else head, *post]
  return " ".join(words) if plural else "the " + " ".join(words)


def question_text(p: Program) -> str:
  """The English question for a program (one template per query)."""
  q = p.query
  if q == "place":
    return "What kind of place is this?"
  if q == "arrangement":
    return "How are the two objects lined up?"
  if q == "any_tied":
    return "Are any of the objects tied together?"
  if q == "count":
    return f"How many {noun_phrase(p.subject, plural=True)} are there?"
  if q == "relation":
    return f"Where is {noun_phrase(p.subject)} compared to {noun_phrase(p.other)}?"
  if q == "tied":
    return f"Is {noun_phrase(p.subject)} tied to {noun_phrase(p.other)}?"
  np_ = noun_phrase(p.subject)
  if q == "letter" and p.subject == Description((Filter("letter", ANY),)):
    return "What letter is written in the picture?"
  return {
    "color": f"What colour is {np_}?",
    "shape": f"What shape is {np_}?",
    "object": f"What kind of object is {np_}?",
    "letter": f"What letter is on {np_}?",
    "motion": f"Which way is {np_} going?",
    "region": f"Which part of the picture is {np_} in?",
    "ground": f"What kind of ground is {np_} on?",
  }[q]


def _signature(d: Description) -> str:
  parts = []
  for f in d.filters:
    parts.append({"letter": "lettered", "motion": "moving"}[f.attr] if f.value == ANY else f.attr)
  if d.relation is not None:
    kind = "rel" if d.relation.kind in SPATIAL_RELATIONS else "tied"
    parts.append(f"{kind}({_signature(d.relation.anchor)})")
  return ",".join(parts)


def qtype(p: Program) -> str:
  """The program's structure without values, e.g. ``color(shape,rel(object))``."""
  roots = _roots(p)
  if not roots:
    return p.query
  return f"{p.query}({';'.join(_signature(d) for d in roots)})"


@dataclasses.dataclass(frozen=True)
class Question:
  """A verified question: its program, English text, answer and capabilities."""

  program: Program
  text: str
  answer: str
  capabilities: tuple[str, ...]
  qtype: str

  @property
  def k(self) -> int:
    return len(self.capabilities)
