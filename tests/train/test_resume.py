"""Resume across processes and meshes: kill -9 in a subprocess, restore onto another mesh."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from compact_jax.data import build as build_lib
from compact_jax.train import checkpoint as checkpoint_lib
from compact_jax.train import loop as loop_lib
from compact_jax.train import mesh as mesh_lib
from compact_jax.train import state as state_lib
from compact_jax.train import step as step_lib
from tests.train.test_train import _batches, _config, built  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOTAL_STEPS = 24
CKPT_EVERY = 4


def _launch(workdir: str, stages: str = '("train",)') -> subprocess.Popen:
  """The launcher on the toy dataset, with test_train's smoke-sized overrides."""
  cache = os.environ.get("COMPACT_JAX_TEST_XLA_CACHE", "")
  flags = {
    "stages": stages,
    "data.seq_buckets": "(48,64)",
    "train.init_from": "",
    "model_init.path": "",
    "train.batch_size": "8",
    "train.total_steps": str(TOTAL_STEPS),
    "train.warmup_steps": "1",
    "train.log_every_steps": "1",
    "train.ckpt_every_steps": str(CKPT_EVERY),
    "train.fail_on_recompile": "True",
    "compilation_cache_dir": cache,
  }
  cmd = [
    sys.executable,
    "-m",
    "compact_jax.main",
    "--config=configs/tiny_world.py:smoke",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in flags.items()),
  ]
  # XLA_FLAGS (8 fake devices) and JAX_PLATFORMS come from tests/conftest.py.
  with open(os.path.join(workdir, "log.txt"), "ab") as log:  # the child keeps its own fd
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "train", loop_lib.METRICS_FILE)) as f:
    rows = [json.loads(ln) for ln in f if ln.strip()]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), f"duplicated or unordered steps {steps}"
  return {r["step"]: r["loss"] for r in rows}


def _log(workdir: str, tail: int = 3000) -> str:
  with open(os.path.join(workdir, "log.txt"), errors="replace") as f:
    return f.read()[-tail:]


@pytest.mark.slow
def test_kill_dash_9_then_rerun_continues_with_the_identical_losses(built, tmp_path):  # noqa: F811
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  for d in (straight, killed):
    shutil.copytree(built, d)
    shutil.rmtree(os.path.join(d, "train"), ignore_errors=True)
  # Both first runs at once: the machine has two cores.
  ref = _launch(straight)
  victim = _launch(killed)
  deadline = time.time() + 600  # a hang guard; a loaded CI box is slow
  try:
    while loop_lib.latest_checkpoint_step(None, killed) is None:
      assert victim.poll() is None, f"the run ended before its first checkpoint:\n{_log(killed)}"
      assert time.time() < deadline, "no checkpoint within 600 s"
      time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)  # no handler, no flush, no final save
    assert victim.wait(timeout=30) == -signal.SIGKILL
  finally:
    if victim.poll() is None:
      victim.kill()
  assert ref.wait(timeout=600) == 0, _log(straight)

  resume_step = loop_lib.latest_checkpoint_step(None, killed)
  assert resume_step is not None and resume_step < TOTAL_STEPS, (
    f"killed too late to test a resume (latest checkpoint {resume_step})"
  )
  rerun = _launch(killed)
  assert rerun.wait(timeout=600) == 0, _log(killed)
  assert f"Resumed from step {resume_step}" in _log(killed, tail=10**9)

  expected, got = _losses(straight), _losses(killed)
  assert sorted(expected) == sorted(got) == list(range(1, TOTAL_STEPS + 1))
  after = [s for s in expected if s > resume_step]
  # Bit-identical: same batches (restored iterator), same state, same programs.
  assert [got[s] for s in after] == [expected[s] for s in after]
  # A different value at some step would mean the comparison is vacuous.
  assert len(set(expected.values())) > 1


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_runs_no_later_stage(built, tmp_path):  # noqa: F811
  workdir = str(tmp_path / "term")
  shutil.copytree(built, workdir)
  shutil.rmtree(os.path.join(workdir, "train"), ignore_errors=True)
  proc = _launch(workdir, stages='("train","eval")')
  deadline = time.time() + 600
  try:
    while not os.path.exists(os.path.join(workdir, "train", loop_lib.METRICS_FILE)):
      assert proc.poll() is None, f"the run ended before its first step:\n{_log(workdir)}"
      assert time.time() < deadline, "no training step within 600 s"
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends before preemption
    assert proc.wait(timeout=120) == 0, _log(workdir)
  finally:
    if proc.poll() is None:
      proc.kill()
  saved = loop_lib.latest_checkpoint_step(None, workdir)
  assert saved is not None and saved < TOTAL_STEPS, _log(workdir)
  assert "Rerun the same command to resume" in _log(workdir, tail=10**9)
  assert not os.path.exists(os.path.join(workdir, "eval"))


def test_restore_onto_another_mesh_gives_the_same_params_and_next_loss(built, tmp_path):  # noqa: F811
  """Saved from an 8-way data mesh, restored onto data x fsdp x tensor = 2 x 2 x 2."""
  config = _config(built)
  tok, batches = _batches(built, config, 2)
  vocab = tok.vocab_size

  def mesh_of(shape):
    return mesh_lib.make_mesh(tuple(zip(("data", "fsdp", "tensor"), shape)))

  src_mesh, dst_mesh = mesh_of((8, 1, 1)), mesh_of((2, 2, 2))
  src_setup, init_fn = state_lib.setup_state(config, vocab_size=vocab, mesh=src_mesh)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"), keep=1)
  with jax.set_mesh(src_mesh):
    state = init_fn()
    step = step_lib.TrainStep(src_setup, config, src_mesh)
    state, _ = step(state, step_lib.to_global_batch(batches[0], src_mesh))
    saved_params = jax.device_get(state["params"])
    ckpt.save(1, state, data={"iterator": "{}"}, meta={"mesh": dict(src_mesh.shape)}, force=True)
    ckpt.wait()
    _, expected = step(state, step_lib.to_global_batch(batches[1], src_mesh))
    expected_loss = float(expected["loss"])

  dst_setup, _ = state_lib.setup_state(config, vocab_size=vocab, mesh=dst_mesh)
  # The target really is sharded differently (tensor- and fsdp-split weights).
  specs = [str(s.spec) for s in jax.tree.leaves(dst_setup.shardings["params"])]
  assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)
  with jax.set_mesh(dst_mesh):
    restored, _, meta = ckpt.restore(dst_setup.abstract, 1)
    ckpt.close()
    assert meta["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    for got, want in zip(
      jax.tree.leaves(restored["params"]), jax.tree.leaves(dst_setup.shardings["params"])
    ):
      assert got.sharding == want
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["params"]), saved_params)
    step = step_lib.TrainStep(dst_setup, config, dst_mesh)
    _, got = step(restored, step_lib.to_global_batch(batches[1], dst_mesh))
  np.testing.assert_allclose(float(got["loss"]), expected_loss, atol=1e-5, rtol=0)


def test_another_process_count_explains_what_happens_to_the_data():
  msg = loop_lib.iterator_remap_message(4, 2, 120)
  assert "written by 4 process(es); this run has 2" in msg
  assert "restore exactly" in msg and "from batch 120" in msg
  assert "seen twice" in msg and "not at all" in msg


def test_a_resume_with_another_process_count_logs_the_data_message(
  built,  # noqa: F811
  tmp_path,
  monkeypatch,
  caplog,
):
  """A checkpoint whose meta says 2 processes resumes here (1) with the message."""
  workdir = str(tmp_path / "procs")
  shutil.copytree(built, workdir)
  shutil.rmtree(os.path.join(workdir, "train"), ignore_errors=True)
  config = _config(workdir, total_steps=3, ckpt_every_steps=3)
  loop_lib.run_train(config, workdir)
  tok = build_lib.load_tokenizer(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  setup, _ = state_lib.setup_state(config, vocab_size=tok.vocab_size, mesh=mesh)
  directory = loop_lib.checkpoint_dir(workdir)
  ckpt = checkpoint_lib.Checkpointer(directory)
  with jax.set_mesh(mesh):
    state, data, meta = ckpt.restore(setup.abstract, 3)
    ckpt.close()
    # Rewrite step 3 as if two processes had written it.
    shutil.rmtree(os.path.join(directory, "3"))
    ckpt = checkpoint_lib.Checkpointer(directory)
    ckpt.save(3, state, data=data, meta={**meta, "process_count": 2}, force=True)
    ckpt.close()
  caplog.set_level("WARNING")
  result = loop_lib.run_train(_config(workdir, total_steps=4, ckpt_every_steps=4), workdir)
  assert result.resumed_from == 3 and result.final_step == 4
  assert loop_lib.iterator_remap_message(2, 1, 3) in caplog.text
