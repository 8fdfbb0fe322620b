"""The composer finds exact questions for every k; planting makes constraints needed."""

import collections

import numpy as np
import pytest

from compact_jax import capabilities as caps_lib
from compact_jax.world import compose, plant, verify
from compact_jax.world import questions as Q
from compact_jax.world import scene as scene_lib
from compact_jax.world.rand import Rand
from tests.world.hand_built import make_scene, obj

F, D, R, P = Q.Filter, Q.Description, Q.Relation, Q.Program


@pytest.mark.parametrize(
  "cap, scene",
  [
    ("color", make_scene(obj(1, 2, "blue", "car"))),
    ("shape", make_scene(obj(1, 2, "blue", "diamond"))),
    ("object_recognition", make_scene(obj(1, 2, "blue", "fish"))),
    ("spatial_recognition", make_scene(obj(3, 0, "blue", "fish"))),
    ("counting", make_scene(obj(0, 0), obj(1, 2), obj(3, 3))),
    ("text_recognition", make_scene(obj(0, 0), obj(1, 2, letter="x"), obj(3, 3))),
    ("action_recognition", make_scene(obj(0, 0), obj(1, 2, motion="down"))),
    ("spatial_relationship", make_scene(obj(0, 0), obj(0, 3))),
    ("object_interaction", make_scene(obj(0, 0), obj(0, 3), links=[(0, 1)])),
    ("scene_understanding", make_scene(obj(0, 0), obj(2, 3), ground="snow")),
  ],
)
def test_every_capability_has_a_k1_question(cap, scene):
  q = compose.compose_question(scene, [cap], Rand(0))
  assert q is not None and q.capabilities == (cap,) and q.k == 1
  expected = {
    "color": "blue",
    "shape": "diamond",
    "object_recognition": "fish",
    "spatial_recognition": "bottom left",
    "counting": "3",
    "text_recognition": "x",
    "action_recognition": "down",
    "spatial_relationship": "horizontally",
    "object_interaction": "yes",
    "scene_understanding": "snow",
  }[cap]
  assert q.answer == expected, q.text


def test_composed_questions_are_exact_for_every_k():
  rng = np.random.default_rng(0)
  made = collections.Counter()
  for k in (1, 2, 3, 4, 5):
    for _ in range(30):
      scene = scene_lib.sample_scene(rng, grid_size=4, min_objects=1, max_objects=5)
      caps = compose.sample_capability_set(Rand.spawn(rng), k, used=(), weights={})
      got = compose.compose_with_distractors(scene, caps, rng, max_new_objects=4, max_objects=12)
      if got is None:
        continue
      q, s = got.question, got.scene
      made[k] += 1
      assert q.capabilities == caps and q.program.capabilities == set(caps)
      # An independent re-check on the returned scene, with another random stream.
      report = verify.verify_question(s, q.program, caps, Rand(99))
      assert report.ok, (q.text, report.failures)
      assert report.answer == q.answer and report.text == q.text
      assert len(s.objects) <= 12
      scene_lib.validate_scene(s)
  assert all(made[k] >= 3 for k in (1, 2, 3, 4, 5)), made


def test_composer_is_deterministic():
  scene = make_scene(
    obj(0, 0, "red", "circle", letter="k"),
    obj(0, 2, "blue", "circle", motion="up"),
    obj(2, 1, "red", "car"),
    obj(3, 3, "green", "square"),
  )
  caps = ("color", "shape", "spatial_recognition")
  a = compose.compose_with_distractors(scene, caps, Rand(5), max_new_objects=4, max_objects=12)
  b = compose.compose_with_distractors(scene, caps, Rand(5), max_new_objects=4, max_objects=12)
  assert a == b and a is not None


def test_plant_distractor_makes_a_constraint_necessary():
  # "What colour is the circle?" when every object is red: the shape is not needed
  # until a distractor that is not a circle, and not red, is planted.
  s = make_scene(obj(0, 0, "red", "circle"), obj(3, 3, "red", "square"))
  p = P("color", D((F("shape", "circle"),)))
  assert verify.necessity(s, p, "red")["shape"] is False
  site = Q.constraint_sites(p)[0]
  s2 = plant.plant_distractor(s, p, site, "red", Rand(0))
  assert s2 is not None and len(s2.objects) == 3
  new = [o for o in s2.objects if o not in s.objects]
  assert len(new) == 1 and new[0].kind != "circle" and new[0].color != "red"
  assert verify.verify_question(s2, p, ("color", "shape"), Rand(0)).ok


def test_plant_copies_raises_a_count():
  s = make_scene(obj(0, 0, "red", "circle"), obj(3, 3, "blue", "circle"))
  p = P("count", D((F("color", "red"), F("shape", "circle"))))
  s2 = plant.plant_copies(s, p, 2, Rand(0))
  assert Q.resolve(p, s2)[0] == "3" and len(s2.objects) == 4


def test_capability_sampling_follows_compact():
  rng = Rand(1)
  weights = {"action_recognition": 2.0}
  counts = collections.Counter()
  for _ in range(6000):
    (c,) = compose.sample_capability_set(rng, 1, used=(), weights=weights)
    counts[c] += 1
  ratio = counts["action_recognition"] / np.mean(
    [counts[c] for c in counts if c != "action_recognition"]
  )
  assert 1.8 < ratio < 2.2
  # Unused capabilities first; all ten when fewer than k remain.
  used = [c for c in caps_lib.CAPABILITIES if c not in ("color", "shape", "counting")]
  for _ in range(50):
    assert set(compose.sample_capability_set(rng, 2, used=used, weights={})) <= {
      "color",
      "shape",
      "counting",
    }
  got = compose.sample_capability_set(rng, 4, used=used, weights={})
  assert len(set(got)) == 4 and list(got) == sorted(got)
