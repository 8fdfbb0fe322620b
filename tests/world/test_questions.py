"""Program semantics, English and JSON on hand-built scenes."""

import pytest

from compact_jax.world import questions as Q
from tests.world.hand_built import make_scene, obj

F, D, R, P = Q.Filter, Q.Description, Q.Relation, Q.Program


def scene_a():
  #     col0           col1          col2             col3
  # r0  red circle                   blue square(k)
  # r1                 red square                     green car (moving left)
  # r3  red circle(e)                                 blue car
  return make_scene(
    obj(0, 0, "red", "circle"),
    obj(0, 2, "blue", "square", letter="k"),
    obj(1, 1, "red", "square"),
    obj(1, 3, "green", "car", motion="left"),
    obj(3, 0, "red", "circle", letter="e"),
    obj(3, 3, "blue", "car"),
    links=[(1, 3)],  # blue square tied to green car (indices after sorting)
    ground="grass",
    patch=(2, 0, 2, 4),
    patch_ground="sand",
  )


def test_attribute_queries_resolve_to_one_object():
  s = scene_a()
  assert Q.resolve(P("color", D((F("object", "car"), F("motion", Q.ANY)))), s) == ("green", "")
  assert Q.resolve(P("shape", D((F("color", "blue"), F("region", "top right")))), s)[0] == "square"
  assert Q.resolve(P("letter", D((F("letter", Q.ANY), F("ground", "sand")))), s)[0] == "e"
  assert Q.resolve(P("ground", D((F("color", "blue"), F("object", "car")))), s)[0] == "sand"
  answer, why = Q.resolve(P("color", D((F("shape", "circle"),))), s)
  assert answer is None and "fits 2 objects" in why
  # A shape query about a sprite has no answer.
  assert Q.resolve(P("shape", D((F("motion", Q.ANY),))), s)[0] is None


def test_relations_read_along_rows_and_columns():
  s = scene_a()
  # Left of the blue square: only the red circle in row 0 (the red square is in row 1).
  left = D((), R("left_of", D((F("color", "blue"), F("shape", "square")))))
  assert Q.matches(left, s) == {0}
  # Above the blue car (column 3): the green car.
  above = D((), R("above", D((F("color", "blue"), F("object", "car")))))
  assert Q.resolve(P("object", above), s)[0] == "car"
  assert Q.resolve(P("color", above), s)[0] == "green"
  tied = D((), R("tied_to", D((F("object", "car"), F("motion", Q.ANY)))))
  assert Q.resolve(P("shape", tied), s)[0] == "square"
  # "another object": any anchor will do, no uniqueness needed.
  assert Q.matches(D((), R("below", D())), s) == {4, 5}
  assert Q.resolve(P("count", D((), R("left_of", D()))), s)[0] == "3"


def test_count_and_pair_queries():
  s = scene_a()
  assert Q.resolve(P("count", D((F("color", "red"),))), s)[0] == "3"
  assert Q.resolve(P("count", D((F("color", "red"), F("shape", "circle")))), s)[0] == "2"
  rel = P("relation", D((F("object", "car"), F("color", "blue"))), D((F("motion", Q.ANY),)))
  assert Q.resolve(rel, s)[0] == "below"
  tied = P("tied", D((F("letter", "k"),)), D((F("color", "green"),)))
  assert Q.resolve(tied, s)[0] == "yes"
  untied = P("tied", D((F("letter", "e"),)), D((F("color", "green"),)))
  assert Q.resolve(untied, s)[0] == "no"
  assert Q.resolve(P("any_tied"), s)[0] == "yes"
  assert Q.resolve(P("place"), s)[0] is None  # two grounds: no single place
  two = make_scene(obj(0, 1), obj(3, 1, "blue"))
  assert Q.resolve(P("arrangement"), two)[0] == "vertically"


def test_answer_set_gives_all_readings():
  s = scene_a()
  assert Q.answer_set(P("color", D((F("shape", "circle"),))), s) == {"red"}
  assert Q.answer_set(P("color", D((F("shape", "square"),))), s) == {"red", "blue"}
  assert Q.answer_set(P("letter", D((F("color", "red"),))), s) == {"e", Q.UNDEFINED}


def test_capabilities_and_drops():
  p = P(
    "color",
    D((F("shape", "circle"),), R("left_of", D((F("letter", "k"), F("region", "top right"))))),
  )
  assert p.capabilities == {
    "color",
    "shape",
    "spatial_relationship",
    "text_recognition",
    "spatial_recognition",
  }
  assert Q.without_capability(p, "spatial_relationship") == P("color", D((F("shape", "circle"),)))
  assert Q.without_capability(p, "text_recognition").subject.relation.anchor.filters == (
    F("region", "top right"),
  )
  # Constraints in order: shape, left_of(...), letter, region.
  sites = Q.constraint_sites(p)
  assert [(x.root, x.depth) for x in sites] == [(0, 0), (0, 0), (0, 1), (0, 1)]
  assert Q.without_constraint(p, 2).subject.relation.anchor.filters == (F("region", "top right"),)
  assert Q.without_constraint(p, 1) == P("color", D((F("shape", "circle"),)))


def test_english_and_qtype():
  p = P(
    "color",
    D(
      (F("motion", "left"), F("shape", "circle")),
      R("left_of", D((F("color", "red"), F("object", "car")))),
    ),
  )
  assert Q.question_text(p) == "What colour is the circle moving left to the left of the red car?"
  assert Q.qtype(p) == "color(motion,shape,rel(color,object))"
  count = P("count", D((F("color", "blue"), F("object", "person")), R("tied_to", D())))
  assert Q.question_text(count) == "How many blue people tied to another object are there?"
  assert Q.question_text(P("letter", D((F("letter", Q.ANY),)))) == (
    "What letter is written in the picture?"
  )
  assert Q.question_text(P("motion", D((F("motion", Q.ANY), F("color", "red"))))) == (
    "Which way is the moving red object going?"
  )


def test_program_json_round_trip():
  p = P(
    "relation",
    D((F("color", "red"),), R("tied_to", D((F("letter", "k"),)))),
    D((F("ground", "sand"),)),
  )
  assert P.from_json(p.to_json()) == p


def test_program_arity_is_checked():
  with pytest.raises(ValueError, match="takes 2 description"):
    P("relation", D())
  with pytest.raises(ValueError, match="unknown query"):
    P("size", D())
  with pytest.raises(ValueError, match="unknown filter"):
    F("size", "big")
