"""The tiny world's test split as a benchmark: exact match by k and by capability.

Delegates to the ``eval`` stage's code paths (compact_jax/eval/run.py and
metrics.py): questions are collected by ``run.collect_questions``, asked with
``run.with_suffix``, scored by ``metrics.exact_match`` and tabulated by
``metrics.accuracy_table``, so this benchmark and ``run_eval`` agree by
construction. k is exact here (the composer's label), not tagged.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from compact_jax.data import build as build_lib
from compact_jax.data import tfds_io
from compact_jax.eval import metrics as metrics_lib
from compact_jax.eval import run as run_lib
from compact_jax.eval.benchmarks import core


def examples_from_source(source, *, suffix: str) -> list[core.Example]:
  """Examples of a built split (``tfds_io.load_split`` records, or a list of them)."""
  questions, rec_index = run_lib.collect_questions(source)
  out = []
  for q, r in zip(questions, rec_index):
    rec = source[r]
    out.append(core.Example(
      id=f"{q.record_id}#{q.turn}", question=q.question, prompt=run_lib.with_suffix(q.question, suffix),
      image=rec["image"] if rec["has_image"] else None, answer=q.answer,
      meta={"record_id": q.record_id, "turn": q.turn, "capabilities": list(q.capabilities), "k": q.k,
            "qtype": q.qtype, "heldout": q.heldout},
    ))  # fmt: skip
  return out


def load(workdir: pathlib.Path, options: core.Options) -> list[core.Example]:
  """The built split ``options.world_split`` of the checkpoint's workdir."""
  try:
    source = tfds_io.load_split(build_lib.tfds_dir(workdir), options.world_split,
                                name=options.world_dataset_name)  # fmt: skip
  except FileNotFoundError as e:
    raise FileNotFoundError(
      f"Benchmark 'tinyworld' reads the built split {options.world_split!r} of {workdir}: run the "
      f"generate and build stages there (configs/tiny_world.py) first ({e})"
    ) from None
  return examples_from_source(source, suffix=options.world_suffix)


def score(example: core.Example, output: str) -> core.Scored:
  ok = metrics_lib.exact_match(output, example.answer)
  return core.Scored(metrics_lib.normalize_answer(output), float(ok))


def _question(e: core.Example) -> metrics_lib.Question:
  m = e.meta
  return metrics_lib.Question(m["record_id"], m["turn"], e.question, e.answer,
                              tuple(m["capabilities"]), m["k"], m["qtype"], m["heldout"])  # fmt: skip


def aggregate(examples: Sequence[core.Example], scores: Sequence[core.Scored]) -> dict[str, Any]:
  table = metrics_lib.accuracy_table(
    [_question(e) for e in examples], [s.score == 1.0 for s in scores]
  )
  return {"headline": 100.0 * table["overall"]["all"]["accuracy"], **table, "n": len(examples)}


BENCHMARK = core.Benchmark("tinyworld", "TinyWorld", load, score, aggregate, max_new_tokens=8)
