"""Answer normalisation and the by-k / by-capability tables."""

from compact_jax.eval import metrics as metrics_lib


def test_normalize_answer():
  assert metrics_lib.normalize_answer("The RED circle.") == "red circle"
  assert metrics_lib.normalize_answer(" Three ") == "3"
  assert metrics_lib.normalize_answer("3.") == "3"
  assert metrics_lib.exact_match("Top left", "top-left")
  assert not metrics_lib.exact_match("red", "reddish")


def _q(k, caps, heldout=False, qtype="t"):
  return metrics_lib.Question("r", 0, "q", "a", tuple(caps), k, qtype, heldout)


def test_accuracy_table_hand_computed():
  qs = [
    _q(1, ["color"]),
    _q(1, ["counting"]),
    _q(2, ["color", "shape"]),
    _q(2, ["color", "counting"], True),
  ]
  table = metrics_lib.accuracy_table(qs, [True, False, True, False])
  assert table["by_k"] == {"1": {"accuracy": 0.5, "n": 2}, "2": {"accuracy": 0.5, "n": 2}}
  assert table["by_capability"]["color"] == {"accuracy": 2 / 3, "n": 3}
  assert table["by_capability"]["shape"] == {"accuracy": 1.0, "n": 1}
  assert table["by_capability_k1"] == {
    "color": {"accuracy": 1.0, "n": 1},
    "counting": {"accuracy": 0.0, "n": 1},
  }
  assert table["heldout"] == {
    "heldout": {"accuracy": 0.0, "n": 1},
    "seen": {"accuracy": 2 / 3, "n": 3},
  }
  assert table["overall"]["all"] == {"accuracy": 0.5, "n": 4}


def test_majority_answers_per_type_with_deterministic_ties():
  pairs = [("color", "Red"), ("color", "red"), ("color", "blue"), ("count", "2"), ("count", "1")]
  assert metrics_lib.majority_answers(pairs) == {"color": "red", "count": "1"}


def test_majority_baseline_falls_back_to_the_query_family():
  base = metrics_lib.MajorityBaseline.fit(
    [("count(color)", "2"), ("count(color)", "2"), ("count(shape)", "3"), ("color(shape)", "red")]
  )
  assert base.predict("count(color)") == "2"
  assert base.predict("count(color,shape,region)") == "2"  # unseen type, same query
  assert base.predict("scene") == "2"  # unseen family: the overall majority
