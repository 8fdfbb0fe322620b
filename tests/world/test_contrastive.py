"""SigLIP pretraining of the vision tower: retrieval metric, batching, a toy that must be
learned, and the stage (train images only, one compile, loadable npz, rerun skips)."""

import json
import re
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import configs.tiny_world as tiny_world
import configs.tiny_world_contrastive as tiny_world_contrastive
from compact_jax.checkpoints import big_vision
from compact_jax.data import build
from compact_jax.data.tokenizer import train_tokenizer
from compact_jax.models import siglip, two_tower
from compact_jax.train import mesh as mesh_lib
from compact_jax.train import state as state_lib
from compact_jax.world import contrastive, vision
from tests.world.test_generate import run  # noqa: F401  (module fixture)


def test_recall_at_1_hand_computed():
  # Images 0 and 2 share caption "a". Image 2 looks like image 1, so its best text
  # is "b": a miss. Text 2's best image is image 0, whose caption is also "a": a hit.
  zimg = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  ztxt = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
  got = contrastive.recall_at_1(zimg, ztxt, ["a", "b", "a"])
  assert got["image_to_text"] == pytest.approx(2 / 3)
  assert got["text_to_image"] == pytest.approx(1.0)
  assert got["chance"] == pytest.approx((2 + 1 + 2) / 9)
  eye = contrastive.recall_at_1(np.eye(4), np.eye(4)[::-1], list("abcd"))
  assert eye == {"image_to_text": 0.0, "text_to_image": 0.0, "chance": 0.25}


def test_distinct_batches():
  rng = np.random.default_rng(0)
  batches = list(contrastive.distinct_batches(10, 4, 5, rng))
  assert len(batches) == 5
  assert all(len(set(b.tolist())) == 4 for b in batches)
  # An epoch is a permutation: the first two batches never repeat an image.
  assert len(set(np.concatenate(batches[:2]).tolist())) == 8
  with pytest.raises(ValueError, match="exceeds the 3 train images"):
    next(contrastive.distinct_batches(3, 4, 1, rng))


def test_tokenize_appends_eos_and_pads(tmp_path):
  texts = ["grass. 12 red circle.", "snow, road patch. 33 blue fish letter k moving up."]
  tok = train_tokenizer(texts * 20, tmp_path / "t.model", vocab_size=60)
  length = contrastive.text_length(tok, texts)
  longest = max(len(tok.encode(t)) for t in texts) + 1
  assert length % contrastive.TEXT_LEN_MULTIPLE == 0 and longest <= length < longest + 8
  ids = contrastive.tokenize(tok, texts, length)
  for row, text in zip(ids, texts):
    n = len(tok.encode(text))
    assert row[:n].tolist() == tok.encode(text) and row[n] == tok.eos_id
    assert (row[n + 1 :] == tok.pad_id).all()
  with pytest.raises(ValueError, match="caption 1 has"):
    contrastive.tokenize(tok, texts, longest - 1)


def test_sigmoid_training_matches_solid_colours_to_their_names():
  """8 colours, one word each: after 40 steps on noisy solid images, fresh noisy images
  retrieve their colour's name (and vice versa) far above chance (1/8)."""
  colours = np.random.default_rng(0).uniform(-1, 1, (8, 3)).astype(np.float32)
  tokens = np.zeros((8, 4), np.int32)  # word, EOS (9), padding (0)
  tokens[:, 0], tokens[:, 1] = np.arange(1, 9), 9

  def images(seed):
    noise = np.random.default_rng(seed).normal(0, 0.1, (8, 16, 16, 3))
    return (colours[:, None, None] + noise).astype(np.float32)

  v = siglip.ViTVariant(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
  two = two_tower.TwoTower(
    v, v, image_size=16, vocab_size=10, max_len=4, embed_dim=32, rngs=nnx.Rngs(0)
  )
  graphdef, params = nnx.split(contrastive.SigLipPretrainer(two, None), nnx.Param)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  step = contrastive.make_train_step(graphdef, tx)
  losses = []
  for i in range(40):
    params, opt_state, metrics = step(params, opt_state, images(i), tokens, None)
    losses.append(float(metrics["loss"]))
  assert step._cache_size() == 1  # compiled once
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
  model = nnx.merge(graphdef, params)
  zimg, ztxt = contrastive.embed(model.two, images(1000), tokens, batch=8)
  got = contrastive.recall_at_1(zimg, ztxt, [str(i) for i in range(8)])
  assert got["chance"] == 1 / 8
  assert got["image_to_text"] >= 0.75 and got["text_to_image"] >= 0.75, got


def test_pair_logits_are_the_two_towers():
  v = siglip.ViTVariant(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=8)
  for embed_dim in (16, 8):  # without and with img_head
    two = two_tower.TwoTower(
      v, v, image_size=16, vocab_size=10, max_len=4, embed_dim=embed_dim, rngs=nnx.Rngs(1)
    )
    image = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    tokens = np.random.default_rng(1).integers(0, 10, (3, 4)).astype(np.int32)
    want, _ = two(image, tokens)
    got = contrastive.pair_logits(two, two.img(image)[1]["pooled"], tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_linear_probe_reads_labels_written_into_features():
  """Features that carry each cell's labels as one-hot blocks are fitted exactly."""
  rng = np.random.default_rng(0)
  labels = np.stack(
    [rng.integers(0, len(v), (40, 16)) for v in vision.ATTRIBUTES.values()], -1
  ).astype(np.int32)
  offsets = np.cumsum([0] + [len(v) for v in vision.ATTRIBUTES.values()])[:-1]
  feats = np.zeros((40, 16, vision.num_classes()), np.float32)
  for a, off in enumerate(offsets):
    np.put_along_axis(feats, (labels[..., a] + off)[..., None], 1.0, axis=-1)
  to_cell = np.arange(16)
  fit = contrastive.linear_probe(
    feats[:30], labels[:30], feats[30:], labels[30:], to_cell, steps=150, batch=10, lr=0.1, seed=0
  )
  assert all(v == 1.0 for v in fit.accuracy.values()), fit.accuracy


def _workdir(tmp_path, root):
  """A workdir sharing the generate fixture's output, with a tokenizer where build puts it."""
  (tmp_path / "generate").symlink_to(root / "generate")
  texts = contrastive.caption_texts(root / "generate", "train")
  train_tokenizer(texts, Path(build.build_dir(tmp_path)) / build.TOKENIZER_FILE, vocab_size=200)
  return tmp_path


def _config(objective, **vision_keys):
  config = tiny_world_contrastive.get_config(f"smoke,objective={objective}")
  with config.unlocked():
    config.vision.total_steps = 12
    config.vision.log_every_steps = 6
    for k, v in vision_keys.items():
      setattr(config.vision, k, v)
  return config


def _spy_train_steps(monkeypatch):
  """Records every batch of images the stage trains on, and the jitted steps."""
  seen, steps = [], []
  real = contrastive.make_train_step

  def spy(graphdef, tx):
    step = real(graphdef, tx)
    steps.append(step)

    def recording(params, opt_state, image, tokens, labels):
      seen.append(np.array(image))
      return step(params, opt_state, image, tokens, labels)

    return recording

  monkeypatch.setattr(contrastive, "make_train_step", spy)
  return seen, steps


def _rows(images):
  return {x.tobytes() for x in images}


def test_stage_both_trains_on_train_images_only_and_exports_a_loadable_npz(
  run,  # noqa: F811
  tmp_path,
  monkeypatch,
):
  root, _ = run
  workdir = _workdir(tmp_path, root)
  config = _config("both")
  seen, steps = _spy_train_steps(monkeypatch)
  report = vision.run_vision(config, workdir)  # the stage's entry point dispatches here

  size = config.data.image_size
  x_train, _, _ = vision.load_split(root / "generate", "train", size)
  x_test, _, _ = vision.load_split(root / "generate", "test", size)
  train_rows, test_rows = _rows(x_train), _rows(x_test)
  assert not train_rows & test_rows
  assert len(seen) == config.vision.total_steps
  for batch in seen:
    assert len(batch) == config.vision.batch_size
    assert len(_rows(batch)) == len(batch)  # distinct images
    assert _rows(batch) <= train_rows  # train images only, never a test image
  assert steps[0]._cache_size() == 1  # compiled once

  assert report["objective"] == "both" and report["probe"] == "joint"
  assert report["test_images"] == 60 and report["train_images"] == 120
  r = report["retrieval"]
  assert r["chance"] == pytest.approx(1 / 60)  # the 60 test captions are distinct
  assert 0 <= r["image_to_text"] <= 1 and 0 <= r["text_to_image"] <= 1
  assert set(report["test_accuracy"]) == set(vision.ATTRIBUTES)
  assert json.loads((workdir / "vision" / vision.REPORT_FILE).read_text()) == report
  assert (workdir / "vision" / "accuracy.png").stat().st_size > 0

  # Rerun: finished, so nothing trains; another objective on this workdir is an error.
  assert vision.run_vision(config, workdir) == report
  assert len(seen) == config.vision.total_steps
  for other in ("sigmoid", "cells"):
    with pytest.raises(ValueError, match="objective='both'"):
      vision.run_vision(_config(other), workdir)

  # The npz is exactly the VLM's img/ params, and model_init loads every one of them.
  mesh = mesh_lib.make_mesh(config.mesh)
  setup, init_fn = state_lib.setup_state(config, vocab_size=64, mesh=mesh)
  with jax.set_mesh(mesh):
    params = init_fn()["params"]
  names = mesh_lib.path_names(params)
  npz = big_vision.NpzCheckpoint(str(workdir / "vision" / vision.NPZ_FILE))
  img = [k for k in names if k.startswith("img/")]
  # big_vision stacks the per-layer blocks: img/.../encoderblock_{i}/x is
  # params/img/.../encoderblock/x[i].
  per_layer = re.compile(r"^(.*/encoderblock)_(\d+)/(.*)$")

  def npz_value(k):
    m = per_layer.match(k)
    return npz[f"params/{m[1]}/{m[3]}"][int(m[2])] if m else npz[f"params/{k}"]

  stacked = {"params/" + per_layer.sub(r"\1/\3", k) for k in img}
  assert set(npz) == stacked  # the VLM's tower: no MAP head, text tower, t or b
  loaded = mesh_lib.path_names(
    state_lib.load_model_init(params, setup.shardings["params"], config.model_init, str(workdir))
  )
  for k in img:
    np.testing.assert_array_equal(np.asarray(loaded[k]), npz_value(k))
  assert any(not np.array_equal(np.asarray(loaded[k]), np.asarray(names[k])) for k in img)
  for k in names:
    if not k.startswith("img/"):
      np.testing.assert_array_equal(np.asarray(loaded[k]), np.asarray(names[k]))


def test_stage_sigmoid_probes_the_frozen_tower_on_train_features(
  run,  # noqa: F811
  tmp_path,
  monkeypatch,
):
  root, _ = run
  workdir = _workdir(tmp_path, root)
  config = _config("sigmoid", probe_steps=60)
  seen, _ = _spy_train_steps(monkeypatch)
  probe_inputs = []
  real_probe = contrastive.linear_probe

  def spy_probe(train_features, train_labels, test_features, test_labels, *args, **kwargs):
    probe_inputs.append((len(train_features), len(train_labels), len(test_features)))
    return real_probe(train_features, train_labels, test_features, test_labels, *args, **kwargs)

  monkeypatch.setattr(contrastive, "linear_probe", spy_probe)
  report = vision.run_vision(config, workdir)
  x_test, _, _ = vision.load_split(root / "generate", "test", config.data.image_size)
  assert not any(_rows(batch) & _rows(x_test) for batch in seen)
  assert probe_inputs == [(120, 120, 60)]  # fitted on the train images' features
  assert report["objective"] == "sigmoid" and report["probe"] == "linear"
  # Even a barely trained tower keeps the ground colour, which fills whole cells.
  acc, chance = report["test_accuracy"], report["chance"]
  assert acc["ground"] > 2 * chance["ground"], acc


def test_unknown_objective_is_an_error(tmp_path):
  config = tiny_world.get_config("smoke")
  config.vision.objective = "clip"
  with pytest.raises(ValueError, match=r"vision\.objective='clip'"):
    vision.run_vision(config, tmp_path)


def test_contrastive_config_changes_only_the_vision_objective_and_text_tower():
  for arg in ("", "smoke"):
    base = tiny_world.get_config(arg).to_dict()
    got = tiny_world_contrastive.get_config(f"{arg},objective=sigmoid").to_dict()
    assert got["vision"].pop("objective") == "sigmoid"
    assert got["vision"].pop("txt_variant") == "smoke/16"
    assert base["vision"].pop("objective") == "cells"
    base["vision"].pop("txt_variant")
    assert got == base
  assert tiny_world_contrastive.get_config().vision.objective == "both"
