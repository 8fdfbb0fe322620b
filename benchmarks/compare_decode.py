"""Greedy decoding, compact_jax's KV-cache decoder vs Hugging Face ``generate``.

  python benchmarks/compare_decode.py [--size tiny] [--batches 1,8] [--runs 3]
  python benchmarks/compare_decode.py --quick

Both sides decode the spec's model (random init, no adapters: a fine-tuned model is
served merged) from the same prompt: the image's tokens followed by
``--prompt_text`` text tokens (64 + 16 = 80 prompt tokens for "tiny"), then
``--new_tokens`` greedy tokens. Stopping is off on both sides (HF
``min_new_tokens``, and an EOS id that never occurs here), so both always emit
exactly ``--new_tokens`` tokens. Time per call includes the image tower and the
prefill. As in ``compare_train.py``: one process per measurement, pinned with
taskset, sides alternating, first call (compile) reported apart, median and
spread over runs.

``--worker jax`` runs ``compact_jax.eval.decode.make_greedy_decoder`` (a jitted
``lax.while_loop`` over a preallocated cache) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import compare_train  # noqa: E402
import specs  # noqa: E402


def run_jax_worker(
  spec: specs.Spec, batch: int, prompt_text: int, new_tokens: int, reps: int, scan_layers: bool
):
  import jax
  import numpy as np
  from flax import nnx

  from compact_jax.eval import decode
  from compact_jax.train import state as state_lib

  config = specs.jax_config(spec, scan_layers=scan_layers)
  config.model.lora.targets = ()
  model = state_lib.build_model(
    config.model, vocab_size=spec.vocab_size, image_size=spec.image_size, seed=0
  )
  graphdef, params = nnx.split(model)
  # eos_id -1 never matches a token: every row decodes all new_tokens.
  decoder = decode.make_greedy_decoder(graphdef, max_new_tokens=new_tokens, eos_id=-1, pad_id=0)
  raw = specs.make_batch(dataclasses.replace(spec, batch_size=batch))
  args = (
    params,
    jax.numpy.asarray(raw["image"]),
    jax.numpy.asarray(raw["text"][:, :prompt_text]),
    jax.numpy.ones((batch, prompt_text), bool),
    jax.numpy.ones((batch,), bool),
  )
  t0 = time.perf_counter()
  out = np.asarray(decoder(*args))
  first_s = time.perf_counter() - t0
  if out.shape != (batch, new_tokens):
    raise RuntimeError(f"decoder returned shape {out.shape}, expected {(batch, new_tokens)}")
  t0 = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(decoder(*args))
  call_s = (time.perf_counter() - t0) / reps
  return {
    "side": "jax",
    "first_call_s": first_s,
    "call_s": call_s,
    "tokens_per_s": batch * new_tokens / call_s,
    "prompt_len": spec.image_tokens + prompt_text,
    "num_traces": decoder.num_traces,
  }


def compare(args) -> list[str]:
  spec = specs.get_spec(args.size)
  cores = compare_train.cores_arg(args.cores)
  threads = len(cores.split(","))
  common = ["--size", args.size, "--prompt_text", str(args.prompt_text),
            "--new_tokens", str(args.new_tokens), "--reps", str(args.reps)]  # fmt: skip
  if args.scan_layers:
    common.append("--scan_layers")
  lines = [
    f"# decode {args.size}: prompt {spec.image_tokens} image + {args.prompt_text} text tokens, "
    f"{args.new_tokens} new tokens, greedy, prefill included; cores {cores}, "
    f"{args.runs} alternating runs x {args.reps} calls; "
    f"jax layers {'scanned' if args.scan_layers else 'unrolled'}"
  ]
  for b in args.batches:
    results: dict[str, list[dict]] = {"jax": [], "hf_generate": []}
    for _ in range(args.runs):
      jax_argv = [__file__, "--worker", "jax", "--batch", str(b), *common]
      hf_argv = [str(HERE / "torch_peer.py"), "decode", "--batch", str(b),
                 "--threads", str(threads), *common]  # fmt: skip
      results["jax"].append(compare_train.run_pinned(jax_argv, cores, 1800))
      results["hf_generate"].append(compare_train.run_pinned(hf_argv, cores, 1800))
    tps = {s: [o["tokens_per_s"] for o in r] for s, r in results.items()}
    med = {s: statistics.median(v) for s, v in tps.items()}

    def fmt(side: str, med=med, tps=tps, b=b) -> str:
      return (
        f"{med[side]:.0f} tok/s [{min(tps[side]):.0f}-{max(tps[side]):.0f}] "
        f"({1e3 / med[side] * b:.2f} ms/token-step)"
      )

    first = {s: statistics.median(o["first_call_s"] for o in r) for s, r in results.items()}
    lines.append(
      f"decode {args.size} batch {b}: jax {fmt('jax')} | hf_generate {fmt('hf_generate')} | "
      f"speedup {med['jax'] / med['hf_generate']:.2f}x | first call (compile) jax "
      f"{first['jax']:.1f} s, hf {first['hf_generate']:.1f} s; "
      f"jax traces {results['jax'][-1]['num_traces']}"
    )
  return lines


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="tiny", choices=sorted(specs.SPECS))
  ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  ap.add_argument("--prompt_text", type=int, default=16)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--reps", type=int, default=3, help="timed calls per process")
  ap.add_argument("--cores", default=None)
  ap.add_argument("--quick", action="store_true", help="1 run, 2 calls")
  ap.add_argument("--scan_layers", action="store_true", help="jax: scan the layer stack")
  ap.add_argument("--worker", choices=("jax",), default=None, help=argparse.SUPPRESS)
  ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    out = run_jax_worker(
      specs.get_spec(args.size),
      args.batch,
      args.prompt_text,
      args.new_tokens,
      args.reps,
      args.scan_layers,
    )
    print(json.dumps(out))
    return
  if args.quick:
    args.runs, args.reps = 1, 2
  args.batches = [int(b) for b in str(args.batches).split(",")]
  for line in compare(args):
    print(line, flush=True)


if __name__ == "__main__":
  main()
