"""What every benchmark module provides, and the records they exchange.

A benchmark is a ``Benchmark``: a loader (local files -> ``Example`` list, with
the prompt LLaVA-1.5 uses for it already applied), a scorer (one model output ->
``Scored``) or an LLM judge, and an aggregator (all scores -> a metrics dict with
a ``headline`` number in the unit of COMPACT's table). The table of benchmarks is
``compact_jax.eval.benchmarks.BENCHMARKS``.

Prompt conventions (LLaVA ``docs/Evaluation.md``; shared/reference/
data_formats_benchmarks_metrics.md §3): short answers end in ``SHORT_ANSWER``,
multiple choice lists ``A. ...`` lines then ``MCQ_SUFFIX``, free-form questions
(MM-Vet, LLaVA-W) get no suffix.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
MCQ_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class Example:
  """One benchmark question.

  Attributes:
    id: unique within the benchmark (the dataset's own id where it has one).
    question: the bare question, as judges and the k-tagger see it.
    prompt: the full user turn given to the model (no ``<image>``: the model
      prepends the image itself).
    image: encoded image bytes, or None for a text-only question.
    answer: the reference: a string, or a list of strings (TextVQA, InfoVQA).
    meta: per-benchmark fields the metric needs (category, options, pair key, ...).
  """

  id: str
  question: str
  prompt: str
  image: bytes | None
  answer: Any
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Scored:
  """One output, scored. ``score`` is None when it could not be scored (a judge
  failure): such rows are excluded from every mean and counted, never scored 0."""

  parsed: Any
  score: float | None
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Options:
  """Benchmark knobs from ``config.bench`` (configs/eval.py)."""

  textvqa_ocr: bool = False
  mmvet_pre_prompt: str = ""
  # The tiny world benchmark reads this built split of the checkpoint's workdir.
  world_split: str = "test"
  world_dataset_name: str = "llava_records"
  world_suffix: str = SHORT_ANSWER


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One benchmark of the suite.

  Attributes:
    name: key in BENCHMARKS and the data subdirectory name.
    title: column header in COMPACT's table.
    load: (benchmark data dir, options) -> examples; raises ``MissingData``.
    score: (example, model output) -> Scored; None for judged benchmarks.
    aggregate: (examples, scores) -> metrics dict including ``headline``.
    max_new_tokens: the generation budget lmms-eval gives this benchmark.
    judged: scored by an LLM judge (compact_jax/eval/benchmarks/judge.py).
  """

  name: str
  title: str
  load: Callable[[pathlib.Path, Options], list[Example]]
  score: Callable[[Example, str], Scored] | None
  aggregate: Callable[[Sequence[Example], Sequence[Scored]], dict[str, Any]]
  max_new_tokens: int
  judged: bool = False


def mean(values: Sequence[float]) -> float | None:
  return sum(values) / len(values) if values else None


def scored_values(scores: Sequence[Scored]) -> list[float]:
  return [s.score for s in scores if s.score is not None]


def group_means(
  keys: Sequence[str], scores: Sequence[Scored], scale: float = 100.0
) -> dict[str, dict[str, float]]:
  """key -> {"score": mean score * scale, "n": scored count}, missing scores excluded."""
  groups: dict[str, list[float]] = {}
  for key, s in zip(keys, scores):
    if s.score is not None:
      groups.setdefault(str(key), []).append(s.score)
  return {k: {"score": scale * sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}


def mcq_prompt(question: str, options: Mapping[str, str], suffix: str = MCQ_SUFFIX) -> str:
  """LLaVA-1.5's multiple-choice prompt: the question, ``A. text`` lines, the instruction."""
  lines = [question.strip(), *(f"{k}. {v}" for k, v in options.items())]
  return "\n".join(lines) + suffix
