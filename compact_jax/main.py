r"""The launcher: ``python -m compact_jax.main --config=configs/X.py[:arg] --workdir=DIR``.

Runs the stages that ``config.stages`` lists, in order. Each stage is a library
function ``run_<stage>(config, workdir)`` that Colab and tests call directly;
this file only parses flags and dispatches.

  python -m compact_jax.main --config=configs/tiny_world.py --workdir=/tmp/tw
  python -m compact_jax.main --config=configs/tiny_world.py:smoke --workdir=/tmp/s \
      --config.stages='("train","eval")' --config.train.total_steps=50
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (path[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where every stage reads and writes.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Redo finished stages instead of skipping them.")
flags.mark_flags_as_required(["config", "workdir"])


def _stage_fns() -> dict[str, Callable]:
  # Imported here so `--help` and config errors do not pay for jax/tfds imports.
  from compact_jax.data.build import run_build
  from compact_jax.datagen.mix import run_mix
  from compact_jax.datagen.stages import run_datagen, run_merge
  from compact_jax.eval.bench_run import run_benchmarks
  from compact_jax.eval.run import run_eval
  from compact_jax.experiments.compact_repro import run_experiment
  from compact_jax.train.export import run_export
  from compact_jax.train.loop import TRAIN_PHASES, run_train
  from compact_jax.world.generate import run_generate
  from compact_jax.world.vision import run_vision

  return {
    "generate": run_generate,
    "build": run_build,
    "vision": run_vision,
    **{phase: functools.partial(run_train, phase=phase) for phase in TRAIN_PHASES},
    "eval": run_eval,
    "benchmarks": run_benchmarks,
    "export": run_export,
    "datagen": run_datagen,
    "merge": run_merge,
    "mix": run_mix,
    # Sub-runs go through this module's `run` (importing compact_jax.main from the
    # library would define the flags a second time when this file is __main__).
    "experiment": functools.partial(run_experiment, run_stages=run),
  }


def run(config, workdir: str) -> dict:
  """Runs ``config.stages`` in order; returns each stage's result."""
  stages = _stage_fns()
  unknown = [s for s in config.stages if s not in stages]
  if unknown:
    raise ValueError(f"Unknown stage(s) {unknown}; choose from {list(stages)}")
  from compact_jax import runtime
  from compact_jax.train import mesh as mesh_lib

  mesh_lib.maybe_initialize_distributed(config.distributed)
  runtime.enable_compilation_cache(config.compilation_cache_dir)
  if config.dry_run:
    from compact_jax.train import dry_run as dry_run_lib
    from compact_jax.train.loop import TRAIN_PHASES

    results = {}
    for phase in (s for s in config.stages if s in TRAIN_PHASES):
      results[phase] = dry_run_lib.dry_run(config, phase=phase)
      print(f"=== dry run: {phase} ===\n" + dry_run_lib.format_report(results[phase]), flush=True)
    return results
  os.makedirs(workdir, exist_ok=True)
  results = {}
  for name in config.stages:
    t0 = time.time()
    logging.info("=== stage %s ===", name)
    results[name] = stages[name](config, workdir)
    if getattr(results[name], "preempted", False):
      rest = list(config.stages)[list(config.stages).index(name) + 1 :]
      raise runtime.Preempted(
        f"stage {name} saved a checkpoint on SIGTERM after {time.time() - t0:.1f}s and stopped; "
        f"not running {rest or 'anything else'}. Rerun the same command to resume."
      )
    logging.info("=== stage %s done in %.1fs ===", name, time.time() - t0)
  return results


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _OVERWRITE.value:
    with config.unlocked():
      config.overwrite = True
  logging.getLogger().setLevel(logging.INFO)
  from absl import logging as absl_logging

  absl_logging.set_stderrthreshold("info")
  from compact_jax import runtime

  try:
    run(config, _WORKDIR.value)
  except runtime.Preempted as e:
    # Exit 0: schedulers read a non-zero status as a failed job, not a preemption.
    logging.warning("%s", e)


if __name__ == "__main__":
  sys.exit(app.run(main))
