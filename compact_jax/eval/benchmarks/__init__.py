"""Benchmarks of the COMPACT table (and a few more), one module per family.

``BENCHMARKS`` is the explicit table of every benchmark the suite runs; see
core.py for what a benchmark provides and bench_run.py for how they run.
"""

from __future__ import annotations

from compact_jax.eval.benchmarks import (
  core,
  gqa,
  infovqa,
  judged,
  mcq,
  mme,
  pope,
  textvqa,
  tinyworld,
)

BENCHMARKS: dict[str, core.Benchmark] = {
  b.name: b
  for b in (
    infovqa.BENCHMARK,
    mcq.SEED,
    mme.BENCHMARK,
    textvqa.BENCHMARK,
    judged.MMVET,
    mcq.CVBENCH,
    mcq.MMSTAR,
    judged.LLAVA_WILD,
    pope.BENCHMARK,
    gqa.BENCHMARK,
    tinyworld.BENCHMARK,
  )
}
# COMPACT's results table (shared/reference/data_formats_benchmarks_metrics.md §5.1), in order;
# Rel. % is the mean of score / baseline score over these columns.
COMPACT_TABLE = (
  "infovqa", "seedbench2plus", "mme", "textvqa", "mmvet", "cvbench", "mmstar", "llava_wild",
)  # fmt: skip


def get(name: str) -> core.Benchmark:
  if name not in BENCHMARKS:
    raise ValueError(f"Unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
  return BENCHMARKS[name]
