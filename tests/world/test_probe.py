"""Probes: the k = 1 image labels, and token probes that read what features hold."""

import numpy as np

from compact_jax.world import probe, vision
from compact_jax.world import scene as scene_lib
from tests.world.hand_built import make_scene, obj


def test_image_labels_of_hand_built_scenes():
  lone = make_scene(obj(3, 0))
  assert probe.image_labels(lone) == {
    "any_tied": 0,
    "region": scene_lib.regions(4).index("bottom left"),
    "arrangement": -1,
  }
  pair = make_scene(obj(1, 2), obj(3, 2), links=((0, 1),))
  assert probe.image_labels(pair) == {"any_tied": 1, "region": -1, "arrangement": 1}
  assert probe.image_labels(make_scene(obj(1, 0), obj(1, 3)))["arrangement"] == 0
  assert probe.image_labels(make_scene(obj(0, 0), obj(1, 3)))["arrangement"] == 2


def _scenes(rng: np.random.Generator, n: int) -> list[scene_lib.Scene]:
  return [scene_lib.sample_scene(rng, grid_size=4, min_objects=1, max_objects=3) for _ in range(n)]


def _features(scenes, *, with_position: bool, rng: np.random.Generator):
  """float32[n, 16, 40] tokens holding each cell's object kind and (optionally) its row and
  column one-hot, plus noise; and the scenes' cell labels."""
  labels = np.stack([vision.cell_labels(s, 64) for s in scenes])
  names = list(vision.ATTRIBUTES)
  kind = np.eye(11)[labels[..., names.index("kind")]]
  rope = np.eye(2)[labels[..., names.index("rope_line")]]
  pos = np.concatenate([np.eye(4)[np.arange(16) // 4], np.eye(4)[np.arange(16) % 4]], -1)
  pos = np.broadcast_to(pos, (len(scenes), 16, 8)) * with_position
  noise = rng.normal(size=(len(scenes), 16, 19)) * 0.1
  return np.concatenate([kind, rope, pos, noise], -1).astype(np.float32), labels


def test_token_probes_read_position_only_when_tokens_hold_it():
  rng = np.random.default_rng(0)
  train, test = _scenes(rng, 300), _scenes(rng, 100)
  got = {}
  for with_position in (True, False):
    x, y = _features(train, with_position=with_position, rng=rng)
    xt, yt = _features(test, with_position=with_position, rng=rng)
    rows = probe.token_probes(x, y, train, xt, yt, test)
    got[with_position] = {r["probe"]: r for r in rows}
  row = "token row (occupied cells)"
  assert got[True][row]["test_acc"] > 0.95
  # Without position channels every cell of the same content looks alike: the probe
  # cannot beat guessing the most frequent row by much.
  assert got[False][row]["test_acc"] < got[False][row]["chance"] + 0.15
  # The rope channel is there in both; the "any rope" image probe reads it from the mean.
  line = "token rope_line (all cells)"
  assert got[False][line]["test_acc"] > 0.95
  assert got[False]["image any_tied (mean token)"]["test_acc"] > 0.85
