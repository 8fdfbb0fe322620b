"""Accuracy by compositional complexity k: tagging, per-k intervals, two-model comparison.

COMPACT's central analysis (arXiv 2504.21850; shared/reference/
data_formats_benchmarks_metrics.md §5.2) labels each benchmark question with the
capabilities of the 10-capability taxonomy it needs (k = how many) and reports
accuracy per k. Here:

- ``tag_examples`` asks a VLM (any datagen backend but the world oracle) which
  capabilities a question needs, showing it the image, through the datagen
  engine (cached, rate-limited, retried, budgeted). The tagger model and
  ``TAGGER_PROMPT_VERSION`` are recorded with every tag. The tiny world's k is
  exact and needs no tagging. A question the tagger fails on has no k and is
  counted, not bucketed.
- ``accuracy_by_k``: mean score and n per k with a 95% interval. Binary scores
  (exact match, MCQ, yes/no) get the **Wilson score interval**; fractional
  scores (VQA accuracy, ANLS, judge grades) get a seeded **percentile bootstrap**
  (``BOOTSTRAP_RESAMPLES`` resamples). ``ci_method`` says which.
- ``compare_by_k``: model A minus model B per k on the questions both answered.
  Binary: **Newcombe's hybrid score interval** for a difference of proportions
  (Newcombe 1998, method 10, built from the two Wilson intervals); it treats the
  two runs as independent samples, which is conservative (wider) when they
  answer the same questions. Fractional: a paired percentile bootstrap over
  questions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from compact_jax import capabilities as caps_lib
from compact_jax.datagen import prompts as datagen_prompts
from compact_jax.datagen import recipe as recipe_lib
from compact_jax.eval.benchmarks import core
from compact_jax.eval.benchmarks import judge as judge_lib

TAGGER_PROMPT_VERSION = "ktag-v1"
Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000

TAG_SCHEMA: dict[str, Any] = {
  "type": "object",
  "properties": {"capabilities": {"type": "array", "items": {"type": "string"}}},
  "required": ["capabilities"],
  "additionalProperties": False,
}
TAG_SYSTEM = """\
You analyse visual questions asked about an image. The atomic visual capabilities are:
{glossary}

Look at the image and the question. List every capability above that answering the question \
needs, and only those. A question that needs none of them (pure world knowledge) gets an empty \
list.

Reply with one JSON object and nothing else:
{{"capabilities": ["...", ...]}}"""
TAG_USER = "Question: {question}"


@dataclasses.dataclass(frozen=True)
class Tag:
  """Capabilities a question needs; ``k`` is None when tagging failed (``error`` says why)."""

  capabilities: tuple[str, ...] | None
  error: str = ""

  @property
  def k(self) -> int | None:
    return None if self.capabilities is None else len(self.capabilities)


def tagging_prompt(question: str) -> tuple[str, str]:
  return (
    TAG_SYSTEM.format(glossary=datagen_prompts.capability_glossary()),
    TAG_USER.format(question=question),
  )


def parse_tag(text: str) -> tuple[str, ...]:
  """Canonical capability names (sorted, deduplicated) from a tagger reply; names are
  normalised as the generator's verifier does ("Spatial Relationship" is
  spatial_relationship).

  Raises:
    recipe.MalformedResponse: not a JSON object with a list of known names.
  """
  value = recipe_lib.extract_json_object(text).get("capabilities")
  if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
    raise recipe_lib.MalformedResponse(
      "malformed_json", f"'capabilities' must be a list of strings, got {value!r}"
    )
  try:
    return caps_lib.canonical(recipe_lib.normalize_capability(c) for c in value)
  except ValueError as e:
    raise recipe_lib.MalformedResponse("unknown_capability", str(e)) from None


def tag_examples(
  examples: Sequence[core.Example], client: judge_lib.LLMClient, *, benchmark: str, reasks: int = 1
) -> dict[str, Tag]:
  """example id -> Tag; malformed replies are re-asked ``reasks`` times (past the cache)."""
  tags: dict[str, Tag] = {}
  todo = list(examples)  # a text-only question is tagged from its text alone
  for attempt in range(reasks + 1):
    calls = []
    for e in todo:
      system, user = tagging_prompt(e.question)
      calls.append(judge_lib.LLMCall(f"{benchmark}/{e.id}", e.image, system, user,
                                     kind="verification", schema=TAG_SCHEMA, attempt=attempt))  # fmt: skip
    retry = []
    for e, reply in zip(todo, client.run(calls)):
      if reply.text is None:
        tags[e.id] = Tag(None, reply.error)
        continue
      try:
        tags[e.id] = Tag(parse_tag(reply.text))
      except recipe_lib.MalformedResponse as err:
        tags[e.id] = Tag(None, f"tagger reply: {err}")
        retry.append(e)
    todo = retry
    if not todo:
      break
  return tags


def tagger_info(client: judge_lib.LLMClient) -> dict[str, Any]:
  return {"tagger": client.describe(), "prompt_version": TAGGER_PROMPT_VERSION}


# --- intervals -------------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
  """The Wilson score interval for a binomial proportion (in [0, 1])."""
  if n == 0:
    return (0.0, 1.0)
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  lo = 0.0 if successes <= 0 else max(0.0, centre - half)
  hi = 1.0 if successes >= n else min(1.0, centre + half)
  return (min(lo, p), max(hi, p))


def bootstrap_interval(
  values: Sequence[float], *, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float]:
  """The 2.5th and 97.5th percentiles of the mean over resampled ``values``."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return (0.0, 1.0)
  rng = np.random.default_rng(seed)
  means = v[rng.integers(0, v.size, (resamples, v.size))].mean(axis=1)
  return (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


def newcombe_difference(s1: float, n1: int, s2: float, n2: int) -> tuple[float, float, float]:
  """(p1 - p2, lower, upper): Newcombe's hybrid score interval (1998, method 10)."""
  p1, p2 = s1 / n1, s2 / n2
  l1, u1 = wilson_interval(s1, n1)
  l2, u2 = wilson_interval(s2, n2)
  d = p1 - p2
  return (d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
          d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))  # fmt: skip


def _is_binary(values: Sequence[float]) -> bool:
  return all(v in (0.0, 1.0) for v in values)


def _k_key(k: int | None, top: int | None) -> str | None:
  if k is None or k < 0:
    return None
  return f"{top}+" if top is not None and k >= top else str(k)


def accuracy_by_k(
  ks: Sequence[int | None], scores: Sequence[float | None], *, top: int | None = None, seed: int = 0
) -> dict[str, Any]:
  """``{"by_k": {k: {accuracy, n, lo, hi}}, "ci_method", "untagged", "unscored"}``.

  Accuracy and bounds are fractions in [0, 1]. Questions with no k (tagging failed)
  or no score (judge failed) are left out and counted. ``top`` pools k >= top.
  """
  groups: dict[str, list[float]] = {}
  untagged = unscored = 0
  for k, s in zip(ks, scores):
    key = _k_key(k, top)
    if key is None:
      untagged += 1
    elif s is None:
      unscored += 1
    else:
      groups.setdefault(key, []).append(float(s))
  every = [v for vs in groups.values() for v in vs]
  binary = _is_binary(every)
  table = {}
  for key in sorted(groups, key=lambda x: int(x.rstrip("+"))):
    v = groups[key]
    lo, hi = wilson_interval(sum(v), len(v)) if binary else bootstrap_interval(v, seed=seed)
    table[key] = {"accuracy": sum(v) / len(v), "n": len(v), "lo": lo, "hi": hi}
  return {"by_k": table, "ci_method": "wilson" if binary else "bootstrap-percentile",
          "untagged": untagged, "unscored": unscored}  # fmt: skip


def compare_by_k(
  a: Mapping[str, tuple[int | None, float | None]],
  b: Mapping[str, tuple[int | None, float | None]],
  *,
  top: int | None = None,
  seed: int = 0,
) -> dict[str, Any]:
  """Model A minus model B per k, on question ids both scored.

  Args:
    a, b: question id -> (k, score). k is taken from A; a question whose k differs
      between the runs (different taggers) is an error.

  Returns:
    ``{"by_k": {k: {a, b, difference, lo, hi, n}}, "ci_method", "only_in_one": count}``.
  """
  common = sorted(set(a) & set(b))
  pairs: dict[str, list[tuple[float, float]]] = {}
  for qid in common:
    (ka, sa), (kb, sb) = a[qid], b[qid]
    if ka is not None and kb is not None and ka != kb:
      raise ValueError(f"Question {qid!r} has k={ka} in run A but k={kb} in run B: tag both "
                       "runs' questions with the same tagger")  # fmt: skip
    key = _k_key(ka if ka is not None else kb, top)
    if key is None or sa is None or sb is None:
      continue
    pairs.setdefault(key, []).append((float(sa), float(sb)))
  every = [v for ps in pairs.values() for p in ps for v in p]
  binary = _is_binary(every)
  table = {}
  for key in sorted(pairs, key=lambda x: int(x.rstrip("+"))):
    arr = np.asarray(pairs[key], np.float64)
    n = len(arr)
    if binary:
      d, lo, hi = newcombe_difference(arr[:, 0].sum(), n, arr[:, 1].sum(), n)
    else:
      d = float(arr[:, 0].mean() - arr[:, 1].mean())
      lo, hi = bootstrap_interval(arr[:, 0] - arr[:, 1], seed=seed)
    table[key] = {"a": float(arr[:, 0].mean()), "b": float(arr[:, 1].mean()),
                  "difference": d, "lo": lo, "hi": hi, "n": n}  # fmt: skip
  return {
    "by_k": table,
    "ci_method": "newcombe-hybrid-score" if binary else "paired-bootstrap-percentile",
    "only_in_one": len(set(a) ^ set(b)),
  }


def scores_from_predictions(path: str | pathlib.Path) -> dict[str, tuple[int | None, float | None]]:
  """question id -> (k, score) from a bench_run predictions JSONL file."""
  out = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        out[str(row["id"])] = (row.get("k"), row.get("score"))
      except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: line {n + 1} is not a predictions row ({e})") from None
  return out


def compare_runs(pred_a: str | pathlib.Path, pred_b: str | pathlib.Path, **kw) -> dict[str, Any]:
  """``compare_by_k`` of two runs' predictions files for one benchmark."""
  return compare_by_k(scores_from_predictions(pred_a), scores_from_predictions(pred_b), **kw)
