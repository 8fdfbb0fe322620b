"""Process-wide JAX settings, applied once by the launcher (and the tests)."""

from __future__ import annotations

import os

import jax


class Preempted(Exception):
  """A stage stopped early on SIGTERM after saving a checkpoint.

  ``main.run`` raises it so that nothing after the preempted stage runs on a
  partial result (an eval of a half-trained checkpoint, the next arm of an
  experiment); the launcher turns it into exit status 0, and rerunning the same
  command resumes from the saved step.
  """


def enable_compilation_cache(directory: str) -> None:
  """Persists compiled XLA programs, so reruns and resumed stages skip compiles.

  XLA:CPU compiles are slow (seconds for a small train step), and every stage
  rerun, resume and test process would otherwise pay them again.
  """
  if not directory:
    return
  directory = os.path.expanduser(directory)
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
