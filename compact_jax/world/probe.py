"""Learnability sanity check: linear probes on the raw pixels of one object's cell.

    python -m compact_jax.world.probe [--n 2000] [--image_size 64] [--grid_size 4]

A ViT whose patch is one cell sees each object through one linear patch embedding,
so if a linear classifier on a cell's pixels cannot read an attribute, a tiny
model will struggle too (the calibration prototype's shapes stayed at chance). Each
probe renders single-object scenes drawn from the world's prior (random colour,
ground, letter, motion), crops the object's cell, and fits softmax regression.
The "shape, unseen colours" probe is trained on four fill colours and tested on
the other two: it passes only if form is readable independently of fill.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

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


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--n", type=int, default=2000, help="training cells per probe")
  ap.add_argument("--image_size", type=int, default=64)
  ap.add_argument("--grid_size", type=int, default=4)
  args = ap.parse_args()
  print(f"{'probe':<24}{'classes':>8}{'train':>8}{'test':>8}{'chance':>8}")
  for r in run_probes(args.n, args.image_size, args.grid_size):
    print(
      f"{r['probe']:<24}{r['classes']:>8}{r['train_acc']:>8.3f}{r['test_acc']:>8.3f}{r['chance']:>8.3f}"
    )


if __name__ == "__main__":
  main()
