"""The ``vision`` stage: pretrain the tiny world's vision tower on dense cell labels.

A real COMPACT run starts from a pretrained SigLIP tower; a tiny-world model starts
from random weights, and through the language model alone its vision tower learns
only what covers the whole picture (ground, counts) within the run's budget: the
decoder must learn where to look before the tower gets any signal about what a
sprite, letter or motion cue looks like. This stage is the tiny world's stand-in for
SigLIP's pretraining: the tower (the same ``img/...`` parameters the VLM uses) is
trained to name, for every cell of every *train* image, its ground, its row and
column, whether a rope shows in it, and its object's colour, kind, letter, motion and
whether a rope ties it (an "empty" class when there is none), from the scene graphs
the generate stage wrote. That is a dense captioning objective with one small linear
head per attribute, cheap because no language model runs. A real SigLIP's patch
tokens keep where they are; these labels make the tiny tower's keep it too.

Nothing here touches questions or answers, and test images are never read for
training (they are only used to report how well the tower sees). Only the tower's
parameters are kept: ``WORKDIR/vision/img.npz`` in big_vision layout
(``params/img/...``), which the train phase loads through ``config.model_init``;
the heads are dropped.

Writes ``WORKDIR/vision/``: ``img.npz``, ``report.json`` (per-attribute accuracy on
the test images' cells; written last, it marks the stage finished) and
``accuracy.png``.

``config.vision.objective`` picks the training signal: "cells" (above), "sigmoid"
(SigLIP's contrastive loss on (train image, caption) pairs, as a real tower is
pretrained) or "both" (their sum on one tower); the last two live in
``world/contrastive.py`` and write the same files.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from compact_jax.data import image as image_lib
from compact_jax.world import render
from compact_jax.world import scene as scene_lib

REPORT_FILE = "report.json"
NPZ_FILE = "img.npz"
# config.vision.objective values; "sigmoid" and "both" are world/contrastive.py's.
OBJECTIVES = ("cells", "sigmoid", "both")
# Grid rows and columns a position label can name, counted from 1 as captions write cells.
POSITIONS: tuple[str, ...] = tuple(str(i) for i in range(1, 10))
# Visible rope pixels a cell needs to count as showing a rope (a rope grazing a
# corner can leave a sliver of one or two pixels).
ROPE_LINE_MIN_PIXELS = 3
# attribute -> its classes; index 0 of every object attribute means "no object / none".
ATTRIBUTES: dict[str, tuple[str, ...]] = {
  "ground": scene_lib.GROUNDS,
  "color": ("none", *scene_lib.COLORS),
  "kind": ("none", *scene_lib.KINDS),
  "letter": ("none", *scene_lib.LETTERS),
  "motion": ("none", *scene_lib.DIRECTIONS),
  # Whether a rope ties the cell's object to another: a rope is thin and crosses
  # cells, so without its own label the tower need not keep it (object_interaction
  # questions stayed at chance with a frozen tower trained on the five above).
  "rope": ("none", "free", "tied"),
  # Whether any rope shows in the cell, empty or not. With "rope" alone the tower was
  # taught that an empty cell crossed by a rope is just "none", and "are any objects
  # tied?" stayed at its majority answer.
  "rope_line": ("no", "yes"),
  # The cell's row and column. Nothing else here depends on where a cell is, so the
  # tower's object tokens kept little of their position embedding (a linear probe read
  # an occupied token's row at 0.44, chance 0.25), and the decoder, whose attention
  # mixes token contents, could not tell a quadrant or which of two objects is left.
  "row": POSITIONS,
  "col": POSITIONS,
}
# Attributes of every cell; the rest describe the cell's object and are scored on
# occupied cells only.
CELL_ATTRIBUTES: tuple[str, ...] = ("ground", "rope_line", "row", "col")


def chance(grid_size: int) -> dict[str, float]:
  """Uniform-guess accuracy per attribute, as ``accuracy`` scores it (object
  attributes over occupied cells, where "none" is never the answer; positions over
  the grid's ``grid_size`` rows or columns)."""
  out = {}
  for name, classes in ATTRIBUTES.items():
    if name in ("row", "col"):
      out[name] = 1 / grid_size
    else:
      out[name] = 1 / (len(classes) - (name not in CELL_ATTRIBUTES))
  return out


def vision_dir(workdir: str | os.PathLike) -> Path:
  return Path(workdir) / "vision"


def cell_labels(scene: scene_lib.Scene, image_size: int) -> np.ndarray:
  """int32[G * G, A]: per cell (row-major) the class index of each of the A ATTRIBUTES.

  ``image_size`` is the size the scene was rendered at (where a rope shows depends on it).
  """
  g = scene.grid_size
  if g > len(POSITIONS):
    raise ValueError(f"vision: cell labels name rows 1-{len(POSITIONS)}; grid_size is {g}")
  names = list(ATTRIBUTES)
  out = np.zeros((g * g, len(ATTRIBUTES)), np.int32)
  c = image_size // g
  rope = render.rope_pixels(scene, image_size).reshape(g, c, g, c).sum((1, 3))
  for r in range(g):
    for col in range(g):
      cell = out[r * g + col]
      cell[names.index("ground")] = ATTRIBUTES["ground"].index(scene.ground_at(r, col))
      cell[names.index("rope_line")] = int(rope[r, col] >= ROPE_LINE_MIN_PIXELS)
      cell[names.index("row")] = r
      cell[names.index("col")] = col
  tied = {i for link in scene.links for i in link}
  for i, o in enumerate(scene.objects):
    cell = out[o.row * g + o.col]
    cell[names.index("color")] = ATTRIBUTES["color"].index(o.color)
    cell[names.index("kind")] = ATTRIBUTES["kind"].index(o.kind)
    cell[names.index("letter")] = ATTRIBUTES["letter"].index(o.letter or "none")
    cell[names.index("motion")] = ATTRIBUTES["motion"].index(o.motion or "none")
    cell[names.index("rope")] = ATTRIBUTES["rope"].index("tied" if i in tied else "free")
  return out


def patch_cells(grid_size: int, image_size: int, patch: int) -> np.ndarray:
  """int32[N]: the grid cell (row-major) under each patch of the tower.

  Raises unless patches tile cells exactly (a patch straddling two cells has no
  single label).
  """
  cell = image_size / grid_size
  side = image_size // patch
  if side * patch != image_size or (cell % patch and patch % cell):
    raise ValueError(
      f"vision: {patch}px patches do not tile a {grid_size}x{grid_size} grid of "
      f"{image_size}px images (cells are {cell:g}px)"
    )
  centers = (np.arange(side) + 0.5) * patch
  rows = (centers // cell).astype(np.int32)
  return (rows[:, None] * grid_size + rows[None, :]).reshape(-1)


def load_split(generate_dir: Path, split: str, image_size: int, limit: int = -1):
  """(images float32[n, S, S, 3], labels int32[n, G*G, A], grid_size) of a split."""
  images, labels, grid = [], [], None
  path = generate_dir / "scenes" / f"{split}.jsonl"
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if 0 <= limit < n:
        break
      d = json.loads(line)
      scene = scene_lib.Scene.from_json(d["scene"], where=f"{path}:{n}")
      grid = scene.grid_size
      image_path = generate_dir / "images" / split / f"{d['id']}.png"
      png = image_path.read_bytes()
      images.append(image_lib.preprocess_image(png, image_size, where=str(image_path)))
      labels.append(cell_labels(scene, _png_size(png, where=str(image_path))))
  if not images:
    raise ValueError(f"vision: no scenes in {path}")
  return np.stack(images), np.stack(labels), grid


def _png_size(png: bytes, *, where: str) -> int:
  """The side of a square PNG (its IHDR width), the size its scene was rendered at."""
  if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
    raise ValueError(f"vision: {where} is not a PNG")
  width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
  if width != height:
    raise ValueError(f"vision: {where} is {width}x{height}; tiny-world images are square")
  return width


def num_classes() -> int:
  """Output width of the per-attribute heads (all ATTRIBUTES' classes side by side)."""
  return sum(len(v) for v in ATTRIBUTES.values())


def split_attributes(logits: jax.Array) -> list[jax.Array]:
  """float[..., num_classes()] -> per attribute float[..., classes]."""
  sizes = np.cumsum([len(v) for v in ATTRIBUTES.values()])[:-1]
  return jnp.split(logits, sizes, axis=-1)


def cell_loss(logits: list[jax.Array], labels: jax.Array) -> jax.Array:
  """Sum over attributes of the mean cross-entropy.

  Args:
    logits: per attribute float32[B, N, classes] (``split_attributes``).
    labels: int32[B, N, A] class indices under each patch.
  """
  return sum(
    optax.softmax_cross_entropy_with_integer_labels(lg, labels[..., a]).mean()
    for a, lg in enumerate(logits)
  )


class CellProbe(nnx.Module):
  """The VLM's vision tower plus one linear head per attribute on every patch token."""

  def __init__(self, tower: nnx.Module, width: int, *, rngs: nnx.Rngs):
    self.img = tower
    self.heads = nnx.Linear(width, num_classes(), rngs=rngs)

  def __call__(self, image: jax.Array) -> list[jax.Array]:
    """float32[B, S, S, 3] -> per attribute float32[B, N, classes] logits."""
    z, _ = self.img(image)
    return split_attributes(self.heads(z))


def _loss(model: CellProbe, image, labels):
  return cell_loss(model(image), labels)


@nnx.jit(donate_argnums=(0, 1))
def _train_step(model: CellProbe, opt: nnx.Optimizer, image, labels):
  loss, grads = nnx.value_and_grad(_loss)(model, image, labels)
  opt.update(model, grads)
  return loss


@nnx.jit
def _predict(model: CellProbe, image):
  return jnp.stack([jnp.argmax(lg, -1) for lg in model(image)], axis=-1)


def accuracy(model: CellProbe, images, labels, patch_to_cell, batch: int) -> dict[str, float]:
  """Per-attribute accuracy over cells; object attributes over occupied cells only."""
  preds = []
  for i in range(0, len(images), batch):
    chunk = images[i : i + batch]
    pad = batch - len(chunk)
    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    preds.append(np.asarray(_predict(model, chunk))[: batch - pad])
  return cell_accuracy(np.concatenate(preds), labels, patch_to_cell)


def cell_accuracy(pred: np.ndarray, labels: np.ndarray, patch_to_cell: np.ndarray):
  """Per-attribute accuracy of ``pred`` int[n, N, A] (per patch) against ``labels``
  int[n, G*G, A] (per cell); object attributes over occupied cells only."""
  truth = labels[:, patch_to_cell]
  occupied = truth[..., list(ATTRIBUTES).index("kind")] > 0
  out = {}
  for a, name in enumerate(ATTRIBUTES):
    hit = pred[..., a] == truth[..., a]
    out[name] = float(hit.mean() if name in CELL_ATTRIBUTES else hit[occupied].mean())
  return out


def _plot(report: dict[str, Any], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(ATTRIBUTES)
  fig, ax = plt.subplots(figsize=(5, 3))
  ax.bar(names, [report["test_accuracy"][n] for n in names], color="tab:blue")
  chance = [report["chance"][n] for n in names]
  ax.plot(names, chance, "k_", markersize=20, label="chance")
  ax.set_ylim(0, 1.02)
  ax.set_ylabel("cell accuracy (test images)")
  ax.set_title(f"vision tower after {report['steps']} steps")
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def finished_report(config: ml_collections.ConfigDict, report_path: Path) -> dict | None:
  """The report of a finished run of this stage (None: run it).

  Raises when the finished run used another ``vision.objective``: its tower is not
  the one the config asks for.
  """
  if not report_path.exists() or config.overwrite:
    return None
  report = json.loads(report_path.read_text())
  done = report.get("objective", "cells")  # the "cells" report predates the key
  if done != config.vision.objective:
    raise ValueError(
      f"vision: {report_path} was written with vision.objective={done!r}, but the config "
      f"asks for {config.vision.objective!r}; pass --overwrite or use another workdir"
    )
  logging.info("vision: finished already (%s); pass --overwrite to redo", report_path)
  return report


def write_tower(flat: dict[str, np.ndarray], out: Path) -> Path:
  """Writes the VLM tower's params (``img/...`` paths) as ``out/img.npz`` in big_vision layout."""
  from compact_jax.checkpoints import big_vision

  npz = out / NPZ_FILE
  big_vision.export_npz(flat, str(npz) + ".tmp.npz", {"img/": "params/img/"})
  os.replace(str(npz) + ".tmp.npz", npz)
  return npz


def write_report(report: dict[str, Any], report_path: Path) -> None:
  """Writes ``report.json`` atomically; it is written last and marks the stage finished."""
  tmp = report_path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(report, indent=1))
  os.replace(tmp, report_path)


def run_vision(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Pretrains ``config.model``'s vision tower on the generate stage's train scenes."""
  from compact_jax.train import mesh as mesh_lib
  from compact_jax.train import state as state_lib

  if config.vision.objective not in OBJECTIVES:
    raise ValueError(
      f"config.vision.objective={config.vision.objective!r}; choose from {OBJECTIVES}"
    )
  if config.vision.objective != "cells":
    from compact_jax.world import contrastive  # imports this module

    return contrastive.run_contrastive(config, workdir)
  out = vision_dir(workdir)
  report_path = out / REPORT_FILE
  if (report := finished_report(config, report_path)) is not None:
    return report
  out.mkdir(parents=True, exist_ok=True)
  cfg = config.vision
  gen = Path(workdir) / "generate"
  size = config.data.image_size
  x_train, y_train, grid = load_split(gen, "train", size)
  x_test, y_test, _ = load_split(gen, "test", size, limit=cfg.eval_images)

  vlm = state_lib.build_model(config.model, vocab_size=8, image_size=size, seed=config.seed)
  tower = vlm.img
  # The tower's own patch size: num_image_tokens counts connector tokens (pixel
  # shuffle, resampler, dynamic-resolution tiles), not patches.
  patch = tower.variant.patch_size
  to_cell = patch_cells(grid, size, patch)
  width = nnx.state(tower, nnx.Param)["embedding"]["kernel"].shape[-1]
  model = CellProbe(tower, width, rngs=nnx.Rngs(config.seed + 1))
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, cfg.lr, min(cfg.warmup_steps, cfg.total_steps - 1), cfg.total_steps, cfg.lr * 0.05
  )
  opt = nnx.Optimizer(
    model, optax.adamw(schedule, b2=0.98, weight_decay=cfg.weight_decay), wrt=nnx.Param
  )
  rng = np.random.default_rng([config.seed, 7])
  t0 = time.time()
  loss = float("nan")
  for step in range(1, cfg.total_steps + 1):
    idx = rng.integers(0, len(x_train), cfg.batch_size)
    loss = _train_step(model, opt, x_train[idx], y_train[idx][:, to_cell])
    if step % cfg.log_every_steps == 0 or step == cfg.total_steps:
      loss = float(loss)
      if not np.isfinite(loss):
        raise FloatingPointError(f"vision: non-finite loss at step {step}; lower vision.lr")
      rate = step / max(time.time() - t0, 1e-9)
      logging.info(
        "vision step %d/%d loss %.4f  %.2f steps/s  ETA %.0fs",
        step,
        cfg.total_steps,
        loss,
        rate,
        (cfg.total_steps - step) / rate,
      )
  test_acc = accuracy(model, x_test, y_test, to_cell, cfg.batch_size)
  logging.info("vision: test cell accuracy %s", {k: round(v, 3) for k, v in test_acc.items()})

  flat = {
    k: np.asarray(v)
    for k, v in mesh_lib.path_names(nnx.to_pure_dict(nnx.state(model.img, nnx.Param))).items()
  }
  npz = write_tower({f"img/{k}": v for k, v in flat.items()}, out)
  report = {
    "steps": cfg.total_steps,
    "seconds": round(time.time() - t0, 1),
    "final_loss": float(loss),
    "train_images": len(x_train),
    "test_images": len(x_test),
    "test_accuracy": test_acc,
    "chance": chance(grid),
    "npz": str(npz),
  }
  _plot(report, out / "accuracy.png")
  write_report(report, report_path)
  return report
