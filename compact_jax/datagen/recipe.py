"""COMPACT's recipe, made explicit: sampling, response parsing, filters, assembly.

Everything here is pure (no I/O, no network), so that the world oracle and the
real backends share it and tests can pin it down. Paper: COMPACT, arXiv
2504.21850; the released generator's behaviour is summarised in
shared/reference/data_formats_benchmarks_metrics.md §1.2.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from compact_jax import capabilities as caps_lib

# COMPACT's list (generator.py there), plus a few spellings models use.
UNINFORMATIVE_ANSWERS = frozenset(
  {
    "none",
    "unknown",
    "not visible",
    "not applicable",
    "n/a",
    "na",
    "unavailable",
    "unclear",
    "cannot tell",
    "can't tell",
    "cannot be determined",
    "not sure",
    "nothing",
    "no answer",
    "",
  }
)
MATCH_MODES = ("exact", "size")
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


class MalformedResponse(ValueError):
  """A model reply that is not the JSON object asked for; ``reason`` is a rejection key."""

  def __init__(self, reason: str, detail: str):
    self.reason = reason
    super().__init__(f"{reason}: {detail}")


@dataclasses.dataclass(frozen=True)
class RecipeSettings:
  """The ``config.datagen`` keys of the recipe, validated."""

  seed: int
  k_values: tuple[int, ...]
  questions_per_image: tuple[int, int]
  min_questions: int
  capability_weights: dict[str, float]
  attempts_per_question: int
  max_capability_sets: int
  duplicate_overlap: float
  capability_match: str
  answer_suffix: str
  id_prefix: str
  source: str

  def __post_init__(self):
    if not self.k_values or any(not 1 <= k <= len(caps_lib.CAPABILITIES) for k in self.k_values):
      raise ValueError(f"config.datagen.k_values must be in 1..10, got {self.k_values}")
    lo, hi = self.questions_per_image
    if not 1 <= lo <= hi:
      raise ValueError("config.datagen.questions_per_image must be (lo, hi) with 1 <= lo <= hi")
    if not 1 <= self.min_questions <= hi:
      raise ValueError(f"config.datagen.min_questions must be in 1..{hi}, got {self.min_questions}")
    caps_lib.canonical(self.capability_weights, where="config.datagen.capability_weights")
    if any(w <= 0 for w in self.capability_weights.values()):
      raise ValueError(
        f"config.datagen.capability_weights must be positive, got {self.capability_weights}"
      )
    if self.capability_match not in MATCH_MODES:
      raise ValueError(
        f"config.datagen.capability_match must be one of {MATCH_MODES}, got "
        f"{self.capability_match!r}"
      )
    if not 0 < self.duplicate_overlap <= 1:
      raise ValueError("config.datagen.duplicate_overlap must be in (0, 1]")
    if self.attempts_per_question < 1 or self.max_capability_sets < 1:
      raise ValueError("config.datagen.attempts_per_question and max_capability_sets must be >= 1")

  @classmethod
  def from_config(cls, config) -> RecipeSettings:
    d = config.datagen
    return cls(
      seed=int(config.seed),
      k_values=tuple(int(k) for k in d.k_values),
      questions_per_image=tuple(int(v) for v in d.questions_per_image),
      min_questions=int(d.min_questions),
      capability_weights={str(k): float(v) for k, v in dict(d.capability_weights).items()},
      attempts_per_question=int(d.attempts_per_question),
      max_capability_sets=int(d.max_capability_sets),
      duplicate_overlap=float(d.duplicate_overlap),
      capability_match=str(d.capability_match),
      answer_suffix=str(d.answer_suffix),
      id_prefix=str(d.id_prefix),
      source=str(d.source),
    )


# --- sampling --------------------------------------------------------------------


def image_rng(seed: int, image_rel: str) -> np.random.Generator:
  """The generator of one image's draws: a function of the seed and the image path only,
  so results do not depend on concurrency, sharding or what ran before."""
  digest = hashlib.sha256(image_rel.encode("utf-8")).digest()
  return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def sample_capabilities(
  rng: np.random.Generator, k: int, *, used: Iterable[str], weights: Mapping[str, float]
) -> tuple[str, ...]:
  """k distinct capabilities drawn one at a time with probability proportional to weight,
  from those not in ``used``, or from all ten when fewer than k remain (COMPACT)."""
  used = set(used)
  pool = [c for c in caps_lib.CAPABILITIES if c not in used]
  if len(pool) < k:
    pool = list(caps_lib.CAPABILITIES)
  chosen = []
  for _ in range(k):
    cdf = _choice_cdf(tuple(float(weights.get(c, 1.0)) for c in pool))
    # = int(rng.choice(len(pool), p=w / w.sum())), draw for draw: numpy's weighted choice is
    # one `random()` searched in this cdf; its argument checks cost ~100 us a call.
    chosen.append(pool.pop(bisect.bisect_right(cdf, rng.random())))
  return caps_lib.canonical(chosen)


@functools.lru_cache(maxsize=4096)
def _choice_cdf(weights: tuple[float, ...]) -> tuple[float, ...]:
  """The cdf `numpy.random.Generator.choice` searches for ``p = w / w.sum()``, computed with
  the same array operations (so with the same rounding)."""
  w = np.array(weights, dtype=np.float64)
  if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
    raise ValueError(f"capability weights must be finite, >= 0 and not all 0, got {weights}")
  cdf = (w / w.sum()).cumsum()
  cdf /= cdf[-1]
  return tuple(cdf.tolist())


@dataclasses.dataclass
class ImagePlan:
  """One image's draws: its k and how many questions to keep; capability sets are drawn
  lazily (`next_capabilities`), since a set whose questions all fail is replaced."""

  k: int
  target: int
  rng: np.random.Generator
  used: set[str] = dataclasses.field(default_factory=set)
  combos: set[tuple[str, ...]] = dataclasses.field(default_factory=set)

  def next_capabilities(self, weights: Mapping[str, float]) -> tuple[str, ...] | None:
    """A capability set not drawn before for this image, or None if none is left."""
    for _ in range(64):
      caps = sample_capabilities(self.rng, self.k, used=self.used, weights=weights)
      if caps not in self.combos:
        self.combos.add(caps)
        self.used.update(caps)
        return caps
      self.used = set()  # every unused set has been tried; draw from all ten again
    return None


def plan_image(s: RecipeSettings, image_rel: str) -> ImagePlan:
  rng = image_rng(s.seed, image_rel)
  k = int(rng.choice(s.k_values))
  lo, hi = s.questions_per_image
  return ImagePlan(k=k, target=int(rng.integers(lo, hi + 1)), rng=rng)


# --- parsing ---------------------------------------------------------------------


def extract_json_object(text: str) -> dict[str, Any]:
  """The first JSON object in a reply: bare, inside a ``` fence, or after leading prose.

  Raises:
    MalformedResponse: reason ``malformed_json`` when no complete object is found.
  """
  if not isinstance(text, str) or not text.strip():
    raise MalformedResponse("malformed_json", "empty reply")
  candidates = [text.strip(), *(m.group(1).strip() for m in _FENCE.finditer(text))]
  decoder = json.JSONDecoder()
  for cand in candidates:
    for start in (i for i, ch in enumerate(cand) if ch == "{"):
      try:
        obj, _ = decoder.raw_decode(cand, start)
      except json.JSONDecodeError:
        continue
      if isinstance(obj, dict):
        return obj
  snippet = text.strip().replace("\n", " ")[:80]
  raise MalformedResponse("malformed_json", f"no JSON object in reply {snippet!r}")


def normalize_capability(name: str) -> str:
  return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _capability_list(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
  """Known names, sorted; MalformedResponse on a wrong type or an unknown name."""
  value = obj.get(key)
  if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
    raise MalformedResponse("malformed_json", f"{key!r} must be a list of strings, got {value!r}")
  names = sorted({normalize_capability(c) for c in value})
  unknown = [c for c in names if c not in caps_lib.DEFINITIONS]
  if unknown:
    raise MalformedResponse("unknown_capability", f"unknown capability names {unknown}")
  return tuple(names)


@dataclasses.dataclass(frozen=True)
class GeneratedQA:
  question: str
  answer: str
  capabilities: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Verdict:
  capabilities: tuple[str, ...]
  answer_correct: bool
  reason: str


def parse_generation(text: str) -> GeneratedQA:
  """A generation reply as (question, answer, claimed capabilities)."""
  obj = extract_json_object(text)
  q, a = obj.get("question"), obj.get("answer")
  if not isinstance(q, str) or not isinstance(a, str | int | float) or isinstance(a, bool):
    raise MalformedResponse("malformed_json", "'question' and 'answer' must be strings")
  return GeneratedQA(
    " ".join(q.split()), " ".join(str(a).split()), _capability_list(obj, "capabilities")
  )


def parse_verification(text: str) -> Verdict:
  obj = extract_json_object(text)
  ok = obj.get("answer_correct")
  if not isinstance(ok, bool):
    raise MalformedResponse("malformed_json", f"'answer_correct' must be true/false, got {ok!r}")
  reason = obj.get("reason", "")
  return Verdict(_capability_list(obj, "capabilities"), ok, str(reason)[:500])


# --- filters ---------------------------------------------------------------------


def words(text: str) -> list[str]:
  return _WORD.findall(text.lower())


def is_uninformative(answer: str) -> bool:
  return " ".join(words(answer)) in UNINFORMATIVE_ANSWERS or answer.strip().lower() in (
    UNINFORMATIVE_ANSWERS
  )


def answer_in_question(question: str, answer: str) -> bool:
  """Whether the answer's words occur, in order and adjacent, in the question."""
  q, a = words(question), words(answer)
  if not a:
    return False
  return any(q[i : i + len(a)] == a for i in range(len(q) - len(a) + 1))


def word_overlap(a: str, b: str) -> float:
  """|shared words| / |smaller word set| (COMPACT's near-duplicate measure)."""
  wa, wb = set(words(a)), set(words(b))
  if not wa or not wb:
    return 0.0
  return len(wa & wb) / min(len(wa), len(wb))


def capabilities_match(requested: Sequence[str], got: Sequence[str], mode: str) -> bool:
  if mode == "exact":
    return tuple(sorted(requested)) == tuple(sorted(got))
  if mode == "size":
    return len(set(requested)) == len(set(got))
  raise ValueError(f"unknown capability match mode {mode!r}; choose from {MATCH_MODES}")


def screen(
  qa: GeneratedQA, requested: Sequence[str], kept: Sequence[str], s: RecipeSettings
) -> str | None:
  """The first filter a generated QA fails, as a rejection reason, or None if it passes.

  Args:
    qa: the parsed generation.
    requested: the capability set asked for.
    kept: questions already kept for this image.
    s: the recipe settings (duplicate threshold, capability match mode).
  """
  if not qa.question or not qa.question.strip("?. "):
    return "no_question"
  if qa.question.count("?") > 1:
    return "compound_question"
  if is_uninformative(qa.answer):
    return "uninformative_answer"
  if answer_in_question(qa.question, qa.answer):
    return "answer_in_question"
  if any(word_overlap(qa.question, q) > s.duplicate_overlap for q in kept):
    return "near_duplicate"
  if not capabilities_match(requested, qa.capabilities, s.capability_match):
    return "generation_capability_mismatch"
  return None


def judge(verdict: Verdict, requested: Sequence[str], s: RecipeSettings) -> str | None:
  """The verification's rejection reason, or None when the question is accepted."""
  if not capabilities_match(requested, verdict.capabilities, s.capability_match):
    return "verification_capability_mismatch"
  if not verdict.answer_correct:
    return "answer_wrong"
  return None


# --- assembly --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AcceptedQA:
  """A verified question with the provenance of the two calls that made it."""

  question: str
  answer: str
  capabilities: tuple[str, ...]
  generation: dict[str, str]  # {"response_id", "hash"}
  verification: dict[str, str]
  verifier_reason: str


def record_id(s: RecipeSettings, image_rel: str, k: int, *, backend: str, model: str) -> str:
  """``{prefix}_k{k}_{16 hex}``: the same for a rerun of the same settings, different across
  images, k values, seeds, backends and models (COMPACT's ids restart at 0 every run)."""
  key = json.dumps([image_rel, k, s.seed, backend, model], ensure_ascii=False)
  return f"{s.id_prefix}_k{k}_{hashlib.sha256(key.encode('utf-8')).hexdigest()[:16]}"


def assemble_record(
  s: RecipeSettings,
  image_rel: str,
  k: int,
  qas: Sequence[AcceptedQA],
  *,
  backend: str,
  model: str,
  prompt_version: str,
) -> dict[str, Any]:
  """A LLaVA/COMPACT record: the first human turn is ``<image>\\n{q}{suffix}``, later ones
  are bare; human turns carry the sorted ``capability`` list and ``k``."""
  conversations = []
  for i, qa in enumerate(qas):
    text = f"<image>\n{qa.question}{s.answer_suffix}" if i == 0 else qa.question
    caps = list(caps_lib.canonical(qa.capabilities))
    conversations.append({"from": "human", "value": text, "capability": caps, "k": len(caps)})
    conversations.append({"from": "gpt", "value": qa.answer})
  return {
    "id": record_id(s, image_rel, k, backend=backend, model=model),
    "image": image_rel,
    "k": k,
    "source": s.source,
    "conversations": conversations,
    "generator": {
      "backend": backend,
      "model": model,
      "prompt_version": prompt_version,
      "seed": s.seed,
      "questions": [
        {
          "generation": dict(qa.generation),
          "verification": dict(qa.verification),
          "verifier_reason": qa.verifier_reason,
        }
        for qa in qas
      ],
    },
  }
