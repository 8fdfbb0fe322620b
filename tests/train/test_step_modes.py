"""Step options: gradient accumulation, skip-on-NaN, and what the loop logs per step."""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from compact_jax import sharding as sharding_lib
from compact_jax.data import build as build_lib
from compact_jax.train import flops as flops_lib
from compact_jax.train import loop as loop_lib
from compact_jax.train import mesh as mesh_lib
from compact_jax.train import state as state_lib
from compact_jax.train import step as step_lib
from tests.train.test_train import _batches, _config, _run_steps, built  # noqa: F401 (fixture)


def test_accumulating_four_microbatches_equals_one_full_batch_step(built):  # noqa: F811
  config = _config(built)
  tok, batches = _batches(built, config, 1)
  # Two data devices: each of the 4 microbatches of 8 puts one example on each.
  mesh = mesh_lib.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)), jax.devices()[:2])
  config4 = _config(built, accum_steps=4)
  setup, init_fn = state_lib.setup_state(config, vocab_size=tok.vocab_size, mesh=mesh)
  grads, sums = {}, {}
  with jax.set_mesh(mesh), sharding_lib.axis_rules(config.sharding_rules):
    params = init_fn()["params"]
    batch = step_lib.to_global_batch(batches[0], mesh)
    for n, c in ((1, config), (4, config4)):
      fn = jax.jit(step_lib.make_loss_and_grads(setup, c))
      grads[n], sums[n] = jax.device_get(fn(params, batch))
  for k in ("nll", "n_tokens", "n_correct"):
    np.testing.assert_allclose(sums[4][k], sums[1][k], rtol=1e-6, err_msg=k)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads[1]))
  assert scale > 0
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * scale),
    grads[1],
    grads[4],
  )

  one, p_one, _ = _run_steps(config, mesh, tok.vocab_size, batches)
  four, p_four, step = _run_steps(config4, mesh, tok.vocab_size, batches)
  assert step.num_retraces == 0
  for k in ("loss", "grad_norm", "token_accuracy", "n_tokens", "update_norm"):
    np.testing.assert_allclose(four[0][k], one[0][k], rtol=2e-6, err_msg=k)
  # Adam's first update is lr * g / (|g| + 1e-8): where g is rounding noise around an
  # exact zero (a bias ahead of a norm) it amplifies the noise, so compare the rest.
  for g, a, b in zip(*(jax.tree.leaves(t) for t in (grads[1], p_one, p_four))):
    real = np.abs(g) > 1e-7
    np.testing.assert_allclose(b[real], a[real], atol=2e-6, rtol=0)
  # The batch was really split: its answer tokens are spread over every microbatch.
  micro = step_lib.split_microbatches({"w": batches[0]["mask_loss"]}, 4)["w"]
  assert micro.shape[:2] == (4, 2) and all(int(m.sum()) > 0 for m in micro)
  np.testing.assert_array_equal(micro[1], batches[0]["mask_loss"][1::4])


def test_accum_steps_must_divide_the_per_device_batch(built, tmp_path):  # noqa: F811
  workdir = str(tmp_path / "accum")
  shutil.copytree(built, workdir)
  with pytest.raises(ValueError, match=r"accum_steps=4 microbatches, each divisible by 8"):
    loop_lib.run_train(_config(workdir, accum_steps=4), workdir)


def _nan_image(batch):
  return dict(batch, image=np.full_like(batch["image"], np.nan))


def test_skip_mode_keeps_params_and_optimizer_state_on_a_nan_batch(built):  # noqa: F811
  config = _config(built, nonfinite="skip")
  tok, (b0, b1) = _batches(built, config, 2)
  mesh = mesh_lib.make_mesh(config.mesh)
  setup, init_fn = state_lib.setup_state(config, vocab_size=tok.vocab_size, mesh=mesh)
  with jax.set_mesh(mesh):
    step = step_lib.TrainStep(setup, config, mesh)
    state, m0 = step(init_fn(), step_lib.to_global_batch(b0, mesh))
    before = jax.device_get(state)  # the step donates its input
    state, bad = step(state, step_lib.to_global_batch(_nan_image(b1), mesh))
    after_bad = jax.device_get(state)
    state, good = step(state, step_lib.to_global_batch(b1, mesh))
    # The reference: the same good batch straight after step 1.
    ref_state = jax.device_put(before, setup.shardings)
    _, ref = step(ref_state, step_lib.to_global_batch(b1, mesh))
  assert float(m0["skipped"]) == 0.0 and float(bad["skipped"]) == 1.0
  assert not np.isfinite(float(bad["loss"]))
  assert int(after_bad["step"]) == int(before["step"]) + 1  # the data still moves on
  jax.tree.map(np.testing.assert_array_equal, after_bad["params"], before["params"])
  jax.tree.map(np.testing.assert_array_equal, after_bad["opt_state"], before["opt_state"])
  # Adam's moments and count were untouched, so the next step is the one without the NaN.
  assert float(good["loss"]) == float(ref["loss"])
  assert float(good["update_norm"]) == float(ref["update_norm"])


def test_skip_mode_in_the_loop_counts_and_reports_skipped_steps(
  built,  # noqa: F811
  tmp_path,
  monkeypatch,
  caplog,
):
  workdir = str(tmp_path / "skip")
  shutil.copytree(built, workdir)
  shutil.rmtree(os.path.join(workdir, "train"), ignore_errors=True)
  real = step_lib.to_global_batch
  calls = {"n": 0}

  def poison_steps_2_and_4(batch, mesh):
    calls["n"] += 1
    return real(_nan_image(batch) if calls["n"] in (2, 4) else batch, mesh)

  monkeypatch.setattr(step_lib, "to_global_batch", poison_steps_2_and_4)
  caplog.set_level("INFO")
  result = loop_lib.run_train(_config(workdir, nonfinite="skip"), workdir)
  assert result.final_step == 6 and result.last_metrics["skipped_steps"] == 2
  with open(os.path.join(workdir, "train", loop_lib.METRICS_FILE)) as f:
    rows = [json.loads(ln) for ln in f]
  assert [r["skipped"] for r in rows] == [0, 1, 0, 1, 0, 0]
  assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 2, 2, 2]
  assert "Skipped step 4" in caplog.text and "train: 2 step(s) skipped" in caplog.text
  # The final params are finite: no NaN reached the state or the checkpoint.
  _, params, _ = loop_lib.load_params(_config(workdir), workdir)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_halt_names_the_step_and_the_last_good_checkpoint(built, tmp_path, monkeypatch):  # noqa: F811
  workdir = str(tmp_path / "halt")
  shutil.copytree(built, workdir)
  shutil.rmtree(os.path.join(workdir, "train"), ignore_errors=True)
  real = step_lib.to_global_batch
  calls = {"n": 0}

  def poison_step_3(batch, mesh):
    calls["n"] += 1
    return real(_nan_image(batch) if calls["n"] == 3 else batch, mesh)

  monkeypatch.setattr(step_lib, "to_global_batch", poison_step_3)
  with pytest.raises(
    FloatingPointError, match=r"at step 3 .*The last good checkpoint is step 2; a rerun resumes"
  ):
    loop_lib.run_train(_config(workdir, ckpt_every_steps=2), workdir)
  assert loop_lib.latest_checkpoint_step(None, workdir) == 2
  assert "last good checkpoint: none" in loop_lib.nonfinite_message(1, math.nan, 1.0, None)


def _schedule_by_hand(step, peak, warmup, total, end_fraction):
  """optax.warmup_cosine_decay_schedule written out: linear 0 -> peak, then cosine."""
  if step < warmup:
    return peak * step / warmup
  end = peak * end_fraction
  progress = (step - warmup) / (total - warmup)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def test_the_log_has_lr_per_group_compiles_and_flops(built, tmp_path):  # noqa: F811
  workdir = str(tmp_path / "obs")
  shutil.copytree(built, workdir)
  shutil.rmtree(os.path.join(workdir, "train"), ignore_errors=True)
  groups = (("connector/.*", 0.1), ("(img|llm)/.*", 1.0))
  peak = 1e9  # a made-up chip, so MFU is logged on CPU
  config = _config(
    workdir, param_groups=groups, lr=2e-3, warmup_steps=2, peak_flops_per_device=peak
  )
  loop_lib.run_train(config, workdir)
  with open(os.path.join(workdir, "train", loop_lib.METRICS_FILE)) as f:
    rows = [json.loads(ln) for ln in f]
  assert [r["step"] for r in rows] == list(range(1, 7))
  for r in rows:
    s = r["step"] - 1  # the rate applied in step s + 1 is schedule(s)
    for name, mult in (("g0_connector", 0.1), ("g1_img_llm", 1.0)):
      want = _schedule_by_hand(s, 2e-3 * mult, 2, 6, config.train.end_lr_fraction)
      np.testing.assert_allclose(r[f"lr/{name}"], want, rtol=1e-6, atol=1e-12)
    assert r["compiles"] >= 1 and r["recompiles"] == 0
  # One step per line, so FLOP/s / steps/s is that step's FLOPs, i.e. one bucket's.
  tok = build_lib.load_tokenizer(workdir)
  setup, _ = state_lib.setup_state(
    loop_lib.phase_config(config, "train"),
    vocab_size=tok.vocab_size,
    mesh=mesh_lib.make_mesh(config.mesh),
  )
  per_bucket = loop_lib.flops_per_bucket(config, setup, tok.vocab_size)
  shapes, trained = flops_lib.shapes_and_trainable(setup.abstract["params"], setup.trainable)
  assert (
    per_bucket[48]
    == flops_lib.step_flops(
      config.model,
      vocab_size=tok.vocab_size,
      image_size=64,
      batch_size=8,
      seq_len=48,
      shapes=shapes,
      trainable=trained,
    ).model
  )
  for r in rows:
    per_step = r["tflops_per_sec"] * 1e12 / r["steps_per_sec"]
    assert min(abs(per_step / f - 1) for f in per_bucket.values()) < 1e-6
    np.testing.assert_allclose(r["mfu"], r["tflops_per_sec"] * 1e12 / (peak * 8), rtol=1e-9)
