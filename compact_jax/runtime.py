"""Process-wide JAX settings, applied once by the launcher (and the tests)."""

from __future__ import annotations

import os

import jax


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
