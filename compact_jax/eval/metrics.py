"""Answer normalisation, exact match, and accuracy broken down by k and capability."""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

_NUMBER_WORDS = {
  w: str(i)
  for i, w in enumerate(
    [
      "zero",
      "one",
      "two",
      "three",
      "four",
      "five",
      "six",
      "seven",
      "eight",
      "nine",
      "ten",
      "eleven",
      "twelve",
      "thirteen",
      "fourteen",
      "fifteen",
      "sixteen",
      "seventeen",
      "eighteen",
      "nineteen",
      "twenty",
    ]
  )
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
  """Lower-cases and strips punctuation, articles and number words -> digits.

  "The RED one." -> "red one"; "Three" -> "3"; "3." -> "3". The same rules
  apply to predictions and references, so formatting never decides a match.
  """
  words = _PUNCT.sub(" ", text.lower()).split()
  words = [_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES]
  return " ".join(words)


def exact_match(prediction: str, answer: str) -> bool:
  return normalize_answer(prediction) == normalize_answer(answer)


@dataclass(frozen=True)
class Question:
  """One scored question of an eval split."""

  record_id: str
  turn: int
  question: str
  answer: str
  capabilities: tuple[str, ...]
  k: int
  qtype: str
  heldout: bool


def accuracy_table(
  questions: Sequence[Question], correct: Sequence[bool]
) -> dict[str, dict[str, dict[str, float]]]:
  """``{"overall", "by_k", "by_capability", "by_qtype", "heldout"}`` -> key -> {accuracy, n}.

  A question counts once for each capability it needs. ``heldout`` splits
  questions into seen vs held-out capability combinations.
  """
  if len(questions) != len(correct):
    raise ValueError(f"{len(questions)} questions but {len(correct)} scores")
  groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
  for q, ok in zip(questions, correct):
    groups["overall"]["all"].append(ok)
    groups["by_k"][str(q.k)].append(ok)
    for cap in q.capabilities:
      groups["by_capability"][cap].append(ok)
      if q.k == 1:
        groups["by_capability_k1"][cap].append(ok)
    groups["by_qtype"][q.qtype].append(ok)
    groups["heldout"]["heldout" if q.heldout else "seen"].append(ok)
  return {
    name: {
      key: {"accuracy": sum(v) / len(v), "n": len(v)}
      for key, v in sorted(table.items(), key=lambda kv: _sort_key(kv[0]))
    }
    for name, table in groups.items()
  }


def _sort_key(key: str):
  return (0, int(key), "") if key.isdigit() else (1, 0, key)


def query_family(qtype: str) -> str:
  """The query part of a program name: ``"count(moving,object)"`` -> ``"count"``."""
  return qtype.split("(", 1)[0]


@dataclass(frozen=True)
class MajorityBaseline:
  """Predicts the most frequent train answer of a question's type.

  Test questions may be of types never seen in training (more constraints at
  higher k); they fall back to the majority answer of the same query family,
  then to the overall majority, so the baseline always answers.
  """

  by_qtype: dict[str, str]
  by_family: dict[str, str]
  overall: str

  @classmethod
  def fit(cls, pairs: Iterable[tuple[str, str]]) -> MajorityBaseline:
    pairs = list(pairs)
    return cls(
      by_qtype=majority_answers(pairs),
      by_family=majority_answers((query_family(q), a) for q, a in pairs),
      overall=majority_answers(("all", a) for _, a in pairs).get("all", ""),
    )

  def predict(self, qtype: str) -> str:
    if qtype in self.by_qtype:
      return self.by_qtype[qtype]
    return self.by_family.get(query_family(qtype), self.overall)


def majority_answers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
  """question type -> its most frequent normalised answer (ties: alphabetical)."""
  counts: dict[str, Counter] = defaultdict(Counter)
  for qtype, answer in pairs:
    counts[qtype][normalize_answer(answer)] += 1
  return {qtype: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for qtype, c in counts.items()}


def question_type(turn: Mapping) -> str:
  """The grouping key of a question: its program name, else its capability set."""
  return turn.get("qtype") or "+".join(sorted(turn.get("capability", []))) or "unknown"
