"""The verifier's three checks against hand-built scenes with known verdicts."""

from compact_jax.world import questions as Q
from compact_jax.world import verify
from compact_jax.world.rand import Rand
from tests.world.hand_built import make_scene, obj

F, D, R, P = Q.Filter, Q.Description, Q.Relation, Q.Program
LEFT_OF_SQUARE = P("color", D((), R("left_of", D((F("shape", "square"),)))))
CAPS3 = ("color", "shape", "spatial_relationship")


def test_calibration_shortcut_is_rejected():
  # "What colour is the object to the left of the square?" where only one object
  # has anything to its right: dropping the shape leaves "the object to the left
  # of another object", whose only reading gives the same colour.
  s = make_scene(
    obj(0, 0, "red", "circle"), obj(0, 2, "blue", "square"), obj(3, 3, "green", "triangle")
  )
  report = verify.verify_question(s, LEFT_OF_SQUARE, CAPS3)
  assert report.answer == "red"
  assert not report.ok
  assert report.necessary == {"color": True, "shape": False, "spatial_relationship": True}
  assert any("shape is not necessary" in f for f in report.failures)


def test_same_question_with_a_distractor_is_exact():
  # A purple circle left of a yellow diamond: now "left of another object" has two
  # readings (red, purple), so the shape is needed.
  s = make_scene(
    obj(0, 0, "red", "circle"),
    obj(0, 2, "blue", "square"),
    obj(3, 1, "purple", "circle"),
    obj(3, 2, "yellow", "diamond"),
  )
  report = verify.verify_question(s, LEFT_OF_SQUARE, CAPS3, Rand(0))
  assert report.ok, report.failures
  assert report.answer == "red" and report.necessary == dict.fromkeys(CAPS3, True)
  assert report.text == "What colour is the object to the left of the square?"


def test_listed_capability_that_is_not_needed():
  # "How many red circles?" when every circle is red: the colour is decoration.
  s = make_scene(obj(0, 0, "red", "circle"), obj(1, 1, "red", "circle"), obj(2, 2, "red", "square"))
  p = P("count", D((F("color", "red"), F("shape", "circle"))))
  report = verify.verify_question(s, p, ("color", "counting", "shape"))
  assert not report.ok
  assert report.necessary["color"] is False and report.necessary["shape"] is True
  assert report.superfluous == ["color=red"]


def test_unlisted_capability_changes_the_answer():
  s = make_scene(
    obj(0, 0, "red", "circle"), obj(1, 2, "blue", "square"), obj(3, 1, "green", "triangle")
  )
  p = P("color", D((F("shape", "circle"),)))
  # Listed correctly: perturbing everything but colour and shape keeps "red".
  assert verify.unlisted_changes(s, p, ("color", "shape"), Rand(0)) == []
  # Shape not listed: reshuffling shapes moves "the circle" and changes the answer.
  failures = verify.unlisted_changes(s, p, ("color",), Rand(0))
  assert len(failures) == 1 and "shape" in failures[0]
  report = verify.verify_question(s, p, ("color",), Rand(0))
  assert any("unlisted capabilities ['shape']" in f for f in report.failures)


def test_position_capabilities_are_told_apart():
  s = make_scene(
    obj(0, 0, "red", "circle"), obj(0, 3, "blue", "circle"), obj(3, 0, "green", "circle")
  )
  # "the object in the top left" reads the region, not the order of objects: a
  # perturbation that keeps every pairwise order but moves objects across regions
  # changes it, so listing spatial_relationship instead is caught.
  p = P("color", D((F("region", "top left"),)))
  assert verify.unlisted_changes(s, p, ("color", "spatial_recognition"), Rand(1)) == []
  failures = verify.unlisted_changes(s, p, ("color", "spatial_relationship"), Rand(1))
  assert failures and "spatial_recognition" in failures[0]
  # The ground under an object is scene_understanding, even though it needs the cell.
  g = make_scene(
    obj(0, 0, "red", "circle"), obj(3, 3, "blue", "circle"), patch=(2, 2, 2, 2), patch_ground="sand"
  )
  on_sand = P("color", D((F("ground", "sand"),)))
  assert verify.unlisted_changes(g, on_sand, ("color", "scene_understanding"), Rand(2)) == []
  assert verify.unlisted_changes(g, on_sand, ("color",), Rand(2))


def test_answer_predictable_from_text():
  s = make_scene(obj(0, 0, "red", "circle"), obj(1, 2, "blue", "circle"))
  p = P("color", D((F("color", "red"), F("shape", "circle"))))
  report = verify.verify_question(s, p, ("color", "shape"))
  assert any("appears in the question" in f for f in report.failures)
  # "Which part of the picture is the object in the top left in?": no edit that
  # keeps the question well posed can change its answer.
  tautology = P("region", D((F("region", "top left"),)))
  assert verify.find_counterfactual(s, tautology, Rand(0)) is None
  # A real question has a counterfactual, and it keeps the question well posed.
  real = P("color", D((F("region", "top left"),)))
  edited = verify.find_counterfactual(s, real, Rand(0))
  assert edited is not None and Q.resolve(real, edited)[0] not in (None, "red")


def test_ill_posed_question():
  s = make_scene(obj(0, 0, "red", "circle"), obj(1, 2, "blue", "circle"))
  report = verify.verify_question(s, P("color", D((F("shape", "circle"),))), ("color", "shape"))
  assert report.answer is None and report.failures == [
    "not well posed: 'the circle' fits 2 objects"
  ]


def test_perturb_keeps_listed_features():
  s = make_scene(
    obj(0, 0, "red", "circle", letter="k"),
    obj(0, 3, "blue", "car", motion="up"),
    obj(2, 1, "green", "square"),
    links=[(0, 2)],
    patch=(2, 0, 2, 2),
    patch_ground="snow",
  )
  rng = Rand(3)
  keep = ("color", "spatial_relationship", "scene_understanding")
  change = [c for c in verify.FEATURES if c not in keep and c != "counting"]
  got = [verify.perturb(s, change, keep, rng) for _ in range(20)]
  got = [x for x in got if x is not None]
  assert got
  for x in got:
    for c in keep:
      assert verify.FEATURES[c](x) == verify.FEATURES[c](s)
  assert any(
    verify.FEATURES["text_recognition"](x) != verify.FEATURES["text_recognition"](s) for x in got
  )
