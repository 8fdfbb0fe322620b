"""Throughput of the datagen engine (a script, not a timed test).

1. Against the loopback fake server with a fixed latency L and concurrency C, the
   achieved request rate at the server as a fraction of min(C / L, rate limit).
   Target: >= 80%.
2. The world backend's verified QA per second on one core (target >= 500).

  python benchmarks/datagen_throughput.py [--latency 0.2] [--concurrency 1,4,16,64]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compact_jax.datagen import engine as engine_lib  # noqa: E402
from compact_jax.datagen import stages  # noqa: E402
from tests.datagen import helpers  # noqa: E402


def noise_pool(root: pathlib.Path, n: int) -> pathlib.Path:
  d = root / "noise"
  d.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
  return d


def api_rate(
  latency: float, concurrency: int, rpm: float, tmp: pathlib.Path
) -> tuple[float, float]:
  """(achieved requests/s, the ideal min(C / L, rpm / 60)).

  The server runs in its own process so that its work does not share the client's GIL;
  the rate is measured by the client over the steady part of the run.
  """
  os.environ[helpers.KEY_ENV] = helpers.SECRET
  images = noise_pool(tmp / f"c{concurrency}_r{rpm}", max(24, 4 * concurrency))
  server = subprocess.Popen(
    [sys.executable, "-m", "tests.datagen.fake_server", f"--latency={latency}"],
    cwd=REPO, stdout=subprocess.PIPE, text=True,
  )  # fmt: skip
  try:
    url = server.stdout.readline().strip()
    c = helpers.make_config("openai", images=str(images), base_url=url + "/v1")
    c.datagen.max_concurrency = concurrency
    c.datagen.requests_per_minute = rpm
    c.datagen.cache = False
    c.backend.request_timeout_s = 30.0
    times: list[float] = []
    original = engine_lib.Engine.call

    async def timed_call(self, request, st):
      resp = await original(self, request, st)
      times.append(time.monotonic())
      return resp

    engine_lib.Engine.call = timed_call
    try:
      stages.run_datagen(c, tmp / f"work_c{concurrency}_r{rpm}")
    finally:
      engine_lib.Engine.call = original
  finally:
    server.kill()
    server.wait()
  times.sort()
  # Steady state: skip the first and last C replies (ramp-up and drain).
  k = min(concurrency, len(times) // 4)
  window = times[k : len(times) - k]
  achieved = (len(window) - 1) / (window[-1] - window[0])
  ideal = concurrency / latency if rpm <= 0 else min(concurrency / latency, rpm / 60)
  return achieved, ideal


def world_rate(tmp: pathlib.Path, n_images: int, fsync: bool) -> tuple[float, int]:
  c = helpers.make_config("world")
  c.datagen.world_pool_images = n_images
  c.datagen.fsync = fsync
  c.dry_run = True
  stages.run_datagen(c, tmp)  # renders the pool (not timed)
  c.dry_run = False
  t0 = time.perf_counter()
  rep = stages.run_datagen(c, tmp)
  return rep["questions"] / (time.perf_counter() - t0), rep["questions"]


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--latency", type=float, default=0.2)
  ap.add_argument("--concurrency", default="1,4,16,64")
  ap.add_argument("--rpm", type=float, default=1200.0, help="rate limit for the last row")
  ap.add_argument("--world-images", type=int, default=400)
  args = ap.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as d:
    tmp = pathlib.Path(d)
    cs = [int(x) for x in args.concurrency.split(",")]
    for conc in cs:
      rows.append((conc, 0.0, *api_rate(args.latency, conc, 0.0, tmp)))
    rows.append((cs[-1], args.rpm, *api_rate(args.latency, cs[-1], args.rpm, tmp)))
    if hasattr(os, "sched_setaffinity"):
      os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # the world on one core
    w_fsync = world_rate(tmp / "w1", args.world_images, fsync=True)
    w_nosync = world_rate(tmp / "w2", args.world_images, fsync=False)
  print(f"\nloopback server, latency {args.latency * 1000:.0f} ms")
  print(f"{'C':>4} {'rpm limit':>10} {'achieved r/s':>13} {'ideal r/s':>10} {'fraction':>9}")
  for conc, rpm, got, ideal in rows:
    print(f"{conc:>4} {rpm or '-':>10} {got:>13.1f} {ideal:>10.1f} {got / ideal:>9.0%}")
  print(f"world backend, one core: {w_fsync[0]:.0f} verified QA/s ({w_fsync[1]} QA, fsync on), "
        f"{w_nosync[0]:.0f} QA/s with fsync off")  # fmt: skip


if __name__ == "__main__":
  main()
