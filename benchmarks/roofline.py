"""The machine's matmul roofline: a jitted fp32 ``x @ y`` for n = 1024..4096.

  taskset -c 0,1 python benchmarks/roofline.py [--quick] [--json]

Per size: the median of ``--reps`` timed calls after one warm-up (compile
excluded), as GFLOP/s = 2 n^3 / t; with ``--numpy``, numpy's matmul on the
same arrays for comparison. The roofline is the best size's jax rate: the practical peak that
other benchmarks report their achieved FLOP rate against.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

SIZES = (1024, 2048, 4096)


def time_call(fn, reps: int) -> float:
  """Median seconds of ``fn()`` over ``reps`` calls, after one warm-up call."""
  fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_gflops(n: int, reps: int, with_numpy: bool) -> dict[str, float]:
  """{"jax": GFLOP/s[, "numpy": GFLOP/s]} of an n x n fp32 matmul."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), np.float32)
  b = rng.standard_normal((n, n), np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  mm = jax.jit(jnp.matmul)
  flops = 2.0 * n**3
  t_jax = time_call(lambda: mm(ja, jb).block_until_ready(), reps)
  out = {"jax": flops / t_jax / 1e9}
  if with_numpy:
    out["numpy"] = flops / time_call(lambda: a @ b, reps) / 1e9
  return out


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--quick", action="store_true", help="n = 1024, 2048 only, 3 reps")
  ap.add_argument("--json", action="store_true", help="one JSON line instead of a table")
  # numpy's BLAS threads degrade badly on a loaded machine (minutes at n = 4096).
  ap.add_argument("--numpy", action="store_true", help="also time numpy's matmul")
  args = ap.parse_args(argv)
  sizes = SIZES[:2] if args.quick else SIZES
  reps = 3 if args.quick else args.reps
  rates = {n: matmul_gflops(n, reps, args.numpy) for n in sizes}
  roof = max(r["jax"] for r in rates.values())
  if args.json:
    print(json.dumps({"roofline_gflops": roof, "by_size": rates}))
    return
  for n, r in rates.items():
    extra = f", numpy {r['numpy']:.1f} GFLOP/s" if "numpy" in r else ""
    print(f"matmul fp32 n={n}: jax {r['jax']:.1f} GFLOP/s{extra}")
  print(f"roofline (best jax): {roof:.1f} GFLOP/s")


if __name__ == "__main__":
  main()
