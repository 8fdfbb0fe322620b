"""The question search's fast paths against the plain definitions they replace.

The semantics run on per-scene bitmasks (`questions._SceneIndex`), constraints are dropped
without building programs (`answer_set_without`), proposals are screened by a short-circuit
verdict (`verify.exact_answer`), and `Rand.choice` is inlined. Each is checked here against a
straightforward implementation of the definition, on random scenes and programs; the digest
tests (tests/experiments/test_compact_repro.py, tests/datagen) pin the end-to-end output.
"""

import dataclasses

from compact_jax import capabilities as caps_lib
from compact_jax.world import compose, verify
from compact_jax.world import questions as Q
from compact_jax.world import scene as scene_lib
from compact_jax.world.rand import Rand
from tests.world.hand_built import make_scene, obj

F, D, R, P = Q.Filter, Q.Description, Q.Relation, Q.Program


# --- the plain definitions (questions.py's module docstring) -----------------------------


def ref_matches(d: Q.Description, s: scene_lib.Scene) -> frozenset[int]:
  out = [i for i in range(len(s.objects)) if all(f.holds(s, i) for f in d.filters)]
  if d.relation is not None:
    anchors = ref_matches(d.relation.anchor, s)
    kind = d.relation.kind
    out = [i for i in out if any(a != i and Q.relation_holds(s, kind, i, a) for a in anchors)]
  return frozenset(out)


def ref_answer_set(p: Q.Program, s: scene_lib.Scene) -> frozenset[str]:
  if p.query in Q.SCENE_QUERIES:
    return frozenset({Q.scene_value(p.query, s)})
  if p.query == "count":
    return frozenset({str(len(ref_matches(p.subject, s)))})
  if p.query in Q.PAIR_QUERIES:
    ms, mo = ref_matches(p.subject, s), ref_matches(p.other, s)
    return frozenset(Q.pair_value(p.query, s, i, j) for i in ms for j in mo if i != j)
  return frozenset(Q.attribute_value(p.query, s, i) for i in ref_matches(p.subject, s))


def ref_resolve(p: Q.Program, s: scene_lib.Scene) -> tuple[str | None, str]:
  roots = [d for d in (p.subject, p.other) if d is not None]
  for d in roots:
    while d.relation is not None and d.relation.anchor != D():
      d = d.relation.anchor
      n = len(ref_matches(d, s))
      if n != 1:
        return None, f"anchor {Q.noun_phrase(d)!r} fits {n} objects"
  if p.query in Q.SCENE_QUERIES:
    v = Q.scene_value(p.query, s)
    return (None, f"{p.query} is undefined in this scene") if v == Q.UNDEFINED else (v, "")
  if p.query == "count":
    return str(len(ref_matches(p.subject, s))), ""
  ids = []
  for d in roots:
    m = ref_matches(d, s)
    if len(m) != 1:
      return None, f"{Q.noun_phrase(d)!r} fits {len(m)} objects"
    ids.append(next(iter(m)))
  if p.query in Q.PAIR_QUERIES:
    if ids[0] == ids[1]:
      return None, "both descriptions fit the same object"
    v = Q.pair_value(p.query, s, *ids)
  else:
    v = Q.attribute_value(p.query, s, ids[0])
  return (None, f"{p.query} is undefined for the object") if v == Q.UNDEFINED else (v, "")


# --- random scenes and programs -------------------------------------------------------------

_VALUES = {
  "color": (*scene_lib.COLORS, Q.ANY),
  "shape": (*scene_lib.SHAPES, "car", Q.ANY),
  "object": (*scene_lib.SPRITES, "circle"),
  "letter": (*scene_lib.LETTERS, Q.ANY),
  "motion": (*scene_lib.DIRECTIONS, Q.ANY),
  "region": (*scene_lib.regions(4), "center"),
  "ground": scene_lib.GROUNDS,
}


def random_description(rng: Rand, depth: int) -> Q.Description:
  attrs = rng.sample(list(_VALUES), rng.integers(0, 3))
  filters = tuple(F(a, rng.choice(_VALUES[a])) for a in attrs)
  relation = None
  if depth < 2 and rng.random() < 0.5:
    relation = R(rng.choice(list(Q.RELATION_CAPABILITY)), random_description(rng, depth + 1))
  return D(filters, relation)


def random_program(rng: Rand) -> Q.Program:
  query = rng.choice(list(Q.QUERY_CAPABILITY))
  if query in Q.SCENE_QUERIES:
    return P(query)
  other = random_description(rng, 0) if query in Q.PAIR_QUERIES else None
  return P(query, random_description(rng, 0), other)


def scenes(n: int, seed: int = 0):
  """Prior scenes of every size, each also perturbed (objects then leave row-major order)."""
  rng = Rand(seed)
  for i in range(n):
    g = (3, 4, 5)[i % 3]
    s = scene_lib.sample_scene(rng, grid_size=g, min_objects=1, max_objects=min(8, g * g))
    yield s
    moved = verify.perturb(s, ["spatial_recognition", "object_interaction"], [], rng)
    if moved is not None:
      yield moved


def programs_for(s: scene_lib.Scene, rng: Rand, n: int):
  """Random programs, and proposals (which mostly fit some object of ``s``)."""
  for _ in range(n):
    yield random_program(rng)
    caps = compose.sample_capability_set(rng, 1 + rng.integers(3), used=(), weights={})
    p = compose.propose_program(s, caps, rng)
    if p is not None:
      yield p


# --- the checks -------------------------------------------------------------------------------


def test_mask_semantics_equal_the_plain_definitions():
  rng = Rand(1)
  checked = well_posed = 0
  for s in scenes(60):
    for p in programs_for(s, rng, 15):
      for d in (p.subject, p.other):
        if d is not None:
          assert Q.matches(d, s) == ref_matches(d, s), (p, s)
      assert Q.answer_set(p, s) == ref_answer_set(p, s), (p, s)
      got = Q.resolve(p, s)
      assert got == ref_resolve(p, s), (p, s)
      checked += 1
      well_posed += got[0] is not None
  assert checked > 1000 and well_posed > 200  # both branches were exercised


def test_relation_masks_follow_relation_holds_on_odd_scenes():
  # An object related to itself never counts; a link stored unsorted is not a rope.
  s = dataclasses.replace(
    make_scene(obj(0, 0), obj(0, 2, "blue"), obj(2, 2, "green"), obj(3, 0, "red", "car")),
    links=((0, 2), (3, 1)),
  )
  for kind in Q.RELATION_CAPABILITY:
    for a in range(4):
      anchor = D((F("color", s.objects[a].color),)) if a != 3 else D((F("object", "car"),))
      d = D((), R(kind, anchor))
      assert Q.matches(d, s) == ref_matches(d, s), (kind, a)
  assert Q.matches(D((), R("tied_to", D())), s) == {0, 2}


def test_dropping_constraints_in_place_equals_building_the_smaller_program():
  rng = Rand(2)
  for s in scenes(30, seed=5):
    for p in programs_for(s, rng, 10):
      n = len(list(Q.iter_constraints(p)))
      assert Q.constraint_count(p) == n
      for idx in range(n):
        want = Q.answer_set(Q.without_constraint(p, idx), s)
        assert Q.answer_set_without(p, s, index=idx) == want, (p, idx)
      for cap in caps_lib.CAPABILITIES:
        want = Q.answer_set(Q.without_capability(p, cap), s)
        assert Q.answer_set_without(p, s, capability=cap) == want, (p, cap)


def test_exact_answer_is_the_quick_verification_verdict():
  rng = Rand(3)
  passed = 0
  for s in scenes(80, seed=7):
    for _ in range(12):
      caps = compose.sample_capability_set(rng, 1 + rng.integers(3), used=(), weights={})
      p = compose.propose_program(s, caps, rng)
      if p is None:
        continue
      for listed in (caps, caps_lib.CAPABILITIES[:2]):
        report = verify.verify_question(s, p, listed, quick=True)
        got = verify.exact_answer(s, p, frozenset(caps_lib.canonical(listed)))
        assert got == (report.answer if report.ok else None), (p, listed, report.failures)
        passed += got is not None
  assert passed >= 20


def test_rand_choice_draws_as_integers_did():
  a, b = Rand(11), Rand(11)
  seqs = [tuple(range(n)) for n in (1, 2, 3, 7, 10)]
  for i in range(500):
    seq = seqs[i % len(seqs)]
    assert a.choice(seq) == seq[b.integers(len(seq))]
  assert a.random() == b.random()
  try:
    a.choice(())
  except ValueError as e:
    assert "empty range" in str(e)
  else:
    raise AssertionError("choice of an empty sequence must fail")


def test_fast_scene_copies_equal_dataclasses_replace():
  s = make_scene(obj(0, 0, letter="k"), obj(2, 1, "blue", "car"), links=[(0, 1)])
  Q.resolve(P("color", D((F("letter", "k"),))), s)  # fills the scene's memo
  copy = verify._scene_with(s, ground="snow", links=())
  assert copy == dataclasses.replace(s, ground="snow", links=())
  assert "_memo" not in copy.__dict__  # derived facts belong to the original scene
  assert Q.resolve(P("color", D((F("letter", "k"),))), copy) == ("red", "")
