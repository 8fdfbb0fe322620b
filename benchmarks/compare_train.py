"""Train step, compact_jax vs Hugging Face + peft (eager and torch.compile), side by side.

  python benchmarks/compare_train.py --size tiny [--runs 3] [--steps 10] [--no_compile]
  python benchmarks/compare_train.py --quick          # tiny, 1 run, few steps, eager only

Every measurement is its own process, pinned with ``taskset`` to the same cores
(``--cores``, default: this process's affinity), the sides alternating
(J, E, C, J, E, C, ...), so slow drift on a shared machine hits all of them alike.
In each process the first step (trace + compile + one step) is reported apart,
``--warmup`` more steps are discarded, and the next ``--steps`` are timed together.
Per side: the median over runs, and the spread (min-max).

Output: one line per comparison with each side's ms/step, the ratio, achieved
GFLOP/s (``specs.model_flops``, formula printed) and % of the matmul roofline
measured by ``roofline.py`` in the same way.

``--worker jax`` is the compact_jax side: the spec's config through
``train.state.setup_state`` and ``train.step.TrainStep`` (the real step: jitted,
sharded, state donated), one JSON line out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import specs  # noqa: E402


def run_jax_worker(spec: specs.Spec, steps: int, warmup: int, scan_layers: bool) -> dict:
  import jax

  from compact_jax.train import mesh as mesh_lib
  from compact_jax.train import state as state_lib
  from compact_jax.train import step as step_lib

  config = specs.jax_config(spec, scan_layers=scan_layers)
  mesh = mesh_lib.make_mesh(config.mesh)
  setup, init_fn = state_lib.setup_state(config, vocab_size=spec.vocab_size, mesh=mesh)
  state = init_fn()
  train_step = step_lib.TrainStep(setup, config, mesh)
  batch = step_lib.to_global_batch(specs.jax_batch(spec), mesh)

  t0 = time.perf_counter()
  state, metrics = train_step(state, batch)
  first_loss = float(metrics["loss"])
  first_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = train_step(state, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / steps
  return {
    "side": "jax",
    "first_step_s": first_s,
    "step_ms": step_s * 1e3,
    "first_loss": first_loss,
    "params": setup.num_params,
    "trainable": setup.num_trainable,
    "retraces": train_step.num_retraces,
    "jax": jax.__version__,
  }


def cores_arg(cores: str | None) -> str:
  return cores or ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


def child_env() -> dict[str, str]:
  env = dict(os.environ)
  # One CPU device per process: a test-style fake device count would split the step.
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("TOKENIZERS_PARALLELISM", "false")
  return env


def run_pinned(argv: list[str], cores: str, timeout: float) -> dict:
  """Runs ``python argv`` under taskset; returns its last stdout line as JSON."""
  cmd = ["taskset", "-c", cores, sys.executable, *argv]
  proc = subprocess.run(
    cmd, capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=timeout
  )
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1])


def measure_roofline(cores: str, quick: bool) -> float:
  argv = [str(HERE / "roofline.py"), "--json"] + (["--quick"] if quick else [])
  return run_pinned(argv, cores, timeout=600)["roofline_gflops"]


def summarize(values: list[float]) -> tuple[float, float, float]:
  return statistics.median(values), min(values), max(values)


def side_argv(
  side: str, size: str, steps: int, warmup: int, threads: int, scan_layers: bool = False
) -> list[str]:
  if side == "jax":
    return [__file__, "--worker", "jax", "--size", size, "--steps", str(steps),
            "--warmup", str(warmup)] + (["--scan_layers"] if scan_layers else [])  # fmt: skip
  mode = side.removeprefix("hf_")
  return [str(HERE / "torch_peer.py"), "train", "--size", size, "--mode", mode,
          "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)]  # fmt: skip


def compare(args) -> list[str]:
  spec = specs.get_spec(args.size)
  cores = cores_arg(args.cores)
  threads = len(cores.split(","))
  sides = ["jax", "hf_eager"] + ([] if args.no_compile else ["hf_compile"])
  roof = args.roofline or measure_roofline(cores, args.quick)
  results: dict[str, list[dict]] = {s: [] for s in sides}
  for r in range(args.runs):
    for side in sides:
      argv = side_argv(side, args.size, args.steps, args.warmup, threads, args.scan_layers)
      out = run_pinned(argv, cores, 3600)
      results[side].append(out)
      print(f"  run {r} {side}: {out['step_ms']:.1f} ms/step, first step "
            f"{out['first_step_s']:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
  flops = specs.model_flops(spec).total
  med = {s: summarize([o["step_ms"] for o in results[s]]) for s in sides}

  def rate(side: str) -> str:
    gflops = flops / (med[side][0] * 1e-3) / 1e9
    return f"{gflops:.1f} GFLOP/s ({100 * gflops / roof:.0f}% of roofline)"

  def ms(side: str) -> str:
    m, lo, hi = med[side]
    return f"{m:.1f} ms/step [{lo:.1f}-{hi:.1f}]"

  lines = [
    f"# {args.size}: B={spec.batch_size} S={spec.seq_len} ({spec.image_tokens} image tokens), "
    f"{results['jax'][0]['params']:,} params, model FLOPs/step {flops / 1e9:.2f} G; "
    f"cores {cores}, {args.runs} alternating runs x {args.steps} steps, roofline {roof:.0f} GFLOP/s"
    f"; jax layers {'scanned' if args.scan_layers else 'unrolled'}",
    f"# FLOPs: {specs.FLOP_FORMULA}",
  ]
  for peer in sides[1:]:
    ratio = med[peer][0] / med["jax"][0]
    lines.append(
      f"train {args.size} jax vs {peer}: jax {ms('jax')} {rate('jax')} | "
      f"{peer} {ms(peer)} {rate(peer)} | speedup {ratio:.2f}x"
    )
  first = {s: statistics.median(o["first_step_s"] for o in results[s]) for s in sides}
  lines.append(
    "compile (first step incl. trace/compile, median s): "
    + ", ".join(f"{s} {first[s]:.1f}" for s in sides)
  )
  return lines


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="tiny", choices=sorted(specs.SPECS))
  ap.add_argument("--runs", type=int, default=3, help="alternating runs per side")
  ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
  ap.add_argument("--warmup", type=int, default=2, help="discarded steps after the first")
  ap.add_argument("--cores", default=None, help="taskset core list, e.g. 0,1")
  ap.add_argument("--no_compile", action="store_true", help="skip HF + torch.compile")
  ap.add_argument("--roofline", type=float, default=0.0, help="GFLOP/s; 0 = measure")
  ap.add_argument("--quick", action="store_true", help="tiny, 1 run, 3 steps, no compile")
  ap.add_argument("--scan_layers", action="store_true", help="jax: scan the layer stacks")
  ap.add_argument("--worker", choices=("jax",), default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    spec = specs.get_spec(args.size)
    print(json.dumps(run_jax_worker(spec, args.steps, args.warmup, args.scan_layers)))
    return
  if args.quick:
    args.size, args.runs, args.steps, args.warmup, args.no_compile = "tiny", 1, 3, 1, True
  for line in compare(args):
    print(line, flush=True)


if __name__ == "__main__":
  main()
