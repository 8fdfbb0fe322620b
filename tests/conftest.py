"""Test-wide setup: a fake 8-device CPU, set before anything imports jax."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile

import jax

# One persistent compilation cache per test session, shared by xdist workers:
# many tests build the same tiny models, and XLA:CPU compiles are slow.
_CACHE = os.environ.setdefault(
  "COMPACT_JAX_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), "compact_jax_test_xla_cache")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
