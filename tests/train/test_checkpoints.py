"""Checkpoint retention by metric, adapter-only exports, and the eval hook's metrics."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compact_jax.train import checkpoint as checkpoint_lib
from compact_jax.train import loop as loop_lib
from compact_jax.train import mesh as mesh_lib
from tests.train.test_train import _config, built, fresh_workdir, lora_groups  # noqa: F401


@pytest.mark.parametrize(
  "mode, values, best", [("min", [3.0, 1.0, 2.0, 2.5], 2), ("max", [0.1, 0.2, 0.9, 0.3], 3)]
)
def test_best_by_metric_keeps_the_best_and_the_latest(tmp_path, mode, values, best):
  ckpt = checkpoint_lib.Checkpointer(
    str(tmp_path), keep=1, best_metric="m", best_mode=mode, keep_best=1, async_save=False
  )
  for step, v in enumerate(values, start=1):
    ckpt.save(step, {"x": jnp.full((2,), step)}, data={}, meta={}, metrics={"m": v}, force=True)
  ckpt.wait()
  assert ckpt.all_steps() == sorted({best, len(values)})  # the latest stays for resume
  assert ckpt.best_step() == best
  with pytest.raises(KeyError, match="lack 'm'"):
    ckpt.save(9, {"x": jnp.zeros((2,))}, data={}, meta={}, metrics={"other": 1.0})
  ckpt.close()
  with pytest.raises(ValueError, match="best_mode"):
    checkpoint_lib.Checkpointer(str(tmp_path / "b"), best_metric="m", best_mode="lowest")


def _rows(workdir):
  with open(os.path.join(workdir, "train", loop_lib.METRICS_FILE)) as f:
    return [json.loads(ln) for ln in f]


def test_the_loop_keeps_the_checkpoint_with_the_lowest_interval_loss(built, tmp_path):  # noqa: F811
  workdir = fresh_workdir(built, tmp_path, "best")
  # A high lr makes the loss move (up or down) enough that the best is not just the last.
  config = _config(
    workdir, best_metric="loss", keep_checkpoints=1, keep_best=1, ckpt_every_steps=2, lr=3e-2
  )
  loop_lib.run_train(config, workdir)
  loss = {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}
  interval_mean = {s: (loss[s - 1] + loss[s]) / 2 for s in (2, 4, 6)}
  best = min(interval_mean, key=interval_mean.get)
  steps = sorted(int(d) for d in os.listdir(loop_lib.checkpoint_dir(workdir)) if d.isdigit())
  assert steps == sorted({best, 6})
  ckpt = checkpoint_lib.Checkpointer(
    loop_lib.checkpoint_dir(workdir), keep=1, best_metric="loss", best_mode="min"
  )
  assert ckpt.best_step() == best
  ckpt.close()
  with pytest.raises(ValueError, match="best_metric='los'"):
    loop_lib.run_train(_config(workdir, best_metric="los"), workdir)


def test_adapters_only_export_holds_the_trained_params_and_resume_stays_complete(
  built,  # noqa: F811
  tmp_path,
):
  workdir = fresh_workdir(built, tmp_path, "adapters")
  groups = lora_groups()
  config = _config(
    workdir, param_groups=groups, total_steps=3, ckpt_every_steps=3, save_adapters_only=True
  )
  with config.unlocked():
    config.model.lora.targets = (r"llm/layers[^/]*/attn/(q|kv)_einsum/w$",)
  loop_lib.run_train(config, workdir)
  _, params, _ = loop_lib.load_params(config, workdir)
  full = mesh_lib.path_names(jax.device_get(params))
  trained = {k for k in full if "_lora_" in k or k.startswith("connector/")}
  assert trained and len(trained) < len(full)
  path = os.path.join(workdir, "train", loop_lib.TRAINABLE_PARAMS_FILE)
  with np.load(path, allow_pickle=False) as f:
    exported = {k: f[k] for k in f.files}
  assert set(exported) == trained
  for k, v in exported.items():
    np.testing.assert_array_equal(v, full[k], err_msg=k)
  # The resume checkpoint still holds everything: frozen towers and optimizer state.
  assert any(k.startswith("img/") for k in full) and any(k.startswith("llm/") for k in full)
  with config.unlocked():
    config.train.total_steps = 4
    config.train.ckpt_every_steps = 4
  result = loop_lib.run_train(config, workdir)
  assert result.resumed_from == 3 and result.final_step == 4

  # Reading it with another model fails by name instead of dropping or faking params:
  # without the adapters (an eval would silently score the base model) ...
  with config.unlocked():
    config.model.lora.targets = ()
    config.train.param_groups = ((".*", 1.0),)
  with pytest.raises(
    checkpoint_lib.ParamsMismatchError,
    match=r"step 4 holds \d+ param\(s\) not in the model.*_lora_a.*model\.lora\.targets: checkpoint",
  ):
    loop_lib.load_params(config, workdir)
  # ... or with another connector (its params were never written).
  with config.unlocked():
    config.model.lora.targets = (r"llm/layers[^/]*/attn/(q|kv)_einsum/w$",)
    config.model.connector = "linear"
  with pytest.raises(
    checkpoint_lib.ParamsMismatchError,
    match=r"has no value for .*img/head.*model\.connector: checkpoint 'mlp2x_gelu', config 'linear'",
  ):
    loop_lib.load_params(config, workdir)


def test_eval_hook_logs_accuracy_of_the_current_params(built, tmp_path):  # noqa: F811
  from compact_jax.data import build as build_lib
  from compact_jax.data import template as template_lib
  from compact_jax.eval import metrics as metrics_lib
  from compact_jax.eval import run as eval_run

  workdir = fresh_workdir(built, tmp_path, "evalhook")
  config = _config(
    workdir,
    eval_every_steps=3,
    eval_examples=8,
    best_metric="eval/accuracy",
    best_mode="max",
    lr=1e-2,
  )
  with config.unlocked():
    config.eval.split = "train"  # the toy dataset has one split
    config.eval.batch_size = 8
  loop_lib.run_train(config, workdir)
  evals = {r["step"]: r for r in _rows(workdir) if "eval/accuracy" in r}
  assert sorted(evals) == [3, 6] and all(r["eval/n"] == 8 for r in evals.values())
  # The same questions scored by the eval stage's own pieces on the final params.
  graphdef, params, _ = loop_lib.load_params(config, workdir)
  source = build_lib.load_split(config, workdir, "train")
  questions, rec_index = eval_run.collect_questions(source, max_examples=8)
  tok = build_lib.load_tokenizer(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  template = template_lib.TEMPLATES[config.data.template]
  predictor = eval_run.Predictor(graphdef, params, tok, template, config, mesh)
  from compact_jax.data import image as image_lib

  images = np.stack(
    [image_lib.preprocess_image(source[r]["image"], 64, where="test") for r in rec_index]
  )
  prompts = [eval_run.with_suffix(q.question, config.eval.prompt_suffix) for q in questions]
  with jax.set_mesh(mesh):
    preds = predictor(prompts, images, np.ones(len(prompts), bool))
  acc = np.mean([metrics_lib.exact_match(p, q.answer) for p, q in zip(preds, questions)])
  assert evals[6]["eval/accuracy"] == pytest.approx(acc)


def test_a_misspelt_eval_metric_fails_before_the_first_step(built, tmp_path):  # noqa: F811
  workdir = fresh_workdir(built, tmp_path, "misspelt")
  config = _config(workdir, eval_every_steps=3, eval_examples=8, best_metric="eval/acuracy")
  with config.unlocked():
    config.eval.split = "train"
  with pytest.raises(ValueError, match=r"best_metric='eval/acuracy'.*'eval/accuracy'"):
    loop_lib.run_train(config, workdir)
  assert loop_lib.latest_checkpoint_step(config, workdir) is None
  # Not one step trained (log_every_steps=1 would have logged it).
  metrics = os.path.join(workdir, "train", loop_lib.METRICS_FILE)
  assert not os.path.exists(metrics) or not any("loss" in r for r in _rows(workdir))
