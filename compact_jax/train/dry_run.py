r"""Will it fit? Compile the real train step for a full-size config without weights.

The dry run builds the train state's abstract shapes and shardings exactly as
training does (``state.setup_state``), jits the same step (``step.TrainStep``:
same in/out shardings, same donation), and lowers and compiles it for
ShapeDtypeStructs with shardings. No parameter, optimizer state or batch is
ever allocated, so a 7B model compiles on a laptop's simulated devices. It
reports, per device:

- parameter, optimizer-state and batch bytes, from the shapes and shardings
  (these are exact: they are what the real arrays' shards hold);
- XLA's ``memory_analysis()``: arguments, outputs, aliased (donated) bytes,
  temporaries, and the peak estimate ``arguments + outputs - aliased + temps``
  (the sum MaxText prints before training);
- each parameter group's sharding (its PartitionSpecs, counted);
- the model FLOPs per step (``train/flops.py``) next to XLA's cost analysis.

On simulated CPU devices, temporaries are the CPU compiler's buffer
assignment: the TPU/GPU compilers fuse and lay out differently, so treat them
as an estimate (arguments and outputs are exact). XLA's FLOP count counts a
scanned layer stack's body once (a while loop), so with ``scan_layers`` it is
far below the model count; use ``flops.model``.

Command line (simulated devices are set up before jax starts)::

  python -m compact_jax.train.dry_run --config=configs/siglip_gemma2b.py --mesh=fsdp=8 \
      --chip=tpu_v5e
  python -m compact_jax.train.dry_run --config=configs/llava15_7b.py --mesh=data=2,fsdp=4 \
      --chip=tpu_v5p --config.train.batch_size=128

``--mesh`` overrides ``config.mesh`` (unnamed axes get size 1);
``--simulated_devices=0`` uses the real devices of this host instead of CPU
ones. Any ``--config.*`` override works as for ``compact_jax.main``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from compact_jax.models import llm as llm_lib
from compact_jax.train import flops as flops_lib
from compact_jax.train import loop as loop_lib
from compact_jax.train import mesh as mesh_lib
from compact_jax.train import optimizer as optimizer_lib
from compact_jax.train import state as state_lib
from compact_jax.train import step as step_lib


def abstract_batch(
  mesh: Mesh, *, batch_size: int, seq_len: int, image_size: int
) -> dict[str, jax.ShapeDtypeStruct]:
  """The train step's batch as ShapeDtypeStructs in its shardings (``step.BATCH_KEYS``)."""
  shardings = step_lib.batch_shardings(mesh)
  split = math.prod(mesh.shape[a] for a in mesh_lib.BATCH_AXES if a in mesh.shape)
  if batch_size % split:
    raise ValueError(
      f"dry_run: batch size {batch_size} does not divide over the {split} devices of the "
      f"batch axes {mesh_lib.BATCH_AXES} in mesh {dict(mesh.shape)}"
    )
  shapes = {
    "image": ((batch_size, image_size, image_size, 3), jnp.float32),
    "has_image": ((batch_size,), jnp.bool_),
    "tokens": ((batch_size, seq_len), jnp.int32),
    "mask_ar": ((batch_size, seq_len), jnp.int32),
    "mask_loss": ((batch_size, seq_len), jnp.int32),
    "mask_input": ((batch_size, seq_len), jnp.bool_),
  }
  missing = set(step_lib.BATCH_KEYS) ^ set(shapes)
  if missing:
    raise ValueError(f"dry_run: batch keys out of date with train/step.py: {sorted(missing)}")
  return {k: jax.ShapeDtypeStruct(s, d, sharding=shardings[k]) for k, (s, d) in shapes.items()}


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _spec(sharding: NamedSharding) -> str:
  parts = []
  for axes in sharding.spec:
    if axes is None:
      parts.append("None")
    elif isinstance(axes, str):
      parts.append(repr(axes))
    else:
      parts.append("(" + ",".join(repr(a) for a in axes) + ")")
  return "P(" + ", ".join(parts) + ")"


def group_summary(setup: state_lib.StateSetup, groups: tuple) -> dict[str, dict[str, Any]]:
  """Per parameter group: its rule, size, bytes per device and PartitionSpecs (counted)."""
  shapes = mesh_lib.path_names(setup.abstract["params"])
  out: dict[str, dict[str, Any]] = {}
  for label, names in sorted(setup.group_members.items()):
    if label == optimizer_lib.FROZEN:
      rule = "frozen (" + ", ".join(p for p, m in groups if m is None) + ")"
    else:
      pattern, mult = groups[int(label[1:])]
      rule = f"{pattern} (lr x{mult})"
    specs: dict[str, dict[str, Any]] = {}
    for name in names:
      leaf = shapes[name]
      entry = specs.setdefault(_spec(leaf.sharding), {"arrays": 0, "params": 0, "example": name})
      entry["arrays"] += 1
      entry["params"] += math.prod(leaf.shape)
    out[label] = {
      "rule": rule,
      "arrays": len(names),
      "params": sum(math.prod(shapes[n].shape) for n in names),
      "bytes_per_device": bytes_per_device([shapes[n] for n in names]),
      "specs": dict(sorted(specs.items(), key=lambda kv: -kv[1]["params"])),
    }
  return out


def default_vocab_size(config: ml_collections.ConfigDict) -> int:
  """The checkpoint's vocabulary (``LLMVariant.vocab_size``), else the built tokenizer's."""
  variant = llm_lib.decode_variant(config.model.llm_variant)
  return variant.vocab_size or config.build.tokenizer_vocab_size


def dry_run(
  config: ml_collections.ConfigDict,
  *,
  phase: str = "train",
  vocab_size: int | None = None,
  seq_len: int | None = None,
  chip: str | None = None,
  devices: list | None = None,
) -> dict[str, Any]:
  """Lowers and compiles the train step of ``config.<phase>`` on ``config.mesh``.

  Args:
    config: a full config (``configs/*.py``); nothing is read from disk.
    phase: the training phase (``train``, ``pretrain``) whose param groups,
      optimizer and batch size to use.
    vocab_size: defaults to ``default_vocab_size(config)``.
    seq_len: text tokens per example; defaults to the longest of
      ``config.data.seq_buckets`` (the bucket that needs the most memory).
    chip: a ``flops.HBM_BYTES`` key to judge the fit against; defaults to the
      devices' own kind when known.
    devices: the devices to lay the mesh over (default: all).

  Returns:
    A JSON-serialisable report (see the module docstring); ``fits`` is None
    when the chip is unknown.
  """
  if config.data.pack_length:
    # A packed step's memory differs (image slots, per-token segment ids): planning it
    # with an unpacked batch would give a wrong answer, so say so instead.
    raise ValueError(
      f"dry_run: packed steps are not planned yet (data.pack_length="
      f"{config.data.pack_length}); plan with --config.data.pack_length=0"
    )
  if config.model.dynamic_res.mode:
    # Tiled steps take [B, V, S, S, 3] images and a tile_layout; the abstract batch
    # below is the single-image one, so its plan would be wrong.
    raise ValueError(
      f"dry_run: dynamic-resolution steps are not planned yet (model.dynamic_res.mode="
      f"{config.model.dynamic_res.mode!r}); plan with --config.model.dynamic_res.mode=''"
    )
  phase_cfg = loop_lib.phase_config(config, phase)
  vocab_size = vocab_size or default_vocab_size(config)
  seq_len = seq_len or max(config.data.seq_buckets)
  batch_size = phase_cfg.train.batch_size
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  t0 = time.perf_counter()
  setup, _ = state_lib.setup_state(phase_cfg, vocab_size=vocab_size, mesh=mesh)
  batch = abstract_batch(
    mesh, batch_size=batch_size, seq_len=seq_len, image_size=config.data.image_size
  )
  train_step = step_lib.TrainStep(setup, phase_cfg, mesh)
  t1 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = train_step.lower(setup.abstract, batch)
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()

  mem = compiled.memory_analysis()
  peak = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    - mem.alias_size_in_bytes
    + mem.temp_size_in_bytes
  )
  shapes, trained = flops_lib.shapes_and_trainable(setup.abstract["params"], setup.trainable)
  step_flops = flops_lib.step_flops(
    config.model,
    vocab_size=vocab_size,
    image_size=config.data.image_size,
    batch_size=batch_size,
    seq_len=seq_len,
    shapes=shapes,
    trainable=trained,
  )
  n_dev = mesh.devices.size
  kind = mesh.devices.flat[0].device_kind
  chip = chip or flops_lib.chip_name(kind)
  if chip is not None and chip not in flops_lib.HBM_BYTES:
    raise ValueError(f"dry_run: unknown chip {chip!r}; known: {sorted(flops_lib.HBM_BYTES)}")
  hbm = flops_lib.HBM_BYTES[chip] if chip else None
  model_flops = step_flops.model
  report = {
    "config": {
      "phase": phase,
      "vit": config.model.vit_variant,
      "connector": config.model.connector,
      "llm": config.model.llm_variant,
      "dtype": config.model.dtype,
      "remat_policy": config.model.remat_policy,
      "scan_layers": config.model.scan_layers,
    },
    "mesh": dict(mesh.shape),
    "devices": {"count": n_dev, "kind": kind, "platform": mesh.devices.flat[0].platform},
    "batch": {
      "batch_size": batch_size,
      "seq_len": seq_len,
      "image_size": config.data.image_size,
      "image_tokens": setup.num_image_tokens,
      "vocab_size": vocab_size,
    },
    "params": {
      "total": setup.num_params,
      "trainable": setup.num_trainable,
      "frozen": setup.num_params - setup.num_trainable,
    },
    "bytes_per_device": {
      "params": bytes_per_device(setup.abstract["params"]),
      "opt_state": bytes_per_device(setup.abstract["opt_state"]),
      "batch": bytes_per_device(batch),
      "step": bytes_per_device(setup.abstract["step"]),
    },
    "memory_analysis": {
      "arguments": mem.argument_size_in_bytes,
      "outputs": mem.output_size_in_bytes,
      "aliased": mem.alias_size_in_bytes,
      "temps": mem.temp_size_in_bytes,
      "generated_code": mem.generated_code_size_in_bytes,
      "peak_estimate": peak,
    },
    "groups": group_summary(setup, tuple(phase_cfg.train.param_groups)),
    "flops": {
      "model_per_step": model_flops,
      "executed_per_step_no_remat": step_flops.executed,
      "xla_cost_analysis_per_step": flops_lib.xla_flops(compiled) * n_dev,
      "model_per_text_token": model_flops / step_flops.text_tokens,
      "by_part": step_flops.by_part,
      "formula": step_flops.formula,
    },
    "fit": {
      "chip": chip,
      "hbm_bytes": hbm,
      "fits": None if hbm is None else peak <= hbm,
      # The time one step would take at 100% MFU on `chip`, for planning.
      "ideal_step_seconds": (
        None if chip is None else model_flops / (flops_lib.PEAK_FLOPS[chip] * n_dev)
      ),
    },
    "seconds": {"setup": t1 - t0, "lower": t2 - t1, "compile": t3 - t2},
  }
  return report


def _size(n: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n:.0f} B"


def format_report(report: Mapping[str, Any]) -> str:
  """A human-readable summary of a ``dry_run`` report."""
  c, b, p = report["config"], report["batch"], report["params"]
  by, mem, fl, fit = (
    report["bytes_per_device"],
    report["memory_analysis"],
    report["flops"],
    report["fit"],
  )
  lines = [
    f"dry run: {c['vit']} + {c['connector']} + {c['llm']} ({c['dtype']}, remat "
    f"{c['remat_policy']}), phase {c['phase']}",
    f"mesh {report['mesh']} on {report['devices']['count']} x {report['devices']['kind']}",
    f"batch {b['batch_size']} x ({b['image_tokens']} image + {b['seq_len']} text tokens), "
    f"vocab {b['vocab_size']}",
    f"params {p['total']:,} (trainable {p['trainable']:,}, frozen {p['frozen']:,})",
    "per device:",
    f"  params     {_size(by['params'])}",
    f"  opt state  {_size(by['opt_state'])}",
    f"  batch      {_size(by['batch'])}",
    f"  XLA memory_analysis: arguments {_size(mem['arguments'])}, outputs {_size(mem['outputs'])}, "
    f"aliased {_size(mem['aliased'])}, temps {_size(mem['temps'])}",
    f"  peak estimate (args + outputs - aliased + temps) {_size(mem['peak_estimate'])}",
  ]
  if fit["chip"]:
    verdict = "fits" if fit["fits"] else "DOES NOT FIT"
    lines.append(f"  {verdict} in {fit['chip']} HBM ({_size(fit['hbm_bytes'])})")
  lines.append("parameter groups:")
  for label, g in report["groups"].items():
    lines.append(
      f"  {label}: {g['rule']}: {g['arrays']} arrays, {g['params']:,} params, "
      f"{_size(g['bytes_per_device'])}/device"
    )
    for spec, s in g["specs"].items():
      lines.append(
        f"    {spec:36s} {s['arrays']:4d} arrays {s['params']:>15,} params  e.g. {s['example']}"
      )
  lines += [
    f"model FLOPs/step {fl['model_per_step']:.4g} ({fl['model_per_text_token']:.4g} per text "
    f"token); executed without remat {fl['executed_per_step_no_remat']:.4g}; XLA cost analysis "
    f"{fl['xla_cost_analysis_per_step']:.4g} (a scanned stack's body counted once)",
    "  by part: " + ", ".join(f"{k} {v:.3g}" for k, v in fl["by_part"].items()),
  ]
  if fit["ideal_step_seconds"] is not None:
    lines.append(f"  at 100% MFU on {fit['chip']}: {fit['ideal_step_seconds']:.3f} s/step")
  s = report["seconds"]
  lines.append(f"setup {s['setup']:.1f} s, lower {s['lower']:.1f} s, compile {s['compile']:.1f} s")
  return "\n".join(lines)


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
  """``"data=2,fsdp=4"`` -> ``(("data", 2), ("fsdp", 4), ("tensor", 1))`` (-1 fills)."""
  sizes = dict.fromkeys(mesh_lib.MESH_AXES, 1)
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name.strip() not in sizes:
      raise ValueError(f"--mesh item {item!r} must be AXIS=SIZE with AXIS in {mesh_lib.MESH_AXES}")
    try:
      sizes[name.strip()] = int(value)
    except ValueError:
      raise ValueError(f"--mesh item {item!r}: size must be an integer") from None
  return tuple(sizes.items())


def _cli() -> None:
  """``python -m compact_jax.train.dry_run``; flags are defined here, not at import,
  so that the launcher can import this module next to its own ``--config``."""
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file(
    "config", None, "Config file (path[:arg]).", lock_config=True
  )
  mesh = flags.DEFINE_string(
    "mesh", "", "Mesh sizes, e.g. 'fsdp=8' or 'data=2,fsdp=4' (overrides config.mesh)."
  )
  simulated = flags.DEFINE_integer(
    "simulated_devices", 8, "Simulated CPU devices to compile for (0: this host's devices)."
  )
  phase = flags.DEFINE_string("phase", "train", "Training phase whose optimizer and batch to use.")
  vocab = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0: the LLM variant's).")
  seq_len = flags.DEFINE_integer("seq_len", 0, "Text tokens per example (0: the longest bucket).")
  chip = flags.DEFINE_string(
    "chip", "", f"Judge the fit against this chip's HBM, one of {sorted(flops_lib.HBM_BYTES)}."
  )
  json_out = flags.DEFINE_string("json_out", "", "Also write the report as JSON here.")
  flags.mark_flags_as_required(["config"])

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = config_flag.value
    if mesh.value:
      with config.unlocked():
        config.mesh = parse_mesh(mesh.value)
    if simulated.value:
      # Before jax starts a backend (nothing imported above touches one).
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", simulated.value)
    report = dry_run(
      config,
      phase=phase.value,
      vocab_size=vocab.value or None,
      seq_len=seq_len.value or None,
      chip=chip.value or None,
    )
    print(format_report(report))
    if json_out.value:
      with open(json_out.value, "w") as f:
        json.dump(report, f, indent=1)

  logging.getLogger().setLevel(logging.INFO)
  app.run(main)


if __name__ == "__main__":
  _cli()
