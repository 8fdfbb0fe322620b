"""Dynamic resolution through the trainer and the evaluators: cached decoding with tiles
against full forward passes, and configs/tiny_dynres.py:smoke through generate, build,
train and eval."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flax import nnx

from compact_jax import main as main_lib
from compact_jax.eval import decode
from compact_jax.models import anyres
from compact_jax.train import step as step_lib
from configs import tiny_dynres
from tests.models import tiny_models as tm

TILING = anyres.Tiling("internvl", tm.IMAGE_SIZE, max_tiles=4, newline=True, max_visual_tokens=8)
# Wide, tall, square, single-tile (no thumbnail) and an image-less row.
LAYOUTS = np.array([[1, 2, 10, 20], [3, 1, 30, 10], [2, 2, 20, 20], [1, 1, 5, 5], [1, 1, 5, 5]])
HAS_IMAGE = np.array([True, True, True, True, False])


def test_cached_decoding_with_tiles_equals_the_full_forward_reference():
  model, _ = tm.random_vlm(seed=3, tiling=TILING)
  b, p = len(LAYOUTS), 5
  rng = np.random.default_rng(3)
  images = rng.uniform(-1, 1, (b, TILING.num_slots, tm.IMAGE_SIZE, tm.IMAGE_SIZE, 3))
  tokens = rng.integers(1, tm.VOCAB, (b, p)).astype(np.int32)
  mask = np.arange(p)[None] >= np.array([0, 2, 0, 1, 3])[:, None]  # left padding
  tokens[~mask] = 0
  batch = (images.astype(np.float32), tokens, mask, HAS_IMAGE)
  kw = dict(max_new_tokens=6, eos_id=-1, pad_id=0)
  want = decode.greedy_decode_reference(model, *batch, tile_layout=LAYOUTS, **kw)
  decoder = decode.make_greedy_decoder(nnx.split(model)[0], **kw)
  got = np.asarray(decoder(nnx.split(model)[1], *batch, tile_layout=LAYOUTS))
  np.testing.assert_array_equal(got, want)
  assert len(np.unique(got)) >= 4  # not a degenerate model that agrees trivially
  with pytest.raises(ValueError, match="tile_layout"):
    decoder(nnx.split(model)[1], *batch, tile_layout=LAYOUTS[:2])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dynres"))
  config = tiny_dynres.get_config("smoke")
  with config.unlocked():
    config.compilation_cache_dir = ""
    # The stages the tiles change, from random weights and few examples.
    config.stages = ("generate", "build", "train", "eval")
    config.model_init.path = ""
    config.train.init_from = ""
    config.world.num_train_images = 24
    config.world.num_test_images = 6
    config.train.total_steps = 4
    config.train.ckpt_every_steps = 4
    config.train.batch_size = 8
    config.train.eval_every_steps = 4  # the trainer's eval hook tiles its images too
    config.train.eval_examples = 8
    config.eval.max_examples = 16
    config.eval.batch_size = 8
  return workdir, config, main_lib.run(config, workdir)


def test_smoke_config_trains_and_evaluates_on_tiles(smoke_run):
  workdir, config, results = smoke_run
  assert step_lib.is_tiled(config)
  with open(os.path.join(workdir, "train/metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f]
  train_rows = [m for m in metrics if "loss" in m]
  assert train_rows[-1]["step"] == 4 and np.isfinite(train_rows[-1]["loss"])
  assert all(m["recompiles"] == 0 for m in train_rows)
  assert any("eval/accuracy" in m for m in metrics)
  res = results["eval"]
  assert res["checkpoint_step"] == 4 and 0 < res["num_questions"] <= 16
  with open(os.path.join(workdir, "eval/predictions.jsonl")) as f:
    assert sum(1 for _ in f) == res["num_questions"]


def test_benchmarks_stage_tiles_images_as_the_checkpoint_was_trained(smoke_run, tmp_path):
  """configs/eval.py restores the model config saved with the checkpoint, dynamic_res
  included, and asks the tinyworld benchmark with the same tiles (the tiled model
  rejects any other image shape, so finishing means it was fed tiles)."""
  import configs.eval as eval_config
  from compact_jax.eval import bench_run

  workdir, train_config, _ = smoke_run
  config = eval_config.get_config("benchmarks=tinyworld,smoke")
  assert not config.model.dynamic_res.mode  # only the checkpoint knows about the tiles
  with config.unlocked():
    config.checkpoint = workdir
    config.compilation_cache_dir = ""
    config.bench.max_examples = 8
  model, _ = bench_run.load_model(config, workdir)
  want = anyres.tiling_from_config(
    train_config.model.dynamic_res, image_size=train_config.data.image_size
  )
  assert model.tiling == want and model.tiling is not None
  out = str(tmp_path / "bench")
  bench = main_lib.run(config, out)["benchmarks"]
  assert bench["checkpoint"]["step"] == 4
  with open(os.path.join(out, "benchmarks/predictions/tinyworld.jsonl")) as f:
    assert sum(1 for _ in f) == 8
