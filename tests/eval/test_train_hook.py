"""The trainer's periodic benchmarks (``config.train.eval_benchmarks``): logged metrics equal
the benchmarks stage's on the same params, decoders compile once, missing data and bad
settings fail before training."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import pytest

from compact_jax.eval import bench_run
from compact_jax.eval.benchmarks import formats
from compact_jax.train import checkpoint as checkpoint_lib
from compact_jax.train import loop as loop_lib
from configs import eval as eval_config
from tests.eval import bench_fixtures as fx
from tests.train.test_train import _config, built  # noqa: F401 (fixture)


def _hook_config(workdir: str, data_dir: pathlib.Path, **train):
  config = _config(workdir, **train)
  with config.unlocked():
    config.bench = eval_config.bench_config()
    config.bench.data_dir = str(data_dir)
    config.bench.batch_size = 4
    config.bench.prompt_buckets = (64, 128, 256)
    config.bench.max_new_tokens = 4
    config.bench.progress = False
    config.bench.world_split = "train"  # the toy build has one split
    config.eval.split = "train"
    config.eval.batch_size = 8
  return config


def _fresh(built_dir: str, tmp_path: pathlib.Path, name: str) -> str:
  workdir = str(tmp_path / name)
  shutil.copytree(built_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "train"), ignore_errors=True)
  return workdir


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "train", loop_lib.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def test_periodic_benchmarks_log_the_stage_metrics_and_keep_the_best(built, tmp_path):  # noqa: F811
  data = tmp_path / "bench_data"
  fx.pope_tsv(data, n=6)
  fx.mmstar_parquet(data, n=4)
  workdir = _fresh(built, tmp_path, "hook")
  config = _hook_config(
    workdir, data, eval_every_steps=3, eval_examples=5, eval_benchmarks="pope, mmstar,tinyworld",
    best_metric="eval/pope/headline", best_mode="max", keep_checkpoints=1, keep_best=1, lr=1e-2,
  )  # fmt: skip
  loop_lib.run_train(config, workdir)

  evals = {r["step"]: r for r in _rows(workdir) if "eval/pope/headline" in r}
  assert sorted(evals) == [3, 6]
  for r in evals.values():
    # eval_examples caps every benchmark: 5 of pope's 6 and all 4 of mmstar's.
    assert r["eval/pope/n"] == 5 and r["eval/mmstar/n"] == 4 and r["eval/tinyworld/n"] == 5
    assert {"eval/mmstar/accuracy", "eval/pope/f1_mean_over_splits", "eval/accuracy"} <= r.keys()
  # Predictions of each eval step sit next to the metrics log.
  preds = tmp_path / "hook" / "train" / "eval_benchmarks"
  assert sorted(os.listdir(preds)) == ["3", "6"]

  # The benchmarks stage on the final params: the same questions, outputs and numbers.
  graphdef, params, _ = loop_lib.load_params(config, workdir)
  from compact_jax.data import build as build_lib
  from compact_jax.data import template as template_lib
  from compact_jax.train import mesh as mesh_lib

  with config.unlocked():
    config.bench.benchmarks = ("pope", "mmstar", "tinyworld")
    config.bench.max_examples = 5
  model = bench_run.LoadedModel(
    graphdef, params, build_lib.load_tokenizer(workdir),
    template_lib.TEMPLATES[config.data.template], config.data.image_size,
    mesh_lib.make_mesh(config.mesh),
  )  # fmt: skip
  ckpt = {"path": workdir, "step": 6, "id": f"{workdir}@6"}
  res = bench_run.evaluate_model(
    config, model, tmp_path / "stage", checkpoint=ckpt, checkpoint_workdir=workdir
  )
  for name in ("pope", "mmstar", "tinyworld"):
    stage = res["benchmarks"][name]["metrics"]
    assert evals[6][f"eval/{name}/headline"] == pytest.approx(stage["headline"]), name
    hook_rows = (preds / "6" / f"{name}.jsonl").read_text().splitlines()
    stage_rows = (tmp_path / "stage" / "predictions" / f"{name}.jsonl").read_text().splitlines()
    assert [json.loads(x)["output"] for x in hook_rows] == [
      json.loads(x)["output"] for x in stage_rows
    ]
  # best_metric by a benchmark's headline: the kept best is the step with the higher value.
  keeper = checkpoint_lib.Checkpointer(
    loop_lib.checkpoint_dir(workdir), keep=1, best_metric="eval/pope/headline", best_mode="max"
  )
  best = keeper.best_step()
  keeper.close()
  assert evals[best]["eval/pope/headline"] == max(r["eval/pope/headline"] for r in evals.values())


def _gqa_tsv(data_dir: pathlib.Path, answers: list[str]) -> None:
  fx.write_tsv(data_dir / "gqa" / "GQA_TestDev_Balanced.tsv", [
    {"index": f"g{i}", "image": fx.b64(fx.RED if i % 2 else fx.BLUE),
     "question": f"What is the {w} made of?", "answer": a}
    for i, (w, a) in enumerate(zip(["table", "red cup", "big sign", "tree", "dog", "car"], answers))
  ])  # fmt: skip


def test_the_hook_scores_as_the_stage_and_compiles_its_decoders_once(built, tmp_path):  # noqa: F811
  from compact_jax.data import build as build_lib
  from compact_jax.data import template as template_lib
  from compact_jax.train import mesh as mesh_lib

  data = tmp_path / "bench_data"
  fx.pope_tsv(data, n=6)
  _gqa_tsv(data, ["placeholder"] * 6)
  workdir = _fresh(built, tmp_path, "once")
  config = _hook_config(workdir, data, eval_every_steps=1, eval_benchmarks=("pope", "gqa"))
  graphdef, params = _random_params(config, workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  tok = build_lib.load_tokenizer(workdir)
  # The stage's answers on these params; GQA's references then take the stage's output for
  # questions 0, 2, 4 and a string no output is for the rest: the hook must score 50.
  with config.unlocked():
    config.bench.benchmarks = ("gqa",)
  model = bench_run.LoadedModel(graphdef, params, tok, template_lib.TEMPLATES[config.data.template],
                                config.data.image_size, mesh)  # fmt: skip
  res = bench_run.evaluate_model(config, model, tmp_path / "stage", checkpoint={},
                                 checkpoint_workdir=workdir)  # fmt: skip
  rows = [
    json.loads(x) for x in (tmp_path / "stage/predictions/gqa.jsonl").read_text().splitlines()
  ]
  outputs = [r["output"] for r in rows]
  assert res["benchmarks"]["gqa"]["n"] == 6 and all(outputs)
  _gqa_tsv(data, [o if i % 2 == 0 else "never-an-output" for i, o in enumerate(outputs)])

  hook = loop_lib.TrainEvalHook(
    config, workdir, tok, mesh, max_examples=6, benchmarks=("pope", "gqa")
  )
  with jax.set_mesh(mesh):
    first = hook(graphdef, params, step=1)
    traces = hook.benchmarks.num_traces
    second = hook(graphdef, params, step=2)
  assert first["gqa/headline"] == pytest.approx(50.0) and first["gqa/n"] == 6
  assert traces >= 1 and hook.benchmarks.num_traces == traces  # no compile on the 2nd call
  assert first == second and first["pope/n"] == 6


def _random_params(config, workdir):
  from compact_jax.data import build as build_lib
  from compact_jax.train import mesh as mesh_lib
  from compact_jax.train import state as state_lib

  mesh = mesh_lib.make_mesh(config.mesh)
  vocab = build_lib.load_tokenizer(workdir).vocab_size
  setup, init_fn = state_lib.setup_state(config, vocab_size=vocab, mesh=mesh)
  with jax.set_mesh(mesh):
    state = init_fn()
  return setup.graphdef, state["params"]


def test_missing_benchmark_data_fails_before_training(built, tmp_path):  # noqa: F811
  workdir = _fresh(built, tmp_path, "missing")
  data = tmp_path / "empty"
  config = _hook_config(workdir, data, eval_every_steps=3, eval_benchmarks="pope")
  with pytest.raises(formats.MissingData) as e:
    loop_lib.run_train(config, workdir)
  assert str(data / "pope") in str(e.value) and "POPE.tsv" in str(e.value)
  assert "coco_pope_" in str(e.value) and "lmms-lab/POPE" in str(e.value)
  # Nothing trained: no checkpoint, no metrics line.
  assert not os.path.exists(loop_lib.checkpoint_dir(workdir)) or not os.listdir(
    loop_lib.checkpoint_dir(workdir)
  )
  assert not os.path.exists(os.path.join(workdir, "train", loop_lib.METRICS_FILE))


@pytest.mark.parametrize(
  "train, bench, match",
  [
    ({"eval_every_steps": 3, "eval_benchmarks": "pope,nope"}, True, "Unknown benchmark 'nope'"),
    ({"eval_every_steps": 0, "eval_benchmarks": "pope"}, True, "needs config.train.eval_every"),
    ({"eval_every_steps": 3, "eval_benchmarks": "pope"}, False, "has no `bench` section"),
    ({"eval_every_steps": 3, "eval_benchmarks": "pope,pope"}, True, "repeat"),
    (
      {"eval_every_steps": 3, "eval_benchmarks": "pope", "best_metric": "eval/gqa/headline"},
      True,
      "names benchmark 'gqa'",
    ),
  ],
)
def test_bad_benchmark_settings_fail_before_training(built, tmp_path, train, bench, match):  # noqa: F811
  workdir = _fresh(built, tmp_path, "bad")
  data = tmp_path / "bench_data"
  fx.pope_tsv(data)
  config = _hook_config(workdir, data, **train) if bench else _config(workdir, **train)
  with pytest.raises(ValueError, match=match):
    loop_lib.run_train(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "train", loop_lib.METRICS_FILE))


def test_a_misspelt_benchmark_metric_stops_at_the_first_eval(built, tmp_path):  # noqa: F811
  data = tmp_path / "bench_data"
  fx.pope_tsv(data)
  workdir = _fresh(built, tmp_path, "typo")
  config = _hook_config(
    workdir, data, eval_every_steps=3, eval_examples=2, eval_benchmarks="pope",
    best_metric="eval/pope/headlin", best_mode="max",
  )  # fmt: skip
  with pytest.raises(ValueError, match=r"'eval/pope/headlin' is not among .*eval/pope/headline"):
    loop_lib.run_train(config, workdir)
