"""Training phases (``train``, ``pretrain``): resume-or-init, step, log, checkpoint.

A phase is a launcher stage of the same name configured by ``config.<phase>``
(``configs/base.py`` ``train_phase()``): it trains on the built split
``config.<phase>.split`` and may start from another phase's final params
(``init_from``). It reads ``WORKDIR/build/`` (the TFDS dataset and tokenizer)
and writes ``WORKDIR/<phase>/``:
- ``checkpoints/<step>/`` Orbax checkpoints (state, data iterator, meta);
- ``metrics.jsonl`` one line per log step (also TensorBoard events in ``tb/``);
- ``data_stats.json`` what tokenization did to the split (truncation, drops);
- ``loss.png`` the loss curve.

A rerun resumes from the latest checkpoint, including the data iterator, so
the batches after a resume are exactly those an uninterrupted run sees. A run
whose latest checkpoint is at ``total_steps`` is finished and is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from compact_jax import sharding as sharding_lib
from compact_jax.data import build as build_lib
from compact_jax.data import pipeline as pipeline_lib
from compact_jax.data import template as template_lib
from compact_jax.train import checkpoint as checkpoint_lib
from compact_jax.train import mesh as mesh_lib
from compact_jax.train import state as state_lib
from compact_jax.train import step as step_lib

METRICS_FILE = "metrics.jsonl"
# Launcher stages that are training phases: each reads config.<phase> and writes
# WORKDIR/<phase>/ (main.py runs them through run_train).
TRAIN_PHASES = ("pretrain", "train")


@dataclasses.dataclass
class TrainResult:
  final_step: int
  resumed_from: int | None
  last_metrics: dict[str, float]
  skipped: bool = False
  preempted: bool = False


class PreemptionFlag:
  """Turns SIGTERM (how schedulers and TPU maintenance preempt) into a flag.

  The loop checks it after each step, saves a checkpoint and returns, so the
  process exits 0 and a rerun resumes. Installed only in the main thread
  (Python's rule); elsewhere the flag simply stays unset.
  """

  def __init__(self):
    self.set = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.set = True

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def train_dir(workdir: str | os.PathLike, phase: str = "train") -> str:
  return os.path.join(os.fspath(workdir), phase)


def checkpoint_dir(workdir: str | os.PathLike, phase: str = "train") -> str:
  return os.path.join(train_dir(workdir, phase), "checkpoints")


def phase_config(config: ml_collections.ConfigDict, phase: str) -> ml_collections.ConfigDict:
  """``config`` with ``config.train`` replaced by ``config.<phase>``.

  The state, optimizer and step read ``config.train``; a phase is the same code
  under another sub-config.
  """
  if phase not in config or not isinstance(config[phase], ml_collections.ConfigDict):
    raise ValueError(f"No training phase config.{phase} (see configs/base.py train_phase)")
  if phase == "train":
    return config
  out = ml_collections.ConfigDict(config.to_dict())
  out.train = ml_collections.ConfigDict(config[phase].to_dict())
  out.lock()
  return out


def _init_from_phase(
  config: ml_collections.ConfigDict, workdir: str, source: str, mesh, vocab_size: int
):
  """The final params of phase ``source``, placed in this run's param shardings."""
  src_config = phase_config(config, source)
  directory = checkpoint_dir(workdir, source)
  ckpt = checkpoint_lib.Checkpointer(directory, keep=src_config.train.keep_checkpoints)
  try:
    step = ckpt.latest_step()
    if step is None or step < src_config.train.total_steps:
      raise FileNotFoundError(
        f"init_from={source!r}: phase {source!r} has not finished (latest checkpoint "
        f"{step} of {src_config.train.total_steps} steps in {directory}); run that stage first"
      )
    setup, _ = state_lib.setup_state(src_config, vocab_size=vocab_size, mesh=mesh)
    state, _, _ = ckpt.restore(setup.abstract, step)
  finally:
    ckpt.close()
  logging.info("Initialised params from phase %r step %d (%s)", source, step, directory)
  return state["params"]


class MetricsWriter:
  """Appends JSONL (process 0 only) and mirrors scalars to TensorBoard if available."""

  def __init__(self, directory: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(directory, METRICS_FILE)
    self._tb = None
    if self.enabled:
      os.makedirs(directory, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # optional: TensorBoard event files

        self._tb = SummaryWriter(os.path.join(directory, "tb"))
      except ImportError:
        self._tb = None

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def drop_after(self, step: int) -> None:
    """Forgets lines past ``step`` (they belong to work a crash threw away)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [ln for ln in f if ln.strip()]
    kept = []
    for ln in lines:
      try:
        if json.loads(ln)["step"] <= step:
          kept.append(ln)
      except (json.JSONDecodeError, KeyError):
        continue  # a torn last line from a kill
    with open(self.path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(self.path + ".tmp", self.path)


def _fmt_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def plot_loss(metrics_path: str, out_path: str) -> None:
  """Loss curve PNG from the metrics file."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  with open(metrics_path) as f:
    rows = [json.loads(ln) for ln in f if ln.strip()]
  if not rows:
    return
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (per answer token)")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)


def run_train(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike, phase: str = "train"
) -> TrainResult:
  """Trains ``config.model`` for phase ``config.<phase>``; resumes if possible."""
  workdir = os.fspath(workdir)
  config = phase_config(config, phase)
  out_dir = train_dir(workdir, phase)
  os.makedirs(out_dir, exist_ok=True)
  cfg = config.train
  if cfg.init_from == phase:
    raise ValueError(f"config.{phase}.init_from names the phase itself")

  tokenizer = build_lib.load_tokenizer(workdir)
  template_name = cfg.template or config.data.template
  template = template_lib.TEMPLATES[template_name]
  source = build_lib.load_split(config, workdir, cfg.split)
  stats, indices = pipeline_lib.analyze(source, tokenizer, template, config.data.seq_buckets)
  logging.info("%s: split %r: %s", phase, cfg.split, stats.summary())
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "data_stats.json"), "w") as f:
      json.dump(dataclasses.asdict(stats), f, indent=2)
  if not len(indices):
    raise ValueError(f"No trainable examples in split {cfg.split!r} (all fully masked)")

  mesh = mesh_lib.make_mesh(config.mesh)
  if cfg.batch_size % jax.process_count():
    raise ValueError(f"batch_size {cfg.batch_size} not divisible by {jax.process_count()} hosts")
  data_devices = mesh.devices.size // mesh.shape.get("tensor", 1)
  if cfg.batch_size % data_devices:
    raise ValueError(
      f"batch_size {cfg.batch_size} not divisible by {data_devices} data-parallel devices"
    )
  setup, init_fn = state_lib.setup_state(config, vocab_size=tokenizer.vocab_size, mesh=mesh)
  logging.info(
    "Model: %s params, %s trainable; groups %s",
    f"{setup.num_params:,}",
    f"{setup.num_trainable:,}",
    {k: len(v) for k, v in setup.group_members.items()},
  )

  dataset = pipeline_lib.make_train_dataset(
    source,
    indices,
    tokenizer,
    template,
    image_size=config.data.image_size,
    batch_size=cfg.batch_size // jax.process_count(),
    seq_buckets=config.data.seq_buckets,
    seed=config.seed,
    shard_index=jax.process_index(),
    shard_count=jax.process_count(),
  )
  data_iter = pipeline_lib.make_iterator(dataset)
  ckpt = checkpoint_lib.Checkpointer(checkpoint_dir(workdir, phase), keep=cfg.keep_checkpoints)
  meta = {
    "phase": phase,
    "vocab_size": tokenizer.vocab_size,
    "tokenizer": os.path.abspath(tokenizer.path),
    "template": template_name,
    "image_size": config.data.image_size,
    "model": config.model.to_dict(),
    "process_count": jax.process_count(),
  }
  writer = MetricsWriter(out_dir)

  latest = ckpt.latest_step()
  carried = None
  if latest is None and cfg.init_from:
    # Outside set_mesh: building the source phase's abstract state resolves
    # logical axis names itself.
    carried = _init_from_phase(config, workdir, cfg.init_from, mesh, tokenizer.vocab_size)
  with jax.set_mesh(mesh):
    if latest is None:
      state = init_fn()
      if carried is not None:
        state["params"] = carried
        del carried
      elif config.model_init.path:
        state["params"] = state_lib.load_model_init(
          state["params"], setup.shardings["params"], config.model_init, workdir
        )
        logging.info(
          "Initialised %s from %s", dict(config.model_init.parts), config.model_init.path
        )
      resumed = None
    else:
      state, data_state, saved_meta = ckpt.restore(setup.abstract, latest)
      if saved_meta.get("process_count") != jax.process_count():
        raise ValueError(
          f"Checkpoint {latest} was written by {saved_meta.get('process_count')} hosts; this run "
          f"has {jax.process_count()}: the data iterator state cannot be remapped exactly"
        )
      pipeline_lib.restore_iterator_state(data_iter, data_state["iterator"])
      writer.drop_after(latest)
      resumed = latest
      logging.info("Resumed from step %d", latest)

    start = int(jax.device_get(state["step"]))
    if start >= cfg.total_steps:
      logging.info(
        "%s: finished already (step %d >= total_steps %d)", phase, start, cfg.total_steps
      )
      ckpt.close()
      return TrainResult(start, resumed, {}, skipped=True)

    train_step = step_lib.TrainStep(setup, config, mesh)
    image_tokens = setup.num_image_tokens
    last: dict[str, float] = {}
    pending: tuple[int, Any] | None = None  # (step, metrics) checked one step late
    t0, s0, tokens_since = time.time(), start, 0
    preempted = PreemptionFlag()

    def check_and_log(step: int, metrics: Any) -> None:
      nonlocal last, t0, s0, tokens_since
      host = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not (np.isfinite(host["loss"]) and np.isfinite(host["grad_norm"])):
        raise FloatingPointError(
          f"Non-finite loss or gradient at step {step} (loss={host['loss']}, grad_norm="
          f"{host['grad_norm']}). The last good checkpoint is step {ckpt.latest_step()}; "
          f"lower train.lr or check the data."
        )
      if step % cfg.log_every_steps == 0 or step == cfg.total_steps:
        dt = max(time.time() - t0, 1e-9)
        rate = (step - s0) / dt
        host["steps_per_sec"] = rate
        host["examples_per_sec"] = rate * cfg.batch_size
        host["tokens_per_sec"] = tokens_since / dt  # image + text tokens into the LLM
        host["compiles"] = train_step.num_traces
        host["recompiles"] = train_step.num_retraces
        eta = (cfg.total_steps - step) / max(rate, 1e-9)
        logging.info(
          "step %d/%d (%.0f%%) loss %.4f tok_acc %.3f lr %.2e |g| %.3f  %.2f steps/s "
          "%.1f ex/s %.0f tok/s  ETA %s",
          step,
          cfg.total_steps,
          100 * step / cfg.total_steps,
          host["loss"],
          host["token_accuracy"],
          host["lr"],
          host["grad_norm"],
          rate,
          host["examples_per_sec"],
          host["tokens_per_sec"],
          _fmt_duration(eta),
        )
        writer.write(step, host)
        t0, s0, tokens_since = time.time(), step, 0
      last = host

    def save(step: int) -> None:
      ckpt.save(
        step,
        state,
        data={"iterator": pipeline_lib.iterator_state_to_json(data_iter)},
        meta=meta,
        force=True,
      )

    step = start
    try:
      for step in range(start + 1, cfg.total_steps + 1):
        host_batch = next(data_iter)
        tokens_since += int(host_batch["mask_input"].sum()) + image_tokens * int(
          host_batch["has_image"].sum()
        )
        traces = train_step.num_traces
        state, metrics = train_step(state, step_lib.to_global_batch(host_batch, mesh))
        if train_step.num_traces != traces:
          logging.info(
            "Compiled the train step for text length %d (%d compile(s) so far)",
            host_batch["tokens"].shape[1],
            train_step.num_traces,
          )
          if train_step.num_retraces:
            message = (
              f"RECOMPILED the train step at step {step} for text length "
              f"{host_batch['tokens'].shape[1]}, a shape it had compiled before: something "
              "other than the bucketed length changed (dtype, sharding, a Python value)"
            )
            if cfg.fail_on_recompile:
              raise RuntimeError(message)
            logging.error(message)
        # Reading step N-1's metrics after dispatching step N keeps the device
        # busy while the host checks for NaN.
        if pending is not None:
          check_and_log(*pending)
        pending = (step, metrics)
        if step % cfg.ckpt_every_steps == 0 or step == cfg.total_steps or preempted.set:
          check_and_log(*pending)  # never checkpoint a non-finite state
          pending = None
          save(step)
          if preempted.set:
            logging.warning("SIGTERM: saved step %d and stopping; rerun to resume", step)
            break
      if pending is not None:
        check_and_log(*pending)
    finally:
      # An exception or Ctrl-C must not lose a checkpoint that is still being
      # written in the background.
      ckpt.close()
      preempted.restore()

  if jax.process_index() == 0 and os.path.exists(writer.path):
    plot_loss(writer.path, os.path.join(out_dir, "loss.png"))
  return TrainResult(step, resumed, last, preempted=preempted.set)


def load_params(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike, mesh=None, phase: str = "train"
):
  """(graphdef, params, meta) of phase ``phase``'s latest checkpoint, for evaluation."""
  config = phase_config(config, phase)
  directory = checkpoint_dir(workdir, phase)
  ckpt = checkpoint_lib.Checkpointer(directory, keep=config.train.keep_checkpoints)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint under {directory}; run the {phase} stage")
  meta = ckpt.restore_meta(step)
  mesh = mesh or mesh_lib.make_mesh(config.mesh)
  setup, _ = state_lib.setup_state(config, vocab_size=meta["vocab_size"], mesh=mesh)
  with jax.set_mesh(mesh), sharding_lib.axis_rules(config.sharding_rules):
    state, _, meta = ckpt.restore(setup.abstract, step)
  ckpt.close()
  return setup.graphdef, state["params"], {**meta, "step": step}


def latest_checkpoint_step(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike, phase: str = "train"
) -> int | None:
  del config  # the layout is fixed; kept for a uniform stage-helper signature
  directory = checkpoint_dir(workdir, phase)
  if not os.path.isdir(directory):
    return None
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
  return max(steps) if steps else None
