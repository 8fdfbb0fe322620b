"""k-stratified analysis: intervals and tables on hand-computed examples; tagging via a loopback server."""

from __future__ import annotations

import json
import math

import pytest

from compact_jax.eval import kstrat
from compact_jax.eval.benchmarks import core, judge
from tests.eval.test_benchmarks import BLUE, KEY_ENV, RED, JudgeServer, llm_test_config


def test_wilson_interval_hand_computed():
  # p = 0.5, n = 10, z = 1.96: centre 0.5, half = 1.96 * sqrt(0.025 + 0.00960) / 1.38416.
  lo, hi = kstrat.wilson_interval(5, 10)
  half = kstrat.Z95 * math.sqrt(0.25 / 10 + kstrat.Z95**2 / 400) / (1 + kstrat.Z95**2 / 10)
  assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half))
  assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # published value for 5/10
  lo, hi = kstrat.wilson_interval(0, 4)
  assert lo == 0.0 and hi == pytest.approx(kstrat.Z95**2 / (4 + kstrat.Z95**2))  # 3.8416/7.8416


def test_accuracy_by_k_hand_computed():
  ks = [1, 1, 1, 1, 2, 2, None, 5, 6, 2]
  scores = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, None]
  got = kstrat.accuracy_by_k(ks, scores, top=5)
  assert got["ci_method"] == "wilson" and got["untagged"] == 1 and got["unscored"] == 1
  assert list(got["by_k"]) == ["1", "2", "5+"]
  assert got["by_k"]["1"]["accuracy"] == 0.75 and got["by_k"]["1"]["n"] == 4
  assert (got["by_k"]["1"]["lo"], got["by_k"]["1"]["hi"]) == pytest.approx(
    kstrat.wilson_interval(3, 4)
  )
  assert got["by_k"]["5+"] == {
    "accuracy": 0.5,
    "n": 2,
    **dict(zip(("lo", "hi"), kstrat.wilson_interval(1, 2))),
  }
  frac = kstrat.accuracy_by_k([1, 1, 1, 1], [0.2, 0.4, 0.6, 0.8])
  assert frac["ci_method"] == "bootstrap-percentile" and frac["by_k"]["1"][
    "accuracy"
  ] == pytest.approx(0.5)
  assert 0.2 <= frac["by_k"]["1"]["lo"] < 0.5 < frac["by_k"]["1"]["hi"] <= 0.8
  assert kstrat.accuracy_by_k([1] * 4, [0.2, 0.4, 0.6, 0.8]) == frac  # seeded


def test_two_model_comparison_by_k_hand_computed():
  a = {
    "q1": (1, 1.0),
    "q2": (1, 1.0),
    "q3": (1, 0.0),
    "q4": (4, 1.0),
    "q5": (4, 1.0),
    "q6": (2, 1.0),
  }
  b = {
    "q1": (1, 1.0),
    "q2": (1, 0.0),
    "q3": (1, 0.0),
    "q4": (4, 0.0),
    "q5": (4, 1.0),
    "q7": (2, 1.0),
  }
  got = kstrat.compare_by_k(a, b)
  assert got["ci_method"] == "newcombe-hybrid-score" and got["only_in_one"] == 2
  k1 = got["by_k"]["1"]
  assert (k1["a"], k1["b"], k1["n"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3), 3)
  l1, u1 = kstrat.wilson_interval(2, 3)
  l2, u2 = kstrat.wilson_interval(1, 3)
  d = 1 / 3
  assert k1["difference"] == pytest.approx(d)
  assert k1["lo"] == pytest.approx(d - math.sqrt((2 / 3 - l1) ** 2 + (u2 - 1 / 3) ** 2))
  assert k1["hi"] == pytest.approx(d + math.sqrt((u1 - 2 / 3) ** 2 + (1 / 3 - l2) ** 2))
  assert got["by_k"]["4"]["difference"] == pytest.approx(0.5) and "2" not in got["by_k"]
  with pytest.raises(ValueError, match="k=1 in run A but k=2 in run B"):
    kstrat.compare_by_k({"q": (1, 1.0)}, {"q": (2, 1.0)})


def test_compare_runs_reads_prediction_files(tmp_path):
  for name, scores in (("a", [1.0, 1.0, 0.5]), ("b", [0.0, 1.0, 0.5])):
    rows = [{"id": f"q{i}", "k": 1 + i // 2, "score": s} for i, s in enumerate(scores)]
    (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  got = kstrat.compare_runs(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
  assert got["ci_method"] == "paired-bootstrap-percentile"
  assert (
    got["by_k"]["1"]["difference"] == pytest.approx(0.5) and got["by_k"]["2"]["difference"] == 0.0
  )


def test_tagging_through_the_engine_with_malformed_and_failed_replies(tmp_path, monkeypatch):
  monkeypatch.setenv(KEY_ENV, "sk-tag-test")
  exs = [
    core.Example("a", "What color and shape?", "p", RED, "x"),
    core.Example("b", "How many? counting color", "p", BLUE, "x"),
    core.Example("c", "GARBAGE question", "p", RED, "x"),
    core.Example("d", "Which place?", "p", BLUE, "x"),
    core.Example("e", "Text only", "p", None, "x"),
  ]
  with JudgeServer() as srv:
    client = judge.LLMClient(llm_test_config(srv.url, structured=True), tmp_path / "c.sqlite")
    tags = kstrat.tag_examples(exs, client, benchmark="mmstar", reasks=1)
    n = len(srv.requests)
    assert kstrat.tag_examples(exs, client, benchmark="mmstar", reasks=0) == {
      **tags,
      "c": tags["c"],
    }  # every reply cached: no new request
    assert len(srv.requests) == n
  assert tags["a"].capabilities == ("color", "shape") and tags["a"].k == 2
  assert tags["b"].k == 2 and tags["d"].k == 0
  assert tags["c"].k is None and "malformed_json" in tags["c"].error
  # A text-only question is tagged from its text: the request carries no image.
  assert tags["e"].k == 0 and tags["e"].error == ""
  assert [r["image_sha"] is None for r in srv.requests if "Text only" in r["user"]] == [True]
  assert n == 5 + 1  # five questions, one re-ask of the malformed reply
  assert kstrat.tagger_info(client)["prompt_version"] == kstrat.TAGGER_PROMPT_VERSION
