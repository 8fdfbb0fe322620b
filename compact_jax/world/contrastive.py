"""SigLIP contrastive pretraining of the tiny world's vision tower (``vision.objective``).

A real COMPACT run starts from a SigLIP tower that was pretrained contrastively on
image-text pairs (Zhai et al. 2023). This is that stage for the tiny world: the
VLM's ViT, with big_vision's MAP head on top, and a text tower (``models/two_tower.py``)
learn SigLIP's sigmoid loss on (train image, dense caption) pairs, the captions
``world/caption.py`` writes (``describe(scene)``, the text of ``generate/captions.jsonl``).
With ``vision.objective = "both"`` the tower also carries the cell stage's
per-attribute heads (``world/vision.py``) and the loss is the sum of the two.

Only the tower is kept, exactly as the cell stage keeps it: ``WORKDIR/vision/img.npz``
holds the VLM's ``img/...`` params (the MAP head, the text tower, ``t`` and ``b`` are
dropped), so ``config.model_init`` loads it unchanged.

Test images are never trained on: they give the zero-shot retrieval of
``report.json`` (image -> text and text -> image recall@1 among the first
``vision.eval_images`` test images' captions) and the per-cell accuracy (the joint
heads for "both"; for "sigmoid", a linear probe fitted on the frozen tower's
features of the *train* images). ``report.json`` is written last and marks the stage
finished; a rerun skips it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from compact_jax.data.tokenizer import Tokenizer
from compact_jax.models import siglip, two_tower
from compact_jax.world import caption as caption_lib
from compact_jax.world import scene as scene_lib
from compact_jax.world import vision

# Text lengths are padded to a multiple of this (the text tower's fixed L).
TEXT_LEN_MULTIPLE = 8


def caption_texts(generate_dir: Path, split: str, limit: int = -1) -> list[str]:
  """The dense caption of every scene of a split, in ``vision.load_split``'s order."""
  path = generate_dir / "scenes" / f"{split}.jsonl"
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if 0 <= limit < n:
        break
      d = json.loads(line)
      out.append(caption_lib.describe(scene_lib.Scene.from_json(d["scene"], where=f"{path}:{n}")))
  return out


def text_length(tokenizer: Tokenizer, texts: Sequence[str]) -> int:
  """L: the longest text's tokens plus EOS, rounded up to ``TEXT_LEN_MULTIPLE``."""
  longest = max(len(tokenizer.encode(t)) for t in texts) + 1
  return -(-longest // TEXT_LEN_MULTIPLE) * TEXT_LEN_MULTIPLE


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], length: int) -> np.ndarray:
  """int32[n, length]: each text's ids, EOS, then padding (the tower pools the last
  position, which attends to the whole text).

  Raises if a text does not fit (``text_length`` sizes ``length``).
  """
  out = np.full((len(texts), length), tokenizer.pad_id, np.int32)
  for i, text in enumerate(texts):
    ids = [*tokenizer.encode(text), tokenizer.eos_id]
    if len(ids) > length:
      raise ValueError(f"caption {i} has {len(ids)} tokens with EOS, more than {length}: {text!r}")
    out[i, : len(ids)] = ids
  return out


class SigLipPretrainer(nnx.Module):
  """``TwoTower`` plus, for objective "both", the cell stage's heads on its image tokens.

  Args:
    two: the two-tower model; ``two.img`` has the VLM tower's parameters plus
      ``MAPHead_0``.
    cells: None (sigmoid only) or a ``vision.CellProbe`` whose ``img`` is ``two.img``
      itself (one tower, shared by reference).
  """

  def __init__(self, two: two_tower.TwoTower, cells: vision.CellProbe | None):
    if cells is not None and cells.img is not two.img:
      raise ValueError("SigLipPretrainer: the cell probe must share the two-tower's image tower")
    self.two = two
    self.cells = cells

  def loss(
    self, image: jax.Array, tokens: jax.Array, labels: jax.Array | None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """float32[B, S, S, 3], int32[B, L], int32[B, N, A] or None -> (loss, metrics).

    Row i of ``image`` and ``tokens`` is a matched pair; the other rows are its negatives.
    """
    # One tower pass feeds both losses (calling two() and cells() would run the
    # tower's forward twice and, worse, its backward twice).
    z, aux = self.two.img(image)
    sig = two_tower.sigmoid_loss(pair_logits(self.two, aux["pooled"], tokens))
    metrics = {"sigmoid_loss": sig}
    if self.cells is None:
      metrics["loss"] = sig
      return sig, metrics
    cells = vision.cell_loss(vision.split_attributes(self.cells.heads(z)), labels)
    metrics |= {"cell_loss": cells, "loss": sig + cells}
    return sig + cells, metrics


def pair_logits(two: two_tower.TwoTower, pooled: jax.Array, tokens: jax.Array) -> jax.Array:
  """``TwoTower.__call__``'s logits float32[B, B] from the image tower's MAP-pooled
  float[B, D] (``aux["pooled"]``) and the texts int32[B, L]."""
  zimg = pooled if two.img_head is None else two.img_head(pooled)
  zimg, ztxt = _l2_normalize(zimg.astype(jnp.float32)), _l2_normalize(two.txt(tokens))
  return jnp.einsum("BE,CE->BC", zimg, ztxt) * jnp.exp(two.t[0]) + two.b[0]


def _l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def build_model(
  config: ml_collections.ConfigDict, *, vocab_size: int, text_len: int
) -> SigLipPretrainer:
  """The two towers described by ``config.model``/``config.vision`` (random init).

  The image tower is ``config.model.vit_variant`` at ``data.image_size`` with the
  model's layer scanning, so its params (minus ``MAPHead_0``) are the VLM's ``img/``.
  """
  cfg, m = config.vision, config.model
  width = siglip.decode_variant(m.vit_variant).width
  two = two_tower.TwoTower(
    m.vit_variant,
    cfg.txt_variant or m.vit_variant,
    image_size=config.data.image_size,
    vocab_size=vocab_size,
    max_len=text_len,
    embed_dim=width,  # no img_head: the pooled vector is compared as is
    scan_layers=m.scan_layers,
    dtype=m.dtype,
    rngs=nnx.Rngs(config.seed),
  )
  cells = None
  if cfg.objective == "both":
    cells = vision.CellProbe(two.img, width, rngs=nnx.Rngs(config.seed + 1))
  return SigLipPretrainer(two, cells)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The cell stage's optimizer and schedule (``config.vision``)."""
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, cfg.lr, min(cfg.warmup_steps, cfg.total_steps - 1), cfg.total_steps, cfg.lr * 0.05
  )
  return optax.adamw(schedule, b2=0.98, weight_decay=cfg.weight_decay)


TrainStep = Callable[..., tuple[Any, Any, dict[str, jax.Array]]]


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation) -> TrainStep:
  """``step(params, opt_state, image, tokens, labels) -> (params, opt_state, metrics)``,
  jitted, donating params and optimizer state (``labels`` is None for "sigmoid")."""

  def step(params, opt_state, image, tokens, labels):
    def loss_fn(p):
      return nnx.merge(graphdef, p).loss(image, tokens, labels)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))


def distinct_batches(n: int, batch: int, steps: int, rng: np.random.Generator):
  """Yields ``steps`` int[batch] index arrays, each without repeats: consecutive
  slices of reshuffled epochs (SigLIP's negatives are the batch's other images)."""
  if batch > n:
    raise ValueError(f"vision.batch_size={batch} exceeds the {n} train images")
  order, at = rng.permutation(n), 0
  for _ in range(steps):
    if at + batch > n:
      order, at = rng.permutation(n), 0
    yield order[at : at + batch]
    at += batch


@nnx.jit
def _embed(two: two_tower.TwoTower, image, tokens):
  _, aux = two(image, tokens)
  return aux["zimg"], aux["ztxt"]


@nnx.jit
def _image_tokens(tower: nnx.Module, image):
  return tower(image)[0]


def _batched(fn, arrays: Sequence[np.ndarray], batch: int) -> list[np.ndarray]:
  """``fn`` over fixed-size chunks of ``arrays`` (the last zero-padded: one compile)."""
  outs = []
  n = len(arrays[0])
  for i in range(0, n, batch):
    chunk = [a[i : i + batch] for a in arrays]
    pad = batch - len(chunk[0])
    chunk = [np.concatenate([c, np.zeros((pad, *c.shape[1:]), c.dtype)]) for c in chunk]
    res = fn(*chunk)
    res = res if isinstance(res, tuple) else (res,)
    outs.append([np.asarray(r)[: batch - pad] for r in res])
  return [np.concatenate(parts) for parts in zip(*outs)]


def embed(
  two: two_tower.TwoTower, images: np.ndarray, tokens: np.ndarray, batch: int
) -> tuple[np.ndarray, np.ndarray]:
  """(zimg float32[n, E], ztxt float32[n, E]), l2-normalised, of matched rows."""
  zimg, ztxt = _batched(lambda i, t: _embed(two, i, t), (images, tokens), batch)
  return zimg, ztxt


def image_tokens(tower: nnx.Module, images: np.ndarray, batch: int) -> np.ndarray:
  """float32[n, N, D]: the tower's per-patch output tokens."""
  return _batched(lambda i: _image_tokens(tower, i), (images,), batch)[0]


def recall_at_1(zimg: np.ndarray, ztxt: np.ndarray, texts: Sequence[str]) -> dict[str, float]:
  """Zero-shot retrieval among n matched (image, text) pairs.

  Image i's best text (largest ``zimg_i . ztxt_j``) is a hit if it reads as text i
  (two images with the same caption are both right); likewise for each text's
  best image. Chance is a uniform pick's hit rate, 1/n when texts are distinct.

  Args:
    zimg, ztxt: float[n, E] embeddings, row i of each a pair.
    texts: the n texts.
  """
  sim = np.asarray(zimg, np.float64) @ np.asarray(ztxt, np.float64).T
  _, ids = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
  same = ids[:, None] == ids[None, :]
  n = len(ids)
  return {
    "image_to_text": float(same[np.arange(n), sim.argmax(1)].mean()),
    "text_to_image": float(same[sim.argmax(0), np.arange(n)].mean()),
    "chance": float(same.sum(1).mean() / n),
  }


def make_probe_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation) -> TrainStep:
  """The linear probe's jitted step on frozen features: ``step(params, opt_state,
  features float32[B, N, D], labels int32[B, N, A])``."""

  def step(params, opt_state, features, labels):
    def loss_fn(p):
      logits = vision.split_attributes(nnx.merge(graphdef, p)(features))
      loss = vision.cell_loss(logits, labels)
      return loss, {"loss": loss}

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))


@dataclasses.dataclass(frozen=True)
class ProbeResult:
  """A fitted linear probe's test accuracy per attribute and last training loss."""

  accuracy: dict[str, float]
  final_loss: float


def linear_probe(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
  patch_to_cell: np.ndarray,
  *,
  steps: int,
  batch: int,
  lr: float,
  seed: int,
) -> ProbeResult:
  """Fits the cell stage's per-attribute heads on frozen features; scores the test cells.

  Args:
    train_features: float32[n, N, D] tokens of train images.
    train_labels: int32[n, G*G, A] their cell labels (``vision.cell_labels``).
    test_features, test_labels: the same for the scored images.
    patch_to_cell: int32[N] (``vision.patch_cells``).
  """
  heads = nnx.Linear(train_features.shape[-1], vision.num_classes(), rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(heads, nnx.Param)
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05))
  opt_state = tx.init(params)
  step = make_probe_step(graphdef, tx)
  rng = np.random.default_rng([seed, 11])
  metrics = {"loss": jnp.nan}
  for idx in distinct_batches(len(train_features), batch, steps, rng):
    labels = train_labels[idx][:, patch_to_cell]
    params, opt_state, metrics = step(params, opt_state, train_features[idx], labels)
  logits = vision.split_attributes(nnx.merge(graphdef, params)(jnp.asarray(test_features)))
  pred = np.stack([np.asarray(jnp.argmax(lg, -1)) for lg in logits], -1)
  acc = vision.cell_accuracy(pred, test_labels, patch_to_cell)
  return ProbeResult(accuracy=acc, final_loss=float(metrics["loss"]))


def export_tower(config: ml_collections.ConfigDict, tower: nnx.Module) -> dict[str, np.ndarray]:
  """The VLM's ``img/...`` params with the trained tower's values.

  ``tower`` (a MAP-pooling ViT) lacks only what the VLM's tower adds: a connector
  inside the ViT (``img/head``, the linear connector) keeps the VLM's fresh init so
  that ``model_init`` finds every ``img/`` param. Raises if a trained param has no
  VLM counterpart of the same shape.
  """
  from compact_jax.train import mesh as mesh_lib
  from compact_jax.train import state as state_lib

  trained = {
    f"img/{k}": np.asarray(v)
    for k, v in mesh_lib.path_names(nnx.to_pure_dict(nnx.state(tower, nnx.Param))).items()
    if not k.startswith("MAPHead_0/")
  }
  vlm = nnx.eval_shape(
    lambda: state_lib.build_model(
      config.model, vocab_size=8, image_size=config.data.image_size, seed=config.seed
    )
  )
  want = {
    f"img/{k}": v
    for k, v in mesh_lib.path_names(nnx.to_pure_dict(nnx.state(vlm.img, nnx.Param))).items()
  }
  for k, v in trained.items():
    if k not in want or tuple(want[k].shape) != v.shape:
      raise ValueError(
        f"vision: trained tower param {k} {v.shape} does not match the VLM's "
        f"({want[k].shape if k in want else 'absent'})"
      )
  missing = sorted(set(want) - set(trained))
  if missing:
    fresh = state_lib.build_model(
      config.model, vocab_size=8, image_size=config.data.image_size, seed=config.seed
    )
    init = mesh_lib.path_names(nnx.to_pure_dict(nnx.state(fresh.img, nnx.Param)))
    logging.info("vision: %d VLM tower params are not pretrained (kept at init): %s",
                 len(missing), missing[:4])  # fmt: skip
    trained |= {k: np.asarray(init[k[len("img/") :]]) for k in missing}
  return trained


def _plot(report: dict[str, Any], curve: list[tuple[int, float]], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = 3 if report["test_accuracy"] else 2
  fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.2))
  steps, losses = zip(*curve)
  axes[0].plot(steps, losses, color="tab:blue")
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("train loss")
  axes[0].set_title(f"vision.objective={report['objective']}")
  r = report["retrieval"]
  axes[1].bar(["image->text", "text->image"], [r["image_to_text"], r["text_to_image"]])
  axes[1].axhline(r["chance"], color="k", linestyle="--", label=f"chance {r['chance']:.4f}")
  axes[1].set_ylim(0, 1.02)
  axes[1].set_ylabel(f"recall@1 ({report['test_images']} test images)")
  axes[1].legend(loc="upper right")
  if panels == 2:
    return _save(fig, path)
  names = list(vision.ATTRIBUTES)
  axes[2].bar(names, [report["test_accuracy"][n] for n in names], color="tab:blue")
  axes[2].plot(names, [report["chance"][n] for n in names], "k_", markersize=20, label="chance")
  axes[2].set_ylim(0, 1.02)
  axes[2].set_ylabel(f"cell accuracy ({report['probe']} heads)")
  axes[2].legend(loc="lower right")
  _save(fig, path)


def _save(fig, path: Path) -> None:
  import matplotlib.pyplot as plt

  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_contrastive(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, Any]:
  """The vision stage for ``vision.objective`` "sigmoid" or "both" (see the module doc)."""
  from compact_jax.data import build

  cfg = config.vision
  if cfg.objective not in ("sigmoid", "both"):
    raise ValueError(f"run_contrastive: vision.objective={cfg.objective!r} is not sigmoid/both")
  out = vision.vision_dir(workdir)
  report_path = out / vision.REPORT_FILE
  if (report := vision.finished_report(config, report_path)) is not None:
    return report
  out.mkdir(parents=True, exist_ok=True)
  gen = Path(workdir) / "generate"
  size = config.data.image_size
  x_train, y_train, grid = vision.load_split(gen, "train", size)
  x_test, y_test, _ = vision.load_split(gen, "test", size, limit=cfg.eval_images)
  train_texts = caption_texts(gen, "train")
  test_texts = caption_texts(gen, "test", limit=cfg.eval_images)
  tokenizer = build.load_tokenizer(workdir)
  text_len = text_length(tokenizer, train_texts + test_texts)
  t_train = tokenize(tokenizer, train_texts, text_len)
  t_test = tokenize(tokenizer, test_texts, text_len)

  model = build_model(config, vocab_size=tokenizer.vocab_size, text_len=text_len)
  patch = siglip.decode_variant(config.model.vit_variant).patch_size
  to_cell = vision.patch_cells(grid, size, patch)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(cfg)
  opt_state = tx.init(params)
  step_fn = make_train_step(graphdef, tx)
  rng = np.random.default_rng([config.seed, 7])
  both = cfg.objective == "both"
  curve: list[tuple[int, float]] = []
  pending: list[tuple[int, dict]] = []
  metrics: dict[str, Any] = {}
  t0 = time.time()
  batches = distinct_batches(len(x_train), cfg.batch_size, cfg.total_steps, rng)
  for step, idx in enumerate(batches, 1):
    labels = y_train[idx][:, to_cell] if both else None
    params, opt_state, metrics = step_fn(params, opt_state, x_train[idx], t_train[idx], labels)
    pending.append((step, metrics["loss"]))
    if step % cfg.log_every_steps == 0 or step == cfg.total_steps:
      curve += [(s, float(v)) for s, v in jax.device_get(pending)]
      pending = []
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not all(np.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"vision: non-finite loss at step {step}; lower vision.lr")
      rate = step / max(time.time() - t0, 1e-9)
      logging.info(
        "vision[%s] step %d/%d %s  %.2f steps/s  ETA %.0fs",
        cfg.objective,
        step,
        cfg.total_steps,
        " ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())),
        rate,
        (cfg.total_steps - step) / rate,
      )
  train_seconds = time.time() - t0
  model = nnx.merge(graphdef, params)

  zimg, ztxt = embed(model.two, x_test, t_test, cfg.batch_size)
  retrieval = recall_at_1(zimg, ztxt, test_texts)
  logging.info("vision: test retrieval recall@1 %s", retrieval)
  if both:
    probe = "joint"
    test_acc = vision.accuracy(model.cells, x_test, y_test, to_cell, cfg.batch_size)
  elif cfg.probe_steps > 0:
    probe = "linear"
    fit = linear_probe(
      image_tokens(model.two.img, x_train, cfg.batch_size),
      y_train,
      image_tokens(model.two.img, x_test, cfg.batch_size),
      y_test,
      to_cell,
      steps=cfg.probe_steps,
      batch=cfg.batch_size,
      lr=cfg.probe_lr,
      seed=config.seed + 1,
    )
    test_acc = fit.accuracy
  else:
    probe, test_acc = "none", {}
  if test_acc:
    logging.info("vision: test cell accuracy (%s heads) %s", probe,
                 {k: round(v, 3) for k, v in test_acc.items()})  # fmt: skip

  npz = vision.write_tower(export_tower(config, model.two.img), out)
  report = {
    "objective": cfg.objective,
    "steps": cfg.total_steps,
    "seconds": round(time.time() - t0, 1),
    "train_seconds": round(train_seconds, 1),
    "final_loss": metrics["loss"],
    "final_metrics": metrics,
    "train_images": len(x_train),
    "test_images": len(x_test),
    "text_len": text_len,
    "retrieval": retrieval,
    "probe": probe,
    "test_accuracy": test_acc,
    "chance": vision.chance(grid),
    "npz": str(npz),
  }
  _plot(report, curve, out / "accuracy.png")
  vision.write_report(report, report_path)
  return report
