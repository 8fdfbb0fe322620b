"""Training phases (``train``, ``pretrain``): resume-or-init, step, log, checkpoint.

A phase is a launcher stage of the same name configured by ``config.<phase>``
(``configs/base.py`` ``train_phase()``): it trains on the built split
``config.<phase>.split`` and may start from another phase's final params
(``init_from``). It reads ``WORKDIR/build/`` (the TFDS dataset and tokenizer)
and writes ``WORKDIR/<phase>/``:
- ``checkpoints/<step>/`` Orbax checkpoints (state, data iterator, meta);
- ``metrics.jsonl`` one line per log step (also TensorBoard events in ``tb/``):
  loss, lr per param group (``lr/<group>``), gradient/param/update norms,
  throughput, compile count, achieved TFLOP/s and MFU (flops.py), skipped
  steps; eval-hook lines (``eval/...``, and ``eval/<benchmark>/<metric>`` with
  ``eval_benchmarks``) share the file;
- ``eval_benchmarks/<step>/<benchmark>.jsonl`` the periodic benchmarks' predictions;
- ``trainable_params.npz`` with ``save_adapters_only``: only the trained params;
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
from compact_jax.models import anyres
from compact_jax.train import checkpoint as checkpoint_lib
from compact_jax.train import flops as flops_lib
from compact_jax.train import mesh as mesh_lib
from compact_jax.train import optimizer as optimizer_lib
from compact_jax.train import state as state_lib
from compact_jax.train import step as step_lib

METRICS_FILE = "metrics.jsonl"
# Written at the end of a phase with save_adapters_only: only the trained params.
TRAINABLE_PARAMS_FILE = "trainable_params.npz"
# Training metrics a checkpoint records (means since the previous checkpoint), which
# best_metric may name besides eval-hook metrics ("eval/<name>").
CHECKPOINT_METRICS = ("loss", "token_accuracy")
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
    params = ckpt.restore_params(setup.abstract["params"], step)
  finally:
    ckpt.close()
  logging.info("Initialised params from phase %r step %d (%s)", source, step, directory)
  return params


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
    # Eval-hook lines share the file and carry no training loss.
    rows = [r for r in map(json.loads, filter(str.strip, f)) if "loss" in r]
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


class TrainEvalHook:
  """The eval stage's tiny-world accuracy on a held-out subset, during training, and
  any benchmarks of the suite.

  Reuses ``compact_jax.eval.run`` (questions, prompt suffix, the bucketed greedy
  ``Predictor``, exact match and the by-k table) on the first ``max_examples``
  questions of ``config.eval.split``. ``benchmarks`` run through the benchmarks
  stage's code path (``bench_run.PeriodicBenchmarks``: ``config.bench``'s data dir,
  prompts, decoding and metrics) on their first ``max_examples`` questions; their
  files are read here, so missing data fails before training starts. Decoders
  compile once; each call only swaps in the current params.
  """

  def __init__(
    self,
    config,
    workdir: str,
    tokenizer,
    mesh,
    *,
    max_examples: int,
    benchmarks: tuple[str, ...] = (),
    benchmarks_dir: str | None = None,
  ):
    # Imported here: compact_jax.eval.run imports this module.
    from compact_jax.eval import bench_run
    from compact_jax.eval import run as eval_run

    self._metrics = eval_run.metrics_lib
    source = build_lib.load_split(config, workdir, config.eval.split)
    self.questions, rec_index = eval_run.collect_questions(source, max_examples=max_examples)
    if not self.questions:
      raise ValueError(f"eval hook: split {config.eval.split!r} has no question/answer pairs")
    size = config.data.image_size
    self.prompts = [
      eval_run.with_suffix(q.question, config.eval.prompt_suffix) for q in self.questions
    ]
    # The train pipeline's preprocessing (tiles too, with model.dynamic_res).
    prep = eval_run.image_preprocessor(config)
    self.images, self.layouts, self.has_image = [], [], []
    for r in rec_index:
      rec = source[r]
      self.has_image.append(bool(rec["has_image"]))
      image, layout = prep(
        rec["image"] if rec["has_image"] else None, where=f"record {rec['id']!r}"
      )
      self.images.append(image)
      self.layouts.append(layout)
    self.tiled = prep.tiling is not None
    self.batch_size = config.eval.batch_size
    self.mesh = mesh
    self._make_predictor = lambda graphdef, params: eval_run.Predictor(
      graphdef, params, tokenizer, template_lib.TEMPLATES[config.data.template], config, mesh
    )
    self._predictor = None
    self.benchmarks = None
    if benchmarks:
      self.benchmarks = bench_run.PeriodicBenchmarks(
        config, benchmarks, checkpoint_workdir=workdir, tokenizer=tokenizer,
        template=template_lib.TEMPLATES[config.data.template], image_size=size, mesh=mesh,
        max_examples=max_examples, out_dir=benchmarks_dir,
      )  # fmt: skip

  def __call__(self, graphdef, params, *, step: int = 0) -> dict[str, float]:
    """``accuracy`` overall and ``accuracy_k<k>`` per k, and ``n`` questions; with
    benchmarks also ``<benchmark>/<metric>`` (``headline`` and the other scalars)."""
    if self._predictor is None:
      self._predictor = self._make_predictor(graphdef, params)
    self._predictor.params = params
    preds = []
    for i in range(0, len(self.prompts), self.batch_size):
      sl = slice(i, i + self.batch_size)
      preds += self._predictor(
        self.prompts[sl],
        np.stack(self.images[sl]),
        np.asarray(self.has_image[sl]),
        np.stack(self.layouts[sl]) if self.tiled else None,
      )
    correct = [self._metrics.exact_match(p, q.answer) for p, q in zip(preds, self.questions)]
    out = self._split_metrics(correct)
    if self.benchmarks is not None:
      out.update(self.benchmarks(graphdef, params, step=step))
    return out

  def _split_metrics(self, correct: list[bool]) -> dict[str, float]:
    table = self._metrics.accuracy_table(self.questions, correct)
    out = {"accuracy": table["overall"]["all"]["accuracy"], "n": float(len(correct))}
    out.update({f"accuracy_k{k}": v["accuracy"] for k, v in table["by_k"].items()})
    return out

  def split_metric_names(self) -> list[str]:
    """The eval split's metric names (without ``eval/``), known before any step: what
    ``best_metric`` may name besides ``<benchmark>/<metric>``."""
    return sorted(self._split_metrics([False] * len(self.questions)))


def iterator_remap_message(saved_processes: int, processes: int, step: int) -> str:
  """What a resume with another process count does to the data order (logged).

  The model and optimizer state restore exactly onto any mesh; the data cannot.
  Each host reads ``examples[host::processes]`` shuffled, and the checkpointed
  iterator state is the number of batches taken (``next_index``, equal on every
  host because every step takes one batch per host), so it is reused as is.
  """
  return (
    f"Checkpoint step {step} was written by {saved_processes} process(es); this run has "
    f"{processes}. Params and optimizer state restore exactly, but the data order cannot: "
    f"each host now reads its new shard (every {processes}th example, reshuffled) from batch "
    f"{step}, the same point of the epoch. The batches from here on differ from an "
    f"uninterrupted {saved_processes}-process run; until this epoch ends some examples are "
    "seen twice and others not at all; from the next epoch every example is again seen once "
    "per epoch."
  )


def nonfinite_message(step: int, loss: float, grad_norm: float, last_good: int | None) -> str:
  where = (
    f"The last good checkpoint is step {last_good}; a rerun resumes from it."
    if last_good is not None
    else "No checkpoint has been written yet (the last good checkpoint: none); a rerun "
    "starts from scratch."
  )
  return (
    f"Non-finite loss or gradient at step {step} (loss={loss}, grad_norm={grad_norm}). "
    f"{where} Lower train.lr, check the data, or set train.nonfinite='skip'."
  )


def peak_flops_per_device(cfg: ml_collections.ConfigDict, device_kind: str) -> float | None:
  """``cfg.peak_flops_per_device``, else the device kind's entry in flops.PEAK_FLOPS."""
  if cfg.peak_flops_per_device:
    return float(cfg.peak_flops_per_device)
  chip = flops_lib.chip_name(device_kind)
  return flops_lib.PEAK_FLOPS[chip] if chip else None


def flops_per_bucket(
  config: ml_collections.ConfigDict, setup: state_lib.StateSetup, vocab_size: int
) -> dict[int, float] | None:
  """Model FLOPs of one train step per text-length bucket (flops.step_flops), or None
  (logged) when the FLOP model does not know this model's parameters."""
  if step_lib.is_tiled(config):
    logging.warning(
      "No FLOP/MFU logging: the FLOP model does not count dynamic-resolution tiles "
      "(model.dynamic_res.mode=%r)",
      config.model.dynamic_res.mode,
    )
    return None
  shapes, trained = flops_lib.shapes_and_trainable(setup.abstract["params"], setup.trainable)
  out = {}
  try:
    for length in config.data.seq_buckets:
      out[int(length)] = flops_lib.step_flops(
        config.model,
        vocab_size=vocab_size,
        image_size=config.data.image_size,
        batch_size=config.train.batch_size,
        seq_len=int(length),
        shapes=shapes,
        trainable=trained,
      ).model
  except ValueError as e:
    logging.warning("No FLOP/MFU logging: %s", e)
    return None
  return out


def batch_counts(host_batch: dict[str, np.ndarray], image_tokens: int) -> tuple[int, int]:
  """(examples, LLM tokens that are not padding) of a host batch, unpacked or packed."""
  if "segment_ids" in host_batch:
    # Packed: segments are numbered 1.. per row, and image tokens are valid positions.
    examples = int(host_batch["segment_ids"].max(axis=1).sum())
    return examples, int(host_batch["mask_input"].sum())
  tokens = int(host_batch["mask_input"].sum()) + image_tokens * int(host_batch["has_image"].sum())
  return len(host_batch["tokens"]), tokens


def export_trainable_params(params: Any, trainable: Any, path: str) -> list[str]:
  """Writes only the trained params to ``path`` (npz, '/'-joined keys); returns the keys.

  With LoRA these are the adapters (and anything else trained, e.g. the
  connector): the file a user ships on top of the frozen base weights.
  """
  from jax.experimental import multihost_utils

  names = mesh_lib.path_names(params)
  keep = {k for k, t in mesh_lib.path_names(trainable).items() if t}
  # process_allgather: on several hosts each holds only its shards.
  arrays = multihost_utils.process_allgather({k: names[k] for k in sorted(keep)}, tiled=True)
  if jax.process_index() == 0:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)
  return sorted(keep)


def eval_benchmark_names(config: ml_collections.ConfigDict, phase: str) -> tuple[str, ...]:
  """``config.<phase>.eval_benchmarks`` ("mme,pope" or a tuple) as names, checked: known
  benchmarks, an eval hook that runs, and a ``config.bench`` section to run them with."""
  cfg = config.train
  value = cfg.eval_benchmarks
  if not value:
    return ()
  from compact_jax.eval import bench_run  # compact_jax.eval imports this module

  where = f"config.{phase}.eval_benchmarks={value!r}"
  try:
    names = bench_run.parse_names(value)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  if not cfg.eval_every_steps:
    raise ValueError(f"{where} needs config.{phase}.eval_every_steps > 0")
  if "bench" not in config:
    raise ValueError(
      f"{where}: the config has no `bench` section (data dir, decoding, judge) to run them "
      "with; add `c.bench = eval_config.bench_config()` (from configs import eval as "
      "eval_config) to the config file"
    )
  return names


def _validate_phase(cfg: ml_collections.ConfigDict, phase: str, data_devices: int) -> None:
  if cfg.nonfinite not in step_lib.NONFINITE_MODES:
    raise ValueError(
      f"config.{phase}.nonfinite must be one of {step_lib.NONFINITE_MODES}: {cfg.nonfinite!r}"
    )
  if cfg.best_mode not in ("min", "max"):
    raise ValueError(f"config.{phase}.best_mode must be 'min' or 'max': {cfg.best_mode!r}")
  if cfg.best_metric and not (
    cfg.best_metric in CHECKPOINT_METRICS or cfg.best_metric.startswith("eval/")
  ):
    raise ValueError(
      f"config.{phase}.best_metric={cfg.best_metric!r}: choose from {list(CHECKPOINT_METRICS)} "
      "or an eval-hook metric 'eval/<name>'"
    )
  if cfg.best_metric.startswith("eval/") and not cfg.eval_every_steps:
    raise ValueError(
      f"config.{phase}.best_metric={cfg.best_metric!r} is an eval metric but "
      f"config.{phase}.eval_every_steps is 0"
    )
  if cfg.accum_steps < 1 or cfg.batch_size % (cfg.accum_steps * data_devices):
    raise ValueError(
      f"config.{phase}.batch_size {cfg.batch_size} must split into accum_steps="
      f"{cfg.accum_steps} microbatches, each divisible by {data_devices} data-parallel devices"
    )


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
  _validate_phase(cfg, phase, data_devices)
  bench_names = eval_benchmark_names(config, phase)
  if cfg.best_metric.startswith("eval/") and cfg.best_metric.count("/") >= 2:
    bench = cfg.best_metric.split("/")[1]
    if bench not in bench_names:
      raise ValueError(
        f"config.{phase}.best_metric={cfg.best_metric!r} names benchmark {bench!r}, which "
        f"config.{phase}.eval_benchmarks ({list(bench_names)}) does not run"
      )
  setup, init_fn = state_lib.setup_state(config, vocab_size=tokenizer.vocab_size, mesh=mesh)
  logging.info(
    "Model: %s params, %s trainable; groups %s",
    f"{setup.num_params:,}",
    f"{setup.num_trainable:,}",
    {k: len(v) for k, v in setup.group_members.items()},
  )
  logging.info(
    "Learning-rate groups (logged as lr/<name>): %s",
    {
      name: cfg.param_groups[int(label[1:])][0]
      for label, name in optimizer_lib.group_names(cfg.param_groups).items()
    },
  )
  packed = step_lib.is_packed(config)
  # flops.step_flops models one example per row; packed rows are not modelled yet.
  step_flops = None if packed else flops_per_bucket(config, setup, tokenizer.vocab_size)
  if packed:
    logging.info("Packed rows of %d positions: no FLOP/MFU logging", config.data.pack_length)
  peak = peak_flops_per_device(cfg, mesh.devices.flat[0].device_kind)
  if step_flops is not None:
    logging.info(
      "FLOPs per step by text bucket %s; MFU = model FLOPs / s / (%s FLOP/s per device x %d "
      "devices); FLOP model: %s",
      {k: f"{v:.3g}" for k, v in step_flops.items()},
      f"{peak:.3g}" if peak else "unknown (set train.peak_flops_per_device)",
      mesh.devices.size,
      flops_lib.FORMULA,
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
    pack=pipeline_lib.PackSpec(
      length=config.data.pack_length,
      max_images=config.data.pack_max_images,
      window=config.data.pack_window,
      num_image_tokens=setup.num_image_tokens,
    )
    if packed
    else None,
    # The model's tiling (VLM.from_config reads the same keys).
    tiling=anyres.tiling_from_config(config.model.dynamic_res, image_size=config.data.image_size),
    pad_fill=config.data.pad_fill,
  )
  data_iter = pipeline_lib.make_iterator(dataset)
  ckpt = checkpoint_lib.Checkpointer(
    checkpoint_dir(workdir, phase),
    keep=cfg.keep_checkpoints,
    best_metric=cfg.best_metric,
    best_mode=cfg.best_mode,
    keep_best=cfg.keep_best,
  )
  meta = {
    "phase": phase,
    "vocab_size": tokenizer.vocab_size,
    "tokenizer": os.path.abspath(tokenizer.path),
    "template": template_name,
    "image_size": config.data.image_size,
    "pad_fill": list(config.data.pad_fill),
    "model": config.model.to_dict(),
    "process_count": jax.process_count(),
    "mesh": dict(mesh.shape),
  }
  writer = MetricsWriter(out_dir)
  eval_hook = None
  if cfg.eval_every_steps:
    eval_hook = TrainEvalHook(
      config, workdir, tokenizer, mesh, max_examples=cfg.eval_examples, benchmarks=bench_names,
      benchmarks_dir=os.path.join(out_dir, "eval_benchmarks"),
    )  # fmt: skip
    # A misspelt split metric fails now, not at the first eval (benchmark metrics are
    # named by their results, and checked then).
    if cfg.best_metric.startswith("eval/") and cfg.best_metric.count("/") == 1:
      names = eval_hook.split_metric_names()
      if cfg.best_metric[len("eval/") :] not in names:
        raise ValueError(
          f"config.{phase}.best_metric={cfg.best_metric!r} is not among the eval hook's "
          f"metrics {['eval/' + n for n in names]}"
        )

  latest = ckpt.latest_step()
  carried = None
  skipped_total = 0
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
      saved_processes = saved_meta.get("process_count")
      if saved_processes != jax.process_count():
        logging.warning(iterator_remap_message(saved_processes, jax.process_count(), latest))
      pipeline_lib.restore_iterator_state(data_iter, data_state["iterator"])
      # Checkpoints from before skip mode existed have no count.
      skipped_total = int(data_state.get("skipped_steps", 0))
      writer.drop_after(latest)
      resumed = latest
      logging.info(
        "Resumed from step %d (saved on mesh %s, restored onto %s)",
        latest,
        saved_meta.get("mesh"),
        dict(mesh.shape),
      )

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
    # (step, metrics, examples, tokens, flops) of a step, checked one step late.
    pending: tuple[int, Any, int, int, float] | None = None
    t0, s0, tokens_since, flops_since, examples_since = time.time(), start, 0, 0.0, 0
    # Training metrics summed since the last checkpoint (for best_metric), and
    # the latest eval-hook metrics.
    interval: dict[str, float] = {}
    interval_steps = 0
    eval_metrics: dict[str, float] = {}
    preempted = PreemptionFlag()

    def check_and_log(step: int, metrics: Any, examples: int, tokens: int, flops: float) -> None:
      nonlocal last, t0, s0, tokens_since, flops_since, examples_since
      nonlocal skipped_total, interval_steps
      # Counted here, not at dispatch, so a logged rate covers exactly its steps.
      examples_since += examples
      tokens_since += tokens
      flops_since += flops
      host = {k: float(v) for k, v in jax.device_get(metrics).items()}
      finite = np.isfinite(host["loss"]) and np.isfinite(host["grad_norm"])
      if cfg.nonfinite == "skip":
        if host["skipped"]:
          skipped_total += 1
          logging.warning(
            "Skipped step %d: non-finite loss %s or gradient norm %s; params and optimizer "
            "state kept (%d step(s) skipped so far)",
            step,
            host["loss"],
            host["grad_norm"],
            skipped_total,
          )
        host["skipped_steps"] = float(skipped_total)
      elif not finite:
        raise FloatingPointError(
          nonfinite_message(step, host["loss"], host["grad_norm"], ckpt.latest_step())
        )
      if finite:
        for k in ("loss", "token_accuracy"):
          interval[k] = interval.get(k, 0.0) + host[k]
        interval_steps += 1
      if step % cfg.log_every_steps == 0 or step == cfg.total_steps:
        dt = max(time.time() - t0, 1e-9)
        rate = (step - s0) / dt
        host["steps_per_sec"] = rate
        # Counted on this host (packed rows hold several); hosts hold equal shares.
        host["examples_per_sec"] = examples_since * jax.process_count() / dt
        host["tokens_per_sec"] = tokens_since / dt  # image + text tokens into the LLM
        host["compiles"] = train_step.num_traces
        host["recompiles"] = train_step.num_retraces
        extra = ""
        if step_flops is not None:
          achieved = flops_since / dt
          host["tflops_per_sec"] = achieved / 1e12
          host["tflops_per_sec_per_device"] = achieved / 1e12 / mesh.devices.size
          extra = f" {host['tflops_per_sec_per_device']:.3g} TFLOP/s/dev"
          if peak:
            host["mfu"] = achieved / (peak * mesh.devices.size)
            extra += f" MFU {100 * host['mfu']:.1f}%"
        lrs = " ".join(f"{k[3:]}={v:.2e}" for k, v in sorted(host.items()) if k.startswith("lr/"))
        if cfg.nonfinite == "skip":
          extra += f" skipped {skipped_total}"
        eta = (cfg.total_steps - step) / max(rate, 1e-9)
        logging.info(
          "step %d/%d (%.0f%%) loss %.4f tok_acc %.3f lr %s |g| %.3f  %.2f steps/s "
          "%.1f ex/s %.0f tok/s%s compiles %d  ETA %s",
          step,
          cfg.total_steps,
          100 * step / cfg.total_steps,
          host["loss"],
          host["token_accuracy"],
          lrs,
          host["grad_norm"],
          rate,
          host["examples_per_sec"],
          host["tokens_per_sec"],
          extra,
          train_step.num_traces,
          _fmt_duration(eta),
        )
        writer.write(step, host)
        t0, s0, tokens_since, flops_since, examples_since = time.time(), step, 0, 0.0, 0
      last = host

    def run_eval_hook(step: int) -> None:
      nonlocal t0, eval_metrics
      t_eval = time.time()
      eval_metrics = {
        f"eval/{k}": v for k, v in eval_hook(setup.graphdef, state["params"], step=step).items()
      }
      if cfg.best_metric.startswith("eval/") and cfg.best_metric not in eval_metrics:
        # A misspelt metric would otherwise keep checkpoints by recency only, silently.
        raise ValueError(
          f"config.{phase}.best_metric={cfg.best_metric!r} is not among the eval hook's "
          f"metrics {sorted(eval_metrics)}"
        )
      writer.write(step, eval_metrics)
      logging.info("eval at step %d: %s", step, eval_metrics)
      t0 += time.time() - t_eval  # eval time is not training throughput

    def checkpoint_metrics() -> dict[str, float] | None:
      nonlocal interval, interval_steps
      out = {k: v / interval_steps for k, v in interval.items()} if interval_steps else {}
      out.update(eval_metrics)
      interval, interval_steps = {}, 0
      if not cfg.best_metric:
        return None
      # Absent (no eval yet, or every step since the last save was skipped): this
      # checkpoint is kept by recency only. _validate_phase vetted the name.
      return {cfg.best_metric: out[cfg.best_metric]} if cfg.best_metric in out else None

    def save(step: int) -> None:
      ckpt.save(
        step,
        state,
        data={
          "iterator": pipeline_lib.iterator_state_to_json(data_iter),
          "skipped_steps": skipped_total,
        },
        meta=meta,
        metrics=checkpoint_metrics(),
        force=True,
      )

    step = start
    try:
      for step in range(start + 1, cfg.total_steps + 1):
        host_batch = next(data_iter)
        examples, tokens = batch_counts(host_batch, image_tokens)
        flops = step_flops[int(host_batch["tokens"].shape[1])] if step_flops else 0.0
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
        pending = (step, metrics, examples, tokens, flops)
        run_eval = eval_hook is not None and (
          step % cfg.eval_every_steps == 0 or step == cfg.total_steps
        )
        if run_eval or step % cfg.ckpt_every_steps == 0 or step == cfg.total_steps or preempted.set:
          check_and_log(*pending)  # never evaluate or checkpoint a non-finite state
          pending = None
          if run_eval:
            run_eval_hook(step)
        if step % cfg.ckpt_every_steps == 0 or step == cfg.total_steps or preempted.set:
          save(step)
          if preempted.set:
            logging.warning("SIGTERM: saved step %d and stopping; rerun to resume", step)
            break
      if pending is not None:
        check_and_log(*pending)
      if cfg.nonfinite == "skip":
        logging.info("%s: %d step(s) skipped for non-finite values", phase, skipped_total)
      if cfg.save_adapters_only and step == cfg.total_steps:
        path = os.path.join(out_dir, TRAINABLE_PARAMS_FILE)
        keys = export_trainable_params(state["params"], setup.trainable, path)
        logging.info("Exported the %d trained params to %s", len(keys), path)
      if cfg.best_metric:
        ckpt.wait()
        logging.info("%s: best checkpoint by %s: step %s", phase, cfg.best_metric, ckpt.best_step())
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
  try:
    with jax.set_mesh(mesh), sharding_lib.axis_rules(config.sharding_rules):
      # Params only: the reader's param groups (hence optimizer-state layout) may
      # differ from the writer's, e.g. an eval config on a LoRA run.
      params = ckpt.restore_params(setup.abstract["params"], step)
  except checkpoint_lib.ParamsMismatchError as e:
    raise checkpoint_lib.ParamsMismatchError(
      f"{e}. {model_config_diff(meta.get('model'), config.model.to_dict())}"
    ) from None
  finally:
    ckpt.close()
  return setup.graphdef, params, {**meta, "step": step}


def model_config_diff(written: dict | None, current: dict) -> str:
  """A sentence naming the ``model.*`` keys where the config that wrote a checkpoint
  (its meta's "model") and this run's config differ."""
  if not written:
    return "The checkpoint records no model config to compare with."

  def flat(d: dict, prefix: str = "model") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}.{k}") if isinstance(v, dict) else {f"{prefix}.{k}": v})
    return out

  a, b = flat(written), flat(current)
  diff = [
    f"{k}: checkpoint {a.get(k, '<unset>')!r}, config {b.get(k, '<unset>')!r}"
    for k in sorted(set(a) | set(b))
    if json.dumps(a.get(k), default=str) != json.dumps(b.get(k), default=str)
  ]
  if not diff:
    return "The model configs agree; the checkpoint may come from an older layout."
  return "Set the config to the checkpoint's: " + "; ".join(diff)


def latest_checkpoint_step(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike, phase: str = "train"
) -> int | None:
  del config  # the layout is fixed; kept for a uniform stage-helper signature
  directory = checkpoint_dir(workdir, phase)
  if not os.path.isdir(directory):
    return None
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
  return max(steps) if steps else None
