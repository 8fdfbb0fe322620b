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
from collections.abc import Callable, Iterator
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
  a, b = scene.objects[i], scene.objects[j]
  if kind == "left_of":
    return a.row == b.row and a.col < b.col
  if kind == "right_of":
    return a.row == b.row and a.col > b.col
  if kind == "above":
    return a.col == b.col and a.row < b.row
  if kind == "below":
    return a.col == b.col and a.row > b.row
  if kind == "tied_to":
    return scene.linked(i, j)
  raise ValueError(f"unknown relation {kind!r}")


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


def _relation_pairs(kind: str) -> Callable[[scene_lib.Scene], frozenset[tuple[int, int]]]:
  def pairs(scene: scene_lib.Scene) -> frozenset[tuple[int, int]]:
    n = len(scene.objects)
    return frozenset(
      (i, j) for i in range(n) for j in range(n) if relation_holds(scene, kind, i, j)
    )

  return pairs


_RELATION_PAIRS = {kind: _relation_pairs(kind) for kind in RELATION_CAPABILITY}


def matches(d: Description, scene: scene_lib.Scene) -> frozenset[int]:
  """Objects fitting a description; an anchor counts if any object fits it."""
  out = range(len(scene.objects))
  for f in d.filters:
    col, value = scene.column(_FILTER_COLUMN[f.attr]), f.value
    if value == ANY:
      out = [i for i in out if col[i] is not None]
    else:
      out = [i for i in out if col[i] == value]
  if d.relation is not None:
    anchors = matches(d.relation.anchor, scene)
    kind = d.relation.kind
    holds = scene.memo("relation:" + kind, _RELATION_PAIRS[kind])
    out = [i for i in out if any(a != i and (i, a) in holds for a in anchors)]
  return frozenset(out)


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


def answer_set(p: Program, scene: scene_lib.Scene) -> frozenset[str]:
  """All answers over the charitable readings of a program (module docstring)."""
  if p.query in SCENE_QUERIES:
    return frozenset({scene_value(p.query, scene)})
  if p.query == "count":
    return frozenset({str(len(matches(p.subject, scene)))})
  if p.query in PAIR_QUERIES:
    ms, mo = matches(p.subject, scene), matches(p.other, scene)
    return frozenset(pair_value(p.query, scene, i, j) for i in ms for j in mo if i != j)
  return frozenset(attribute_value(p.query, scene, i) for i in matches(p.subject, scene))


def _unique_anchors(d: Description, scene: scene_lib.Scene) -> str | None:
  if d.relation is None:
    return None
  anchor = d.relation.anchor
  if anchor == Description():  # "another object": indefinite, any object will do
    return None
  n = len(matches(anchor, scene))
  if n != 1:
    return f"anchor {noun_phrase(anchor)!r} fits {n} objects"
  return _unique_anchors(anchor, scene)


def resolve(p: Program, scene: scene_lib.Scene) -> tuple[str | None, str]:
  """The answer to the program as asked, or (None, why it is not well posed)."""
  for d in _roots(p):
    why = _unique_anchors(d, scene)
    if why:
      return None, why
  if p.query in SCENE_QUERIES:
    v = scene_value(p.query, scene)
    return (None, f"{p.query} is undefined in this scene") if v == UNDEFINED else (v, "")
  if p.query == "count":
    return str(len(matches(p.subject, scene))), ""
  ids = []
  for d in _roots(p):
    m = matches(d, scene)
    if len(m) != 1:
      return None, f"{noun_phrase(d)!r} fits {len(m)} objects"
    ids.append(next(iter(m)))
  if p.query in PAIR_QUERIES:
    if ids[0] == ids[1]:
      return None, "both descriptions fit the same object"
    v = pair_value(p.query, scene, *ids)
  else:
    v = attribute_value(p.query, scene, ids[0])
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
