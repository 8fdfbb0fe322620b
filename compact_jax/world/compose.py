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
import functools
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


def _filter_options(cap: str, scene: scene_lib.Scene, i: int) -> tuple[tuple[str, str], ...]:
  """The filter naming object i by ``cap``, as ``(attr, value)``; for action_recognition
  two, (its direction, ANY), of which each use draws one (`_draw`)."""
  o = scene.objects[i]
  if cap == "color":
    return (("color", o.color),)
  if cap == "shape":
    return (("shape", o.kind),)
  if cap == "object_recognition":
    return (("object", o.kind),)
  if cap == "text_recognition":
    return (("letter", o.letter),)
  if cap == "action_recognition":
    return ("motion", o.motion), ("motion", q_lib.ANY)
  if cap == "spatial_recognition":
    return (("region", scene.region(i)),)
  if cap == "scene_understanding":
    return (("ground", scene.object_ground(i)),)
  raise ValueError(f"{cap!r} is not a filter capability")


_PRESENCE = {"letter": ("letter", q_lib.ANY), "motion": ("motion", q_lib.ANY)}
_FILTER_RANK = {attr: i for i, attr in enumerate(FILTER_ORDER)}


def _filter_rank(f: tuple[str, str]) -> int:
  return _FILTER_RANK[f[0]]


def _draw(options: tuple[tuple[str, str], ...], rand) -> tuple[str, str]:
  """A filter from `_filter_options`: a motion filter names the direction with
  probability P_SPECIFIC_MOTION, else reads "moving"."""
  return options[0] if len(options) == 1 or rand() < P_SPECIFIC_MOTION else options[1]


class _FilterTables(dict):
  """filter capability -> `_Facts.filters`' table for it, made on first lookup."""

  def __init__(self, scene: scene_lib.Scene):
    super().__init__()
    self._scene = scene

  def __missing__(self, cap: str) -> tuple:
    s = self._scene
    table = self[cap] = tuple(
      _filter_options(cap, s, i) if _definable(cap, s, i) else None for i in range(len(s.objects))
    )
    return table


class _Facts:
  """What `propose_program` reads of a scene, derived once per scene (`Scene.memo`); every
  list keeps the order in which the proposal draws from it."""

  def __init__(self, scene: scene_lib.Scene):
    objs, n = scene.objects, len(scene.objects)
    self._scene = scene
    self.n = n
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
    # Per filter capability, per object: `_filter_options`, or None where the object has
    # no such attribute; each table made when first read.
    self.filters = _FilterTables(scene)

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


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What a proposal reads of its capability set, per query capability: the queries it
  may ask, the relation and attribute capabilities left (sorted), and whether it can
  also describe an anchor. Derived once per set (`_plan`)."""

  query_caps: tuple[str, ...]  # drawn from; just ("counting",) when counting is listed
  draws_query_cap: bool
  by_query_cap: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], bool]]
  filter_caps: tuple[str, ...]


@functools.lru_cache(maxsize=2048)
def _plan(caps: frozenset[str]) -> _Plan:
  if not caps:
    raise ValueError("a question needs at least one capability")
  k = len(caps)
  by_query_cap = {}
  for query_cap in caps:
    options = tuple(
      q for q in QUERIES_BY_CAPABILITY[query_cap] if q not in q_lib.SCENE_QUERIES or k == 1
    )
    rest = caps - {query_cap}
    rel_caps = tuple(c for c in sorted(rest) if c in RELATION_CAPS)
    attr_caps = tuple(c for c in sorted(rest) if c not in RELATION_CAPS)
    on_anchor = query_cap in q_lib.FILTER_CAPABILITY.values()
    by_query_cap[query_cap] = (options, rel_caps, attr_caps, on_anchor)
  counting = "counting" in caps
  return _Plan(
    query_caps=("counting",) if counting else tuple(sorted(caps)),
    draws_query_cap=not counting,
    by_query_cap=by_query_cap,
    filter_caps=tuple(c for c in sorted(caps) if c in q_lib.FILTER_CAPABILITY.values()),
  )


# A program as nested tuples, equal iff the programs are: ``(query, subject, other)``,
# each description ``(filters, relation)`` with filters ``((attr, value), ...)`` and the
# relation ``(kind, anchor description)`` or None. The search builds these (a tuple is
# made and hashed many times faster than the dataclasses) and skips repeats before
# making the `q_lib.Program`.
ProgramKey = tuple


def _description_key(nodes: list[list], idx: int) -> tuple:
  _, _, filters, relation = nodes[idx]
  if len(filters) > 1:
    # A node never holds two filters on one attribute, so the order is total.
    filters = sorted(set(filters), key=_filter_rank)
  if relation is not None:
    relation = (relation[0], _description_key(nodes, relation[1]))
  return tuple(filters), relation


def _description(key: tuple | None) -> q_lib.Description | None:
  if key is None:
    return None
  filters, relation = key
  if relation is not None:
    relation = q_lib.Relation(relation[0], _description(relation[1]))
  return q_lib.Description(tuple(q_lib.Filter(a, v) for a, v in filters), relation)


def program_from_key(key: ProgramKey) -> q_lib.Program:
  query, subject, other = key
  return q_lib.Program(query, _description(subject), _description(other))


def propose_program(
  scene: scene_lib.Scene, capabilities: Collection[str], rng: Rand
) -> q_lib.Program | None:
  """One random program using exactly ``capabilities`` (unverified), or None."""
  key = _propose(scene, _plan(frozenset(capabilities)), rng)
  return None if key is None else program_from_key(key)


def _propose(scene: scene_lib.Scene, plan: _Plan, rng: Rand) -> ProgramKey | None:
  # `rng.choice(seq)` is `seq[int(rand() * len(seq))]`, inlined: this is the search's
  # innermost loop. Every draw happens where and when the plain version made it, since
  # generation must stay a function of the seed.
  rand = rng.random
  if plan.draws_query_cap:
    query_cap = plan.query_caps[int(rand() * len(plan.query_caps))]
  else:
    query_cap = "counting"
  options, rel_caps, attr_caps, on_anchor = plan.by_query_cap[query_cap]
  query = options[int(rand() * len(options))]
  if query in q_lib.SCENE_QUERIES:
    return query, None, None

  facts = scene.memo("compose", _Facts)
  # A node is [object, depth, filters, relation (kind, index of the anchor node) or None].
  if query in q_lib.PAIR_QUERIES:
    if query == "relation":  # pairs sharing a row or a column
      pairs = facts.aligned_pairs
    elif rand() < 0.5:  # ask about tied and untied pairs equally often
      pairs = facts.tied_pairs
    else:
      pairs = facts.untied_pairs
    if not pairs:
      return None
    i, j = pairs[int(rand() * len(pairs))]
    nodes = [[i, 0, [], None], [j, 0, [], None]]
  else:
    targets = facts.targets(query)
    if not targets:
      return None
    nodes = [[targets[int(rand() * len(targets))], 0, [], None]]
  roots = len(nodes)

  if len(rel_caps) > 1:
    rel_caps = list(rel_caps)
    rng.shuffle(rel_caps)
  for cap in rel_caps:
    open_nodes = [nd for nd in nodes if nd[3] is None and nd[1] < MAX_DEPTH]
    if not open_nodes:
      return None
    host = open_nodes[int(rand() * len(open_nodes))]
    used = {nd[0] for nd in nodes}
    anchors = facts.spatial_anchors if cap == "spatial_relationship" else facts.tied_anchors
    opts = [opt for opt in anchors[host[0]] if opt[1] not in used]
    if not opts:
      return None
    kind, a = opts[int(rand() * len(opts))]
    nodes.append([a, host[1] + 1, [], None])
    host[3] = (kind, len(nodes) - 1)

  filters = facts.filters
  for cap in attr_caps:
    table = filters[cap]
    hosts = [nd for nd in nodes if table[nd[0]] is not None]
    if not hosts:
      return None
    first = hosts[int(rand() * len(hosts))]
    chosen = [first]
    if len(hosts) > 1 and rand() < P_SECOND_FILTER:
      others = [h for h in hosts if h is not first]
      chosen.append(others[int(rand() * len(others))])
    for nd in chosen:  # both hosts are drawn before either filter
      nd[2].append(_draw(table[nd[0]], rand))

  # The query's own capability may describe an anchor ("the colour of the object
  # left of the red car"), never the subject, where it would give the answer away.
  if on_anchor and query != "count":
    table = filters[query_cap]
    anchors = [nd for nd in nodes[roots:] if table[nd[0]] is not None]
    if anchors and rand() < P_QUERY_CAP_ON_ANCHOR:
      nd = anchors[int(rand() * len(anchors))]
      nd[2].append(_draw(table[nd[0]], rand))
  # "the moving object" / "the object with a letter" narrow a motion or letter
  # query without naming its answer.
  if query in _PRESENCE:
    subject = nodes[0]
    if rand() < P_PRESENCE_FILTER or (not subject[2] and subject[3] is None):
      subject[2].append(_PRESENCE[query])
  # A subject or pair object with no constraint is "the object", unique only in a
  # one-object scene: give it a filter from the listed capabilities (the query's
  # own only where it does not give the answer away). An anchor may stay bare: it
  # then reads "another object" and is indefinite.
  if facts.n > 1:
    for idx, nd in enumerate(nodes):
      if nd[2] or nd[3] is not None or (idx == 0 and query == "count"):
        continue
      obj = nd[0]
      is_subject = idx == 0 and query in q_lib.ATTRIBUTE_QUERIES
      opts = [
        c
        for c in plan.filter_caps
        if filters[c][obj] is not None and not (is_subject and c == query_cap)
      ]
      if idx >= roots and (not opts or rand() < P_BARE_ANCHOR):
        continue
      if not opts:
        return None
      nd[2].append(_draw(filters[opts[int(rand() * len(opts))]][obj], rand))

  if query in q_lib.PAIR_QUERIES:
    return query, _description_key(nodes, 0), _description_key(nodes, 1)
  return query, _description_key(nodes, 0), None


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


class _Feasibility:
  """`feasible`'s conditions, read once per scene (`Scene.memo`)."""

  def __init__(self, scene: scene_lib.Scene):
    objs = scene.objects
    self.any_objects = bool(objs)
    self.alone = {cap: _feasible_alone(cap, scene) for cap in caps_lib.CAPABILITIES}
    # For k >= 2: the capabilities no question on this scene can use.
    needs = {
      "shape": any(o.is_shape for o in objs),
      "object_recognition": any(not o.is_shape for o in objs),
      "text_recognition": any(o.letter for o in objs),
      "action_recognition": any(o.motion for o in objs),
      "object_interaction": bool(scene.links),
      "scene_understanding": scene.patch is not None,
      "spatial_relationship": len(objs) >= 2,
    }
    self.unusable = frozenset(c for c, ok in needs.items() if not ok)


def feasible(scene: scene_lib.Scene, capabilities: Collection[str]) -> bool:
  """Cheap necessary conditions for some question with these capabilities to exist."""
  caps = set(capabilities)
  f = scene.memo("feasible", _Feasibility)
  if len(caps) == 1:
    cap = next(iter(caps))
    return f.any_objects and f.alone.get(cap, True)
  return f.any_objects and f.unusable.isdisjoint(caps)


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
  listed = frozenset(caps)
  plan = _plan(listed)
  seen: set[ProgramKey] = set()
  stale = 0
  for _ in range(max_attempts):
    key = _propose(scene, plan, rng)
    if key is None or key in seen:
      stale += 1
      if stale >= MAX_STALE_PROPOSALS:
        break  # the small space of programs for this scene is exhausted
      continue
    stale = 0
    seen.add(key)
    program = program_from_key(key)
    answer = verify_lib.exact_answer(scene, program, listed)
    if answer is None or _rebalance(program, answer, rng):
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
        site for site in sites if q_lib.answer_set_without(program, s, index=site.index) == {answer}
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
