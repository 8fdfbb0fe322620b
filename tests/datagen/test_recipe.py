"""The recipe's pure parts: sampling, parsing, filters, assembly, ids."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from compact_jax import capabilities as caps_lib
from compact_jax.data import records as records_lib
from compact_jax.datagen import prompts, recipe
from tests.datagen import helpers


def settings(**kw) -> recipe.RecipeSettings:
  c = helpers.make_config("world")
  for key, value in kw.items():
    setattr(c.datagen, key, value)
  return recipe.RecipeSettings.from_config(c)


def test_plans_are_a_function_of_seed_and_image_only():
  s = settings()
  draws = []
  for _ in range(2):
    plan = recipe.plan_image(s, "coco/1.jpg")
    draws.append((plan.k, plan.target, [plan.next_capabilities({}) for _ in range(3)]))
  assert draws[0] == draws[1]
  others = {
    (p.k, p.target, p.next_capabilities({}))
    for p in (recipe.plan_image(s, f"coco/{i}.jpg") for i in range(20))
  }
  assert len(others) > 10  # different images draw differently
  s2 = recipe.RecipeSettings(**{**s.__dict__, "seed": 1})
  other_seed = [recipe.plan_image(s2, f"coco/{i}.jpg").next_capabilities({}) for i in range(20)]
  same_seed = [recipe.plan_image(s, f"coco/{i}.jpg").next_capabilities({}) for i in range(20)]
  assert other_seed != same_seed


def test_k_values_are_uniform_and_question_counts_in_range():
  s = settings(k_values=(1, 2, 3), questions_per_image=(2, 3))
  plans = [recipe.plan_image(s, f"img{i}.png") for i in range(3000)]
  ks = collections.Counter(p.k for p in plans)
  assert set(ks) == {1, 2, 3} and all(abs(n / 3000 - 1 / 3) < 0.04 for n in ks.values())
  assert {p.target for p in plans} == {2, 3}


def test_capability_weights_match_successive_sampling_probabilities():
  weights = {"action_recognition": 2.0}
  rng = np.random.default_rng(0)
  n = 20000
  k1 = collections.Counter(recipe.sample_capabilities(rng, 1, used=(), weights=weights)[0]
                           for _ in range(n))  # fmt: skip
  # Hand-computed: total weight 11, action has 2.
  assert abs(k1["action_recognition"] / n - 2 / 11) < 0.01
  assert abs(k1["color"] / n - 1 / 11) < 0.008
  # k=2: P(action in set) = 2/11 + sum over the 9 others of (1/11) * (2/10) = 2/11 + 18/110.
  k2 = sum("action_recognition" in recipe.sample_capabilities(rng, 2, used=(), weights=weights)
           for _ in range(n))  # fmt: skip
  assert abs(k2 / n - (2 / 11 + 18 / 110)) < 0.012


def test_sampling_prefers_unused_capabilities_then_falls_back_to_all():
  rng = np.random.default_rng(1)
  used = set(caps_lib.CAPABILITIES[:7])
  for _ in range(50):
    caps = recipe.sample_capabilities(rng, 3, used=used, weights={})
    assert set(caps) == set(caps_lib.CAPABILITIES[7:])
  # Only 3 left, k=4: draw from all ten.
  seen = set()
  for _ in range(50):
    caps = recipe.sample_capabilities(rng, 4, used=used, weights={})
    assert len(set(caps)) == 4 and list(caps) == sorted(caps)
    seen.update(caps)
  assert seen & used


def test_no_capability_combination_repeats_within_an_image():
  s = settings(k_values=(1,))
  plan = recipe.plan_image(s, "x.png")
  sets = [plan.next_capabilities({}) for _ in range(10)]
  assert len(set(sets)) == 10  # all ten singletons, none twice
  assert plan.next_capabilities({}) is None  # nothing left


@pytest.mark.parametrize(
  "text",
  [
    '{"question": "Q?", "answer": "red", "capabilities": ["color"]}',
    'Sure.\n```json\n{"question": "Q?", "answer": "red", "capabilities": ["color"]}\n```',
    'Here it is: {"question": "Q?", "answer": "red", "capabilities": ["Color"]} hope it helps',
  ],
)
def test_generation_replies_parse_bare_fenced_or_after_prose(text):
  assert recipe.parse_generation(text) == recipe.GeneratedQA("Q?", "red", ("color",))


@pytest.mark.parametrize(
  ("text", "reason"),
  [
    ('{"question": "Q?", "answer": "re', "malformed_json"),
    ("no json here", "malformed_json"),
    ("", "malformed_json"),
    ('{"question": "Q?", "answer": "red", "capabilities": "color"}', "malformed_json"),
    (
      '{"question": "Q?", "answer": "red", "capabilities": ["colour_theory"]}',
      "unknown_capability",
    ),
  ],
)
def test_bad_generation_replies_are_rejections_not_crashes(text, reason):
  with pytest.raises(recipe.MalformedResponse) as e:
    recipe.parse_generation(text)
  assert e.value.reason == reason


def test_verification_reply_needs_a_boolean_verdict():
  v = recipe.parse_verification(
    '{"capabilities": ["counting"], "answer_correct": false, "reason": "x"}'
  )
  assert v == recipe.Verdict(("counting",), False, "x")
  with pytest.raises(recipe.MalformedResponse):
    recipe.parse_verification('{"capabilities": ["counting"], "answer_correct": "yes"}')


def test_filters():
  s = settings()
  qa = lambda q, a, caps=("color",): recipe.GeneratedQA(q, a, caps)  # noqa: E731
  assert recipe.screen(qa("What colour is the bus?", "red"), ("color",), [], s) is None
  assert recipe.screen(qa("What colour is the bus?", "Not visible"), ("color",), [], s) == (
    "uninformative_answer"
  )
  assert recipe.screen(qa("What colour is the bus?", "N/A"), ("color",), [], s) == (
    "uninformative_answer"
  )
  assert recipe.screen(qa("Is the red bus red?", "red"), ("color",), [], s) == "answer_in_question"
  assert recipe.screen(qa("What colour? What shape?", "red"), ("color",), [], s) == (
    "compound_question"
  )
  kept = ["What colour is the big bus on the left?"]
  assert recipe.screen(
    qa("What colour is the big bus on the right?", "red"), ("color",), kept, s
  ) == ("near_duplicate")
  assert recipe.screen(qa("How many dogs sit here?", "2"), ("color",), kept, s) is None
  mismatch = qa("What colour is the bus?", "red", ("color", "counting"))
  assert recipe.screen(mismatch, ("color",), [], s) == "generation_capability_mismatch"
  loose = settings(capability_match="size")
  assert recipe.screen(qa("What shape is it?", "round", ("shape",)), ("color",), [], loose) is None


def test_word_overlap_is_compacts_measure():
  # {a, b, c} vs {b, c, d, e}: 2 shared / min(3, 4).
  assert recipe.word_overlap("a b c", "b c d e") == pytest.approx(2 / 3)


def test_verification_rule():
  s = settings()
  ok = recipe.Verdict(("color", "counting"), True, "")
  assert recipe.judge(ok, ("color", "counting"), s) is None
  assert recipe.judge(recipe.Verdict(("color",), True, ""), ("color", "counting"), s) == (
    "verification_capability_mismatch"
  )
  assert recipe.judge(
    recipe.Verdict(("color", "counting"), False, ""), ("color", "counting"), s
  ) == ("answer_wrong")
  size = settings(capability_match="size")
  assert (
    recipe.judge(recipe.Verdict(("shape", "counting"), True, ""), ("color", "counting"), size)
    is None
  )


def _qa(q, a, caps):
  return recipe.AcceptedQA(q, a, caps, {"response_id": "g", "hash": "h"},
                           {"response_id": "v", "hash": "h2"}, "fine")  # fmt: skip


def test_assembled_record_has_compacts_shape_and_validates():
  s = settings()
  qas = [
    _qa("How many cups?", "3", ("counting",)),
    _qa("What colour is the cup?", "red", ("color",)),
  ]
  rec = recipe.assemble_record(s, "coco/train2017/1.jpg", 1, qas, backend="gemini",
                               model="m", prompt_version=prompts.PROMPT_VERSION)  # fmt: skip
  records_lib.validate_record(rec, where="test")
  assert rec["image"] == "coco/train2017/1.jpg" and rec["k"] == 1 and rec["source"] == "compact"
  turns = rec["conversations"]
  assert turns[0]["value"] == (
    "<image>\nHow many cups?\nAnswer the question using a single word or phrase."
  )
  assert turns[2]["value"] == "What colour is the cup?"
  assert turns[0]["capability"] == ["counting"] and turns[2]["capability"] == ["color"]
  assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
  assert rec["generator"]["backend"] == "gemini"
  assert rec["generator"]["questions"][1]["verification"]["response_id"] == "v"


def test_ids_are_deterministic_and_unique_across_images_k_and_runs():
  s = settings()
  make = lambda img, k, s=s, model="m": recipe.record_id(s, img, k, backend="b", model=model)  # noqa: E731
  assert make("a.jpg", 1) == make("a.jpg", 1)
  s_other = recipe.RecipeSettings(**{**s.__dict__, "seed": 5})
  ids = [make(img, k) for img, k in itertools.product(["a.jpg", "b.jpg"], [1, 2, 3])]
  ids += [make("a.jpg", 1, s_other), make("a.jpg", 1, model="other")]
  assert len(set(ids)) == len(ids)
  assert make("a.jpg", 2).startswith("compact_k2_")


def test_prompts_define_every_capability_and_ask_for_the_set():
  system, user = prompts.generation_prompt(["counting", "color"])
  for c in caps_lib.CAPABILITIES:
    assert f"- {c}: {caps_lib.DEFINITIONS[c]}" in system
  assert "EXACTLY these 2 capabilities: color, counting." in user
  _, vuser = prompts.verification_prompt("How many?", "3")
  assert "How many?" in vuser and "3" in vuser


def test_bad_recipe_settings_fail_clearly():
  with pytest.raises(ValueError, match="capability_match"):
    settings(capability_match="fuzzy")
  with pytest.raises(ValueError, match="Unknown capability"):
    settings(capability_weights={"colour": 2.0})
  with pytest.raises(ValueError, match="k_values"):
    settings(k_values=(0,))


def test_sample_capabilities_draws_like_numpy_weighted_choice():
  """The cached-cdf draw must pick what ``Generator.choice(n, p=w / w.sum())`` picks, and
  leave the generator in the same state (records depend on it byte for byte)."""

  def reference(rng, k, used, weights):
    pool = [c for c in caps_lib.CAPABILITIES if c not in set(used)]
    if len(pool) < k:
      pool = list(caps_lib.CAPABILITIES)
    chosen = []
    for _ in range(k):
      w = np.array([weights.get(c, 1.0) for c in pool], dtype=np.float64)
      chosen.append(pool.pop(int(rng.choice(len(pool), p=w / w.sum()))))
    return caps_lib.canonical(chosen)

  meta = np.random.default_rng(1)
  for _ in range(300):
    names = [c for c in caps_lib.CAPABILITIES if meta.random() < 0.6]
    weights = {c: float(meta.choice([meta.random() * 10, 2.0, 1e-3, 3.7e5])) for c in names}
    seed = int(meta.integers(1 << 40))
    r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
    for _ in range(4):
      k = int(meta.integers(1, 6))
      used = list(meta.choice(caps_lib.CAPABILITIES, int(meta.integers(0, 10)), replace=False))
      want = reference(r1, k, used, weights)
      assert recipe.sample_capabilities(r2, k, used=used, weights=weights) == want
    assert r1.random() == r2.random()
