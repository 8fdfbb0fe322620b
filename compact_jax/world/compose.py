"""Composes verified questions that need exactly a given set of capabilities.

`compose_question` proposes random programs that use every listed capability
once or more (as the query, a filter or a relation) and nothing else, and returns
the first that passes `verify.verify_question`. Proposals are built around real
objects of the scene: pick the query, the object (or pair) it is about, hang the
relation capabilities off it as a chain of anchors (left of / tied to), then put
each attribute capability as a filter on some object of the chain where that
attribute exists. Most proposals fail necessity (there is no distractor that only
that constraint rules out); the verifier is what makes them exact.

`compose_with_distractors` (what the generate stage uses) also edits the scene:
it may first `enrich` an object (give it a letter, a motion, a rope) and then plant
minimal-pair distractors until every constraint is necessary (plant.py). A few
answers that verification favours ("how many" = 1, "is A tied to B" = yes) are
partly dropped, so that no question type has a dominant answer.

`sample_capability_set` is COMPACT's per-image sampling (generator.py there): k
distinct capabilities, weighted, preferring ones this image has not used yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping

import numpy as np

from compact_jax import capabilities as caps_lib
from compact_jax.world import plant as plant_lib
from compact_jax.world import questions as q_lib
from compact_jax.world import scene as scene_lib
from compact_jax.world import verify as verify_lib
from compact_jax.world.rand import Rand

QUERIES_BY_CAPABILITY: dict[str, tuple[str, ...]] = {
  "color": ("color",),
  "shape": ("shape",),
  "object_recognition": ("object",),
  "text_recognition": ("letter",),
  "action_recognition": ("motion",),
  "spatial_recognition": ("region",),
  "counting": ("count",),
  "scene_understanding": ("ground", "place"),
  "spatial_relationship": ("relation", "arrangement"),
  "object_interaction": ("tied", "any_tied"),
}
RELATION_CAPS = ("spatial_relationship", "object_interaction")
FILTER_ORDER = ("motion", "color", "shape", "object", "letter", "region", "ground")
MAX_DEPTH = 2  # relation hops from the subject: "the circle left of the car tied to the tree"
# Probabilities of optional parts of a proposal, so that the same capability set
# gets several program shapes.
P_SECOND_FILTER = 0.2
P_QUERY_CAP_ON_ANCHOR = 0.2
P_PRESENCE_FILTER = 0.5
P_SPECIFIC_MOTION = 0.5
P_BARE_ANCHOR = 0.25  # "to the left of another object"
# Count questions: how often, and by up to how much, to raise the count by planting
# exact copies of counted objects (plant.plant_copies).
P_RAISE_COUNT = 0.6
MAX_RAISE_COUNT = 3
# Consecutive repeated (or impossible) proposals after which a search gives up.
MAX_STALE_PROPOSALS = 12


def _definable(cap: str, scene: scene_lib.Scene, i: int) -> bool:
  o = scene.objects[i]
  return {
    "shape": o.is_shape,
    "object_recognition": not o.is_shape,
    "text_recognition": o.letter is not None,
    "action_recognition": o.motion is not None,
  }.get(cap, True)


def _filter(cap: str, scene: scene_lib.Scene, i: int, rng: Rand) -> q_lib.Filter:
  o = scene.objects[i]
  if cap == "color":
    return q_lib.Filter("color", o.color)
  if cap == "shape":
    return q_lib.Filter("shape", o.kind)
  if cap == "object_recognition":
    return q_lib.Filter("object", o.kind)
  if cap == "text_recognition":
    return q_lib.Filter("letter", o.letter)
  if cap == "action_recognition":
    return q_lib.Filter("motion", o.motion if rng.random() < P_SPECIFIC_MOTION else q_lib.ANY)
  if cap == "spatial_recognition":
    return q_lib.Filter("region", scene.region(i))
  if cap == "scene_understanding":
    return q_lib.Filter("ground", scene.object_ground(i))
  raise ValueError(f"{cap!r} is not a filter capability")


class _Facts:
  """What `propose_program` reads of a scene, derived once per scene (`Scene.memo`); every
  list keeps the order in which the proposal draws from it."""

  def __init__(self, scene: scene_lib.Scene):
    objs, n = scene.objects, len(scene.objects)
    self._scene = scene
    self._targets: dict[str, list[int]] = {}
    self.aligned_pairs = [
      (i, j)
      for i in range(n)
      for j in range(n)
      if i != j and (objs[i].row == objs[j].row or objs[i].col == objs[j].col)
    ]
    self.tied_pairs = [p for a, b in scene.links for p in ((a, b), (b, a))]
    self.untied_pairs = [
      (i, j) for i in range(n) for j in range(n) if i != j and not scene.linked(i, j)
    ]
    # Per host object: the (relation, anchor) options, all anchors in index (link) order.
    self.spatial_anchors: list[list[tuple[str, int]]] = []
    self.tied_anchors: list[list[tuple[str, int]]] = []
    for host, h in enumerate(objs):
      opts = []
      for a, o in enumerate(objs):
        if a == host:
          continue
        if o.row == h.row:
          opts.append(("left_of" if h.col < o.col else "right_of", a))
        elif o.col == h.col:
          opts.append(("above" if h.row < o.row else "below", a))
      self.spatial_anchors.append(opts)
      self.tied_anchors.append(
        [("tied_to", b if a == host else a) for a, b in scene.links if host in (a, b)]
      )

  def targets(self, query: str) -> list[int]:
    """The objects an attribute query can be asked about."""
    out = self._targets.get(query)
    if out is None:
      s = self._scene
      out = self._targets[query] = [
        i
        for i in range(len(s.objects))
        if query == "count" or q_lib.attribute_value(query, s, i) != q_lib.UNDEFINED
      ]
    return out


@dataclasses.dataclass
class _Node:
  obj: int
  depth: int
  filters: list[q_lib.Filter] = dataclasses.field(default_factory=list)
  relation: tuple[str, int] | None = None  # (kind, index of the anchor node)


def _build(nodes: list[_Node], idx: int) -> q_lib.Description:
  nd = nodes[idx]
  filters = tuple(sorted(set(nd.filters), key=lambda f: FILTER_ORDER.index(f.attr)))
  rel = None
  if nd.relation is not None:
    rel = q_lib.Relation(nd.relation[0], _build(nodes, nd.relation[1]))
  return q_lib.Description(filters, rel)


def propose_program(
  scene: scene_lib.Scene, capabilities: Collection[str], rng: Rand
) -> q_lib.Program | None:
  """One random program using exactly ``capabilities`` (unverified), or None."""
  caps = frozenset(capabilities)
  k, n = len(caps), len(scene.objects)
  query_cap = "counting" if "counting" in caps else rng.choice(sorted(caps))
  options = [q for q in QUERIES_BY_CAPABILITY[query_cap] if q not in q_lib.SCENE_QUERIES or k == 1]
  query = rng.choice(options)
  if query in q_lib.SCENE_QUERIES:
    return q_lib.Program(query)
  rest = caps - {query_cap}
  rel_caps = [c for c in sorted(rest) if c in RELATION_CAPS]
  attr_caps = [c for c in sorted(rest) if c not in RELATION_CAPS]

  facts = scene.memo("compose", _Facts)
  if query in q_lib.PAIR_QUERIES:
    if query == "relation":  # pairs sharing a row or a column
      pairs = facts.aligned_pairs
    elif rng.random() < 0.5:  # ask about tied and untied pairs equally often
      pairs = facts.tied_pairs
    else:
      pairs = facts.untied_pairs
    if not pairs:
      return None
    i, j = rng.choice(pairs)
    nodes = [_Node(i, 0), _Node(j, 0)]
  else:
    targets = facts.targets(query)
    if not targets:
      return None
    nodes = [_Node(rng.choice(targets), 0)]
  roots = len(nodes)

  rng.shuffle(rel_caps)
  for cap in rel_caps:
    open_nodes = [nd for nd in nodes if nd.relation is None and nd.depth < MAX_DEPTH]
    if not open_nodes:
      return None
    host = rng.choice(open_nodes)
    used = {nd.obj for nd in nodes}
    anchors = facts.spatial_anchors if cap == "spatial_relationship" else facts.tied_anchors
    opts = [opt for opt in anchors[host.obj] if opt[1] not in used]
    if not opts:
      return None
    kind, a = rng.choice(opts)
    nodes.append(_Node(a, host.depth + 1))
    host.relation = (kind, len(nodes) - 1)

  for cap in attr_caps:
    hosts = [nd for nd in nodes if _definable(cap, scene, nd.obj)]
    if not hosts:
      return None
    chosen = [rng.choice(hosts)]
    if len(hosts) > 1 and rng.random() < P_SECOND_FILTER:
      chosen.append(rng.choice([h for h in hosts if h is not chosen[0]]))
    for nd in chosen:
      nd.filters.append(_filter(cap, scene, nd.obj, rng))

  # The query's own capability may describe an anchor ("the colour of the object
  # left of the red car"), never the subject, where it would give the answer away.
  if query_cap in q_lib.FILTER_CAPABILITY.values() and query != "count":
    anchors = [nd for nd in nodes[roots:] if _definable(query_cap, scene, nd.obj)]
    if anchors and rng.random() < P_QUERY_CAP_ON_ANCHOR:
      nd = rng.choice(anchors)
      nd.filters.append(_filter(query_cap, scene, nd.obj, rng))
  # "the moving object" / "the object with a letter" narrow a motion or letter
  # query without naming its answer.
  if query in ("letter", "motion"):
    subject = nodes[0]
    if rng.random() < P_PRESENCE_FILTER or (not subject.filters and subject.relation is None):
      subject.filters.append(q_lib.Filter(query, q_lib.ANY))
  # A subject or pair object with no constraint is "the object", unique only in a
  # one-object scene: give it a filter from the listed capabilities (the query's
  # own only where it does not give the answer away). An anchor may stay bare: it
  # then reads "another object" and is indefinite.
  if n > 1:
    filter_caps = [c for c in sorted(caps) if c in q_lib.FILTER_CAPABILITY.values()]
    for idx, nd in enumerate(nodes):
      if nd.filters or nd.relation is not None or (idx == 0 and query == "count"):
        continue
      is_subject = idx == 0 and query in q_lib.ATTRIBUTE_QUERIES
      opts = [
        c
        for c in filter_caps
        if _definable(c, scene, nd.obj) and not (is_subject and c == query_cap)
      ]
      if idx >= roots and (not opts or rng.random() < P_BARE_ANCHOR):
        continue
      if not opts:
        return None
      cap = rng.choice(opts)
      nd.filters.append(_filter(cap, scene, nd.obj, rng))

  if query in q_lib.PAIR_QUERIES:
    return q_lib.Program(query, _build(nodes, 0), _build(nodes, 1))
  return q_lib.Program(query, _build(nodes, 0))


def _feasible_alone(cap: str, scene: scene_lib.Scene) -> bool:
  """Whether a k=1 question on ``cap`` can exist: it has no constraint but an
  implicit "moving"/"with a letter", so its object must be alone of its sort."""
  objs = scene.objects
  n = len(objs)
  if cap in ("color", "spatial_recognition"):
    return n == 1
  if cap == "shape":
    return n == 1 and objs[0].is_shape
  if cap == "object_recognition":
    return n == 1 and not objs[0].is_shape
  if cap == "text_recognition":
    return sum(o.letter is not None for o in objs) == 1
  if cap == "action_recognition":
    return sum(o.motion is not None for o in objs) == 1
  if cap == "spatial_relationship":
    return n == 2
  if cap == "scene_understanding":
    return scene.place is not None or n == 1
  return True  # counting, object_interaction ("are any tied?")


def feasible(scene: scene_lib.Scene, capabilities: Collection[str]) -> bool:
  """Cheap necessary conditions for some question with these capabilities to exist."""
  caps, objs = set(capabilities), scene.objects
  k = len(caps)
  if k == 1:
    return bool(objs) and _feasible_alone(next(iter(caps)), scene)
  needs = {
    "shape": any(o.is_shape for o in objs),
    "object_recognition": any(not o.is_shape for o in objs),
    "text_recognition": any(o.letter for o in objs),
    "action_recognition": any(o.motion for o in objs),
    "object_interaction": bool(scene.links) or k == 1,
    "scene_understanding": scene.patch is not None or (k == 1 and scene.place is not None),
    "spatial_relationship": len(objs) >= 2,
  }
  return bool(objs) and all(needs.get(c, True) for c in caps)


# Answers that verification favours, and the share of them to drop. A random
# description of a random object usually fits it alone, so "how many" would mostly
# be 1; "is A tied to B?" verifies more easily when they are tied than when not.
_REBALANCE = {("count", "1"): 0.5, ("tied", "yes"): 0.6}


def _rebalance(program: q_lib.Program, answer: str, rng: Rand) -> bool:
  """Whether to drop a verified question whose answer is over-represented."""
  p = _REBALANCE.get((program.query, answer), 0.0)
  return p > 0 and rng.random() < p


def compose_question(
  scene: scene_lib.Scene,
  capabilities: Collection[str],
  rng: np.random.Generator | Rand,
  *,
  max_attempts: int = 64,
) -> q_lib.Question | None:
  """A verified question needing exactly ``capabilities``, or None if none was found."""
  rng = Rand.spawn(rng)
  caps = caps_lib.canonical(capabilities)
  if not feasible(scene, caps):
    return None
  seen: set[q_lib.Program] = set()
  stale = 0
  for _ in range(max_attempts):
    program = propose_program(scene, caps, rng)
    if program is None or program in seen:
      stale += 1
      if stale >= MAX_STALE_PROPOSALS:
        break  # the small space of programs for this scene is exhausted
      continue
    stale = 0
    seen.add(program)
    report = verify_lib.verify_question(scene, program, caps, rng, quick=True)
    if not report.ok or _rebalance(program, report.answer, rng):
      continue
    report = verify_lib.verify_question(scene, program, caps, rng)
    if report.ok:
      return q_lib.Question(
        program=program,
        text=report.text,
        answer=report.answer,
        capabilities=caps,
        qtype=q_lib.qtype(program),
      )
  return None


def reverified(
  scene: scene_lib.Scene, q: q_lib.Question, rng: Rand, *, quick: bool = False
) -> q_lib.Question | None:
  """``q`` verified again on an extended scene (its answer may change, e.g. a count)."""
  report = verify_lib.verify_question(scene, q.program, q.capabilities, rng, quick=quick)
  return dataclasses.replace(q, answer=report.answer) if report.ok else None


@dataclasses.dataclass(frozen=True)
class Composed:
  """A new question, the scene it was verified on, and the image's earlier questions
  re-verified on that scene (planted distractors can change their answers)."""

  scene: scene_lib.Scene
  question: q_lib.Question
  earlier: tuple[q_lib.Question, ...]


def enrich(scene: scene_lib.Scene, capabilities: Collection[str], rng: Rand) -> scene_lib.Scene:
  """The scene with one random object given a letter, a motion, a rope, or a shape
  (sprite) kind where the capabilities need one and the object (scene) has none:
  composite questions need objects carrying several attributes at once, which the
  scene prior makes rare."""
  objs = list(scene.objects)
  if not objs:
    return scene
  i = rng.integers(len(objs))
  o = objs[i]
  if "text_recognition" in capabilities and o.letter is None:
    o = dataclasses.replace(o, letter=rng.choice(scene_lib.LETTERS))
  if "action_recognition" in capabilities and o.motion is None:
    o = dataclasses.replace(o, motion=rng.choice(scene_lib.DIRECTIONS))
  if "shape" in capabilities and not any(x.is_shape for x in objs):
    o = dataclasses.replace(o, kind=rng.choice(scene_lib.SHAPES))
  elif "object_recognition" in capabilities and all(x.is_shape for x in objs):
    o = dataclasses.replace(o, kind=rng.choice(scene_lib.SPRITES))
  objs[i] = o
  links = scene.links
  if "object_interaction" in capabilities:
    j = rng.integers(len(objs))
    pair = (min(i, j), max(i, j))
    cells = [(x.row, x.col) for x in objs]
    others = [c for k, c in enumerate(cells) if k not in pair]
    if i != j and pair not in links and scene_lib.rope_is_clear(cells[i], cells[j], others):
      links = tuple(sorted({*links, pair}))
  return dataclasses.replace(scene, objects=tuple(objs), links=links)


def compose_with_distractors(
  scene: scene_lib.Scene,
  capabilities: Collection[str],
  rng: np.random.Generator | Rand,
  *,
  max_new_objects: int,
  max_objects: int,
  keep: Collection[q_lib.Question] = (),
  max_attempts: int = 64,
  search_attempts: int = 16,
) -> Composed | None:
  """Like `compose_question`, but may add distractor objects (see plant.py).

  First searches the scene as it is; then proposes programs (half of the time on
  an `enrich`ed scene) and plants, for each constraint that is not yet necessary, a
  minimal-pair distractor: at most
  ``max_new_objects`` for this question and ``max_objects`` in the scene. The
  questions in ``keep`` (asked earlier about this image) must still pass the exact
  checks on the new scene, and come back with their answers there; the caller
  verifies them fully on the final scene (`reverified`).
  """
  max_objects = min(max_objects, len(scene.objects) + max_new_objects)
  caps = caps_lib.canonical(capabilities)
  rng = Rand.spawn(rng)
  keep = tuple(keep)
  q = compose_question(scene, caps, rng, max_attempts=search_attempts)
  if q is not None:
    return Composed(scene, q, keep)
  seen: set[tuple[scene_lib.Scene, q_lib.Program]] = set()
  stale = 0
  for _ in range(max_attempts):
    base = scene if rng.random() < 0.5 else enrich(scene, caps, rng)
    program = propose_program(base, caps, rng) if feasible(base, caps) else None
    if program is None or (base, program) in seen:
      stale += 1
      if stale >= MAX_STALE_PROPOSALS:
        break
      continue
    stale = 0
    seen.add((base, program))
    answer, _ = q_lib.resolve(program, base)
    if answer is None or verify_lib.answer_in_text(q_lib.question_text(program), answer):
      continue
    s = base
    if program.query == "count" and rng.random() < P_RAISE_COUNT:
      extra = rng.integers(1, MAX_RAISE_COUNT + 1)
      if len(s.objects) + extra <= max_objects:
        s = plant_lib.plant_copies(s, program, extra, rng) or s
        answer, _ = q_lib.resolve(program, s)
    sites = q_lib.constraint_sites(program)
    for _round in range(len(sites) + 1):
      failing = [
        site
        for site in sites
        if q_lib.answer_set(q_lib.without_constraint(program, site.index), s) == {answer}
      ]
      if not failing:
        break
      site = rng.choice(failing)
      if len(s.objects) + site.depth + 1 > max_objects:
        s = None
        break
      s = plant_lib.plant_distractor(s, program, site, answer, rng)
      if s is None:
        break
    if s is None or s is scene:
      continue
    report = verify_lib.verify_question(s, program, caps, rng, quick=True)
    if not report.ok or _rebalance(program, report.answer, rng):
      continue
    earlier = tuple(reverified(s, q, rng, quick=True) for q in keep)
    if any(q is None for q in earlier):
      continue
    report = verify_lib.verify_question(s, program, caps, rng)
    if not report.ok:
      continue
    question = q_lib.Question(
      program=program,
      text=report.text,
      answer=report.answer,
      capabilities=caps,
      qtype=q_lib.qtype(program),
    )
    return Composed(s, question, earlier)
  return None


def sample_capability_set(
  rng: Rand,
  k: int,
  *,
  used: Collection[str],
  weights: Mapping[str, float],
) -> tuple[str, ...]:
  """k distinct capabilities, weighted, from those ``used`` has not (else from all)."""
  pool = [c for c in caps_lib.CAPABILITIES if c not in used]
  if len(pool) < k:
    pool = list(caps_lib.CAPABILITIES)
  return caps_lib.canonical(rng.weighted_sample(pool, [weights.get(c, 1.0) for c in pool], k))
