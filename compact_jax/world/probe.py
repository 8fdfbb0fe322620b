"""Learnability checks: linear probes on a cell's raw pixels, or on a trained tower's tokens.

    python -m compact_jax.world.probe [--n 2000] [--image_size 64] [--grid_size 4]
    python -m compact_jax.world.probe --tower W/vision/img.npz --generate W/generate

A ViT whose patch is one cell sees each object through one linear patch embedding,
so if a linear classifier on a cell's pixels cannot read an attribute, a tiny
model will struggle too (the calibration prototype's shapes stayed at chance). Each
probe renders single-object scenes drawn from the world's prior (random colour,
ground, letter, motion), crops the object's cell, and fits softmax regression.
The "shape, unseen colours" probe is trained on four fill colours and tested on
the other two: it passes only if form is readable independently of fill.

``--tower`` asks what the decoder can get from a frozen tower (``tower_probes``): the
output tokens of train images fit the probes, those of test images score them. Per
token: the row and column of occupied cells (the decoder's attention mixes token
contents, so a position it is to use must be in them), whether a rope ties the cell's
object, whether a rope shows in the cell. Per image, on the mean token (what one
uniform attention head reads): whether any rope is drawn, for one-object pictures the
quadrant, for two-object pictures how they line up (the k = 1 questions of
object_interaction, spatial_recognition and spatial_relationship).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from compact_jax.world import render
from compact_jax.world import scene as scene_lib
from compact_jax.world.rand import Rand


@dataclasses.dataclass(frozen=True)
class Probe:
  name: str
  labels: tuple[str, ...]
  label_of: Callable[[scene_lib.WorldObject, scene_lib.Scene], str]
  kinds: tuple[str, ...] = scene_lib.KINDS
  needs: str = ""  # "letter" / "motion": only objects that have one
  train_colors: tuple[str, ...] = tuple(scene_lib.COLORS)
  test_colors: tuple[str, ...] = tuple(scene_lib.COLORS)


PROBES = (
  Probe("color", tuple(scene_lib.COLORS), lambda o, s: o.color),
  Probe("shape", scene_lib.SHAPES, lambda o, s: o.kind, kinds=scene_lib.SHAPES),
  Probe(
    "shape, unseen colours",
    scene_lib.SHAPES,
    lambda o, s: o.kind,
    kinds=scene_lib.SHAPES,
    train_colors=("red", "orange", "yellow", "green"),
    test_colors=("blue", "purple"),
  ),
  Probe("object", scene_lib.SPRITES, lambda o, s: o.kind, kinds=scene_lib.SPRITES),
  Probe("letter", scene_lib.LETTERS, lambda o, s: o.letter, needs="letter"),
  Probe("motion", scene_lib.DIRECTIONS, lambda o, s: o.motion, needs="motion"),
  Probe("ground", scene_lib.GROUNDS, lambda o, s: s.ground),
)


def cells(
  probe: Probe, n: int, colors: tuple[str, ...], rng: Rand, image_size: int, grid_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """float32[n, c*c*3] cell pixels in [0, 1] and int32[n] labels."""
  c = image_size // grid_size
  xs, ys = [], []
  for _ in range(n):
    row, col = rng.integers(grid_size), rng.integers(grid_size)
    o = scene_lib.WorldObject(
      row,
      col,
      rng.choice(colors),
      rng.choice(probe.kinds),
      rng.choice(scene_lib.LETTERS)
      if probe.needs == "letter" or rng.random() < scene_lib.LETTER_PROB
      else None,
      rng.choice(scene_lib.DIRECTIONS)
      if probe.needs == "motion" or rng.random() < scene_lib.MOTION_PROB
      else None,
    )
    s = scene_lib.Scene(grid_size, rng.choice(scene_lib.GROUNDS), (o,))
    img = render.render_scene(s, image_size)
    xs.append(img[row * c : (row + 1) * c, col * c : (col + 1) * c].reshape(-1))
    ys.append(probe.labels.index(probe.label_of(o, s)))
  return np.asarray(xs, np.float32) / 255.0, np.asarray(ys, np.int32)


def fit_softmax(
  x: np.ndarray, y: np.ndarray, n_classes: int, *, steps: int = 400, lr: float = 0.05
) -> Callable[[np.ndarray], np.ndarray]:
  """Softmax regression (full-batch Adam, light L2) on standardised features."""
  mu, sd = x.mean(0), x.std(0) + 1e-3
  z = (x - mu) / sd
  w = np.zeros((x.shape[1], n_classes), np.float32)
  b = np.zeros(n_classes, np.float32)
  onehot = np.eye(n_classes, dtype=np.float32)[y]
  m = [np.zeros_like(w), np.zeros_like(b)]
  v = [np.zeros_like(w), np.zeros_like(b)]
  for t in range(1, steps + 1):
    logits = z @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - onehot) / len(y)
    grads = [z.T @ g + 1e-4 * w, g.sum(0)]
    for i, (param, grad) in enumerate(zip((w, b), grads)):
      m[i] = 0.9 * m[i] + 0.1 * grad
      v[i] = 0.999 * v[i] + 0.001 * grad * grad
      param -= lr * (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
  return lambda xs: ((xs - mu) / sd @ w + b).argmax(1)


def run_probes(n: int, image_size: int, grid_size: int, seed: int = 0) -> list[dict]:
  rows = []
  for probe in PROBES:
    rng = Rand(seed)
    x, y = cells(probe, n, probe.train_colors, rng, image_size, grid_size)
    xt, yt = cells(probe, n // 4, probe.test_colors, rng, image_size, grid_size)
    predict = fit_softmax(x, y, len(probe.labels))
    rows.append(
      {
        "probe": probe.name,
        "classes": len(probe.labels),
        "train_acc": float((predict(x) == y).mean()),
        "test_acc": float((predict(xt) == yt).mean()),
        "chance": float(np.bincount(yt).max() / len(yt)),
      }
    )
  return rows


def image_labels(scene: scene_lib.Scene) -> dict[str, int]:
  """The k = 1 answers a picture has, as class indices (-1: not asked of it).

  ``any_tied``: no/yes; ``region``: `scene_lib.regions` index of a lone object;
  ``arrangement``: horizontally/vertically/diagonally for exactly two objects.
  """
  out = {"any_tied": int(bool(scene.links)), "region": -1, "arrangement": -1}
  if len(scene.objects) == 1:
    out["region"] = scene_lib.regions(scene.grid_size).index(scene.region(0))
  if len(scene.objects) == 2:
    a, b = scene.objects
    out["arrangement"] = 0 if a.row == b.row else 1 if a.col == b.col else 2
  return out


IMAGE_PROBE_CLASSES = {"any_tied": 2, "region": 4, "arrangement": 3}


def score_probe(name, x, y, xt, yt, n_classes: int) -> dict:
  """Fits `fit_softmax` on (x, y), scores (xt, yt); ``majority`` is the test split's."""
  predict = fit_softmax(x, y, n_classes)
  return {
    "probe": name,
    "classes": n_classes,
    "n_test": len(yt),
    "train_acc": float((predict(x) == y).mean()),
    "test_acc": float((predict(xt) == yt).mean()),
    "chance": float(np.bincount(yt, minlength=n_classes).max() / len(yt)),
  }


def token_probes(
  features: np.ndarray, labels: np.ndarray, scenes, test_features, test_labels, test_scenes
) -> list[dict]:
  """The probes of the module doc on tower tokens.

  Args:
    features: float32[n, G*G, D] tower tokens, one per grid cell (row-major).
    labels: int32[n, G*G, A] `vision.cell_labels` of the same images.
    scenes: their `Scene`s; ``test_*`` the same for the scored images.
  """
  from compact_jax.world import vision

  names = list(vision.ATTRIBUTES)
  rows = []
  occ, occ_t = labels[..., names.index("kind")] > 0, test_labels[..., names.index("kind")] > 0
  for attr, mask, mask_t, offset in (
    ("row", occ, occ_t, 0),
    ("col", occ, occ_t, 0),
    ("rope", occ, occ_t, 1),  # "free"/"tied" on occupied cells
    ("rope_line", np.ones_like(occ), np.ones_like(occ_t), 0),
  ):
    a = names.index(attr)
    k = len(vision.ATTRIBUTES[attr]) - offset
    where = "occupied" if attr != "rope_line" else "all"
    rows.append(
      score_probe(
        f"token {attr} ({where} cells)",
        features[mask],
        labels[..., a][mask] - offset,
        test_features[mask_t],
        test_labels[..., a][mask_t] - offset,
        k,
      )
    )
  pooled, pooled_t = features.mean(1), test_features.mean(1)
  ys = [image_labels(s) for s in scenes]
  ys_t = [image_labels(s) for s in test_scenes]
  for name, k in IMAGE_PROBE_CLASSES.items():
    y = np.array([d[name] for d in ys])
    y_t = np.array([d[name] for d in ys_t])
    if (y >= 0).sum() < 2 or (y_t >= 0).sum() < 1:
      continue
    rows.append(
      score_probe(
        f"image {name} (mean token)",
        pooled[y >= 0],
        y[y >= 0],
        pooled_t[y_t >= 0],
        y_t[y_t >= 0],
        k,
      )
    )
  return rows


def load_tower(config, npz: str):
  """``config.model``'s vision tower with the ``params/img/`` arrays of a big_vision npz."""
  from flax import nnx

  from compact_jax.checkpoints import big_vision
  from compact_jax.train import mesh as mesh_lib
  from compact_jax.train import state as state_lib

  vlm = state_lib.build_model(
    config.model, vocab_size=8, image_size=config.data.image_size, seed=config.seed
  )
  params = nnx.to_pure_dict(nnx.state(vlm.img, nnx.Param))
  expected = {k: tuple(v.shape) for k, v in mesh_lib.path_names(params).items()}
  flat = big_vision.import_npz(
    big_vision.NpzCheckpoint(npz), expected, {"params/img/": ""}, what=npz
  )
  for path, value in flat.items():
    node = params
    *parents, leaf = path.split("/")
    for key in parents:
      node = node[key]
    node[leaf] = value
  nnx.update(vlm.img, params)
  return vlm.img


def tower_probes(config, npz: str, generate_dir: str, n_train: int, n_test: int) -> list[dict]:
  """`token_probes` of the tower in ``npz`` on a generate stage's train and test images."""
  from flax import nnx

  from compact_jax.world import vision

  tower = load_tower(config, npz)
  encode = nnx.jit(lambda t, x: t(x)[1]["encoded"])
  gen = Path(generate_dir)
  out = []
  for split, limit in (("train", n_train), ("test", n_test)):
    images, labels, grid = vision.load_split(gen, split, config.data.image_size, limit=limit)
    patch = config.data.image_size // round(float(np.sqrt(tower.num_patches)))
    if patch != config.data.image_size // grid:
      raise ValueError(f"probe: the tower's {patch}px patches are not the {grid}x{grid} cells")
    feats = np.concatenate(
      [np.asarray(encode(tower, images[i : i + 128])) for i in range(0, len(images), 128)]
    )
    with open(gen / "scenes" / f"{split}.jsonl") as f:
      scenes = [scene_lib.Scene.from_json(json.loads(line)["scene"]) for line in f]
    out += [feats, labels, scenes[: len(feats)]]
  return token_probes(*out)


def _print(rows: list[dict]) -> None:
  print(f"{'probe':<36}{'classes':>8}{'n test':>8}{'train':>8}{'test':>8}{'majority':>9}")
  for r in rows:
    print(
      f"{r['probe']:<36}{r['classes']:>8}{r.get('n_test', ''):>8}{r['train_acc']:>8.3f}"
      f"{r['test_acc']:>8.3f}{r['chance']:>9.3f}"
    )


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--n", type=int, default=2000, help="training cells (images with --tower)")
  ap.add_argument("--image_size", type=int, default=64)
  ap.add_argument("--grid_size", type=int, default=4)
  ap.add_argument("--tower", default="", help="a vision stage's img.npz: probe its tokens")
  ap.add_argument("--generate", default="", help="with --tower: a generate stage's directory")
  ap.add_argument("--n_test", type=int, default=600, help="with --tower: test images")
  ap.add_argument("--smoke", action="store_true", help="with --tower: the smoke tower's shape")
  args = ap.parse_args()
  if args.tower:
    if not args.generate:
      ap.error("--tower needs --generate")
    from configs import tiny_world  # the model the tiny world's vision stage trains

    config = tiny_world.get_config("smoke" if args.smoke else None)
    _print(tower_probes(config, args.tower, args.generate, args.n, args.n_test))
    return
  _print(run_probes(args.n, args.image_size, args.grid_size))


if __name__ == "__main__":
  main()
