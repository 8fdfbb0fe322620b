"""The trainer: device-count invariance, bounded compiles, exact resume, NaN stop."""

import json
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

import configs.tiny_world as tiny_world
from compact_jax.data import build as build_lib
from compact_jax.data import pipeline as pipeline_lib
from compact_jax.data import records as records_lib
from compact_jax.data import template as template_lib
from compact_jax.models import connectors
from compact_jax.train import loop as loop_lib
from compact_jax.train import mesh as mesh_lib
from compact_jax.train import state as state_lib
from compact_jax.train import step as step_lib
from tests import helpers


def _config(workdir, **train):
  c = tiny_world.get_config("smoke")
  with c.unlocked():
    c.stages = ("build", "train")
    c.build.records = {"train": (os.path.join(workdir, "toy.jsonl"),)}
    c.build.image_roots = (workdir,)
    c.build.tokenizer_vocab_size = 128
    c.data.seq_buckets = (48, 64)
    c.train.init_from = ""
    c.model_init.path = ""
    c.model_init.parts = (("params/img/", "img/"), ("params/llm/", "llm/"))
    c.train.fail_on_recompile = True
    c.train.batch_size = 8
    c.train.total_steps = 6
    c.train.warmup_steps = 1
    c.train.log_every_steps = 1
    c.train.ckpt_every_steps = 3
    c.compilation_cache_dir = ""
    c.train.update(train)
  return c


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A workdir holding a built toy dataset (records -> TFDS + tokenizer)."""
  workdir = str(tmp_path_factory.mktemp("train"))
  os.makedirs(os.path.join(workdir, "img"))
  recs = []
  for i, conv in enumerate(helpers.toy_conversations(32)):
    path = f"img/{i}.png"
    Image.new("RGB", (64, 64), ((37 * i) % 256, 90, 200)).save(os.path.join(workdir, path))
    recs.append({"id": f"toy{i}", "image": path, "conversations": conv})
  records_lib.write_jsonl(recs, os.path.join(workdir, "toy.jsonl"))
  build_lib.run_build(_config(workdir), workdir)
  return workdir


def fresh_workdir(built_dir: str, tmp_path, name: str) -> str:
  """A copy of the ``built`` fixture's workdir without any training output."""
  import shutil

  workdir = str(tmp_path / name)
  shutil.copytree(built_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "train"), ignore_errors=True)
  return workdir


def lora_groups():
  """param_groups of a LoRA run: adapters at lr x1, the connector x0.1, the rest frozen."""
  from configs import base

  return (
    (base.LORA_TRAINABLE, 1.0),
    ("connector/.*", 0.1),
    (r"(img|llm)/" + base.NOT_LORA, None),
  )


def _batches(workdir, config, n):
  tok = build_lib.load_tokenizer(workdir)
  template = template_lib.TEMPLATES[config.data.template]
  source = build_lib.load_split(config, workdir, "train")
  _, idx = pipeline_lib.analyze(source, tok, template, config.data.seq_buckets)
  ds = pipeline_lib.make_train_dataset(
    source,
    idx,
    tok,
    template,
    image_size=64,
    batch_size=8,
    seq_buckets=config.data.seq_buckets,
    seed=0,
  )
  return tok, [ds[i] for i in range(n)]


def _run_steps(config, mesh, vocab, batches):
  """(metrics per step, final params) of the jitted step over ``batches``, and the step."""
  setup, init_fn = state_lib.setup_state(config, vocab_size=vocab, mesh=mesh)
  with jax.set_mesh(mesh):
    state = init_fn()
    step = step_lib.TrainStep(setup, config, mesh)
    out = []
    for b in batches:
      state, m = step(state, step_lib.to_global_batch(b, mesh))
      out.append(jax.device_get(m))
    return out, jax.device_get(state["params"]), step


def _losses(config, mesh, vocab, batches):
  metrics, _, step = _run_steps(config, mesh, vocab, batches)
  return [float(m["loss"]) for m in metrics], step


@pytest.fixture(scope="module")
def one_device_losses(built):
  config = _config(built)
  tok, batches = _batches(built, config, 2)
  # The same batch again at the end shows the updates lower its loss.
  batches = [batches[0], batches[1], batches[0]]
  one = mesh_lib.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)), jax.devices()[:1])
  losses, _ = _losses(config, one, tok.vocab_size, batches)
  assert losses[2] < losses[0]  # it is learning, not a constant
  return config, tok, batches, losses


def test_bfloat16_compute_keeps_float32_master_weights(built, one_device_losses):
  """``model.dtype="bfloat16"``: matmuls in bf16, params and updates in float32."""
  _, tok, batches, expected = one_device_losses
  config = _config(built)
  with config.unlocked():
    config.model.dtype = "bfloat16"
  one = mesh_lib.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)), jax.devices()[:1])
  metrics, params, _ = _run_steps(config, one, tok.vocab_size, batches)
  got = [float(m["loss"]) for m in metrics]
  dtypes = {str(np.asarray(v).dtype) for v in jax.tree.leaves(params)}
  assert dtypes == {"float32"}, dtypes
  # bf16 has an 8-bit mantissa: close to the float32 losses, but not equal to them.
  np.testing.assert_allclose(got, expected, rtol=3e-2)
  assert got != expected
  assert got[2] < got[0]


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_eight_devices_give_the_one_device_loss(one_device_losses, shape):
  """Data, FSDP and tensor parallelism change where math runs, not its result."""
  config, tok, batches, expected = one_device_losses
  mesh = mesh_lib.make_mesh(tuple(zip(("data", "fsdp", "tensor"), shape)))
  assert mesh.devices.size == 8
  setup, _ = state_lib.setup_state(config, vocab_size=tok.vocab_size, mesh=mesh)
  if shape[2] > 1:  # the rules really shard weights over the tensor axis
    specs = [s.spec for s in jax.tree.leaves(setup.shardings["params"])]
    assert any("tensor" in str(s) for s in specs) and any("fsdp" in str(s) for s in specs)
  got, _ = _losses(config, mesh, tok.vocab_size, batches)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_step_compiles_once_per_bucket(built):
  config = _config(built)
  tok, batches = _batches(built, config, 6)
  lengths = {b["tokens"].shape[1] for b in batches}
  mesh = mesh_lib.make_mesh(config.mesh)
  _, step = _losses(config, mesh, tok.vocab_size, batches * 2)
  assert step.num_traces == len(lengths) and step.num_retraces == 0


def test_implicit_transfers_in_the_step_fail(built):
  """The transfer guard: a host numpy batch would be a silent copy every step."""
  config = _config(built)
  tok, batches = _batches(built, config, 1)
  mesh = mesh_lib.make_mesh(config.mesh)
  setup, init_fn = state_lib.setup_state(config, vocab_size=tok.vocab_size, mesh=mesh)
  with jax.set_mesh(mesh):
    state = init_fn()
    step = step_lib.TrainStep(setup, config, mesh)
    with pytest.raises(Exception, match=r"[Dd]isallowed host-to-device transfer"):
      step(state, {k: batches[0][k] for k in step_lib.BATCH_KEYS})


def _final_params(workdir):
  config = _config(workdir)
  _, params, meta = loop_lib.load_params(config, workdir)
  return meta["step"], jax.tree.map(np.asarray, params)


def test_killed_run_resumes_to_the_identical_result(built, tmp_path, monkeypatch):
  import shutil

  straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
  for d in (straight, crashed):
    shutil.copytree(built, d)
    shutil.rmtree(os.path.join(d, "train"), ignore_errors=True)
  loop_lib.run_train(_config(straight), straight)

  real = step_lib.to_global_batch
  calls = {"n": 0}

  def crash_at_step_5(batch, mesh):
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt("simulated kill after the step-3 checkpoint")
    return real(batch, mesh)

  monkeypatch.setattr(step_lib, "to_global_batch", crash_at_step_5)
  with pytest.raises(KeyboardInterrupt):
    loop_lib.run_train(_config(crashed), crashed)
  monkeypatch.setattr(step_lib, "to_global_batch", real)
  assert loop_lib.latest_checkpoint_step(None, crashed) == 3
  result = loop_lib.run_train(_config(crashed), crashed)
  assert result.resumed_from == 3

  s1, p1 = _final_params(straight)
  s2, p2 = _final_params(crashed)
  assert s1 == s2 == 6
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  with open(os.path.join(crashed, "train", loop_lib.METRICS_FILE)) as f:
    steps = [json.loads(ln)["step"] for ln in f]
  assert steps == list(range(1, 7))  # nothing lost, nothing duplicated
  # A finished run is skipped on rerun.
  assert loop_lib.run_train(_config(crashed), crashed).skipped


def test_nan_loss_stops_with_a_clear_message(built, tmp_path, monkeypatch):
  import shutil

  workdir = str(tmp_path / "nan")
  shutil.copytree(built, workdir)
  real = step_lib.to_global_batch
  calls = {"n": 0}

  def poison(batch, mesh):
    calls["n"] += 1
    if calls["n"] == 2:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    return real(batch, mesh)

  monkeypatch.setattr(step_lib, "to_global_batch", poison)
  with pytest.raises(FloatingPointError, match="Non-finite loss or gradient at step 2"):
    loop_lib.run_train(_config(workdir, ckpt_every_steps=100), workdir)
  assert loop_lib.latest_checkpoint_step(None, workdir) is None  # nothing bad was saved


def _sigterm_at_step_2(built, tmp_path, monkeypatch):
  """A fresh copy of ``built`` whose training gets SIGTERM at step 2; (workdir, real batcher)."""
  import shutil
  import signal

  workdir = str(tmp_path / "term")
  shutil.copytree(built, workdir)
  shutil.rmtree(os.path.join(workdir, "train"), ignore_errors=True)
  real = step_lib.to_global_batch
  calls = {"n": 0}

  def preempt_at_step_2(batch, mesh):
    calls["n"] += 1
    if calls["n"] == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before preemption
    return real(batch, mesh)

  monkeypatch.setattr(step_lib, "to_global_batch", preempt_at_step_2)
  return workdir, real


def test_sigterm_saves_a_checkpoint_and_returns(built, tmp_path, monkeypatch):
  import signal

  workdir, real = _sigterm_at_step_2(built, tmp_path, monkeypatch)
  result = loop_lib.run_train(_config(workdir, ckpt_every_steps=100), workdir)
  assert result.preempted and result.final_step == 2
  assert loop_lib.latest_checkpoint_step(None, workdir) == 2
  assert signal.getsignal(signal.SIGTERM) is not None  # the handler was put back
  monkeypatch.setattr(step_lib, "to_global_batch", real)
  assert loop_lib.run_train(_config(workdir), workdir).resumed_from == 2


def test_a_preempted_stage_stops_the_launcher_before_the_next_stage(built, tmp_path, monkeypatch):
  """An eval (or an experiment's next arm) must never run on a half-trained checkpoint."""
  from compact_jax import main as main_lib
  from compact_jax import runtime

  workdir, _ = _sigterm_at_step_2(built, tmp_path, monkeypatch)
  config = _config(workdir, ckpt_every_steps=100)
  with config.unlocked():
    config.stages = ("train", "eval")
  with pytest.raises(runtime.Preempted, match=r"stage train .* not running \['eval'\]"):
    main_lib.run(config, workdir)
  assert loop_lib.latest_checkpoint_step(None, workdir) == 2
  assert not os.path.exists(os.path.join(workdir, "eval"))


def test_model_init_loads_a_big_vision_npz_into_the_sharded_state(built, tmp_path):
  from compact_jax.checkpoints import big_vision

  config = _config(built)
  tok = build_lib.load_tokenizer(built)
  mesh = mesh_lib.make_mesh(config.mesh)
  setup, init_fn = state_lib.setup_state(config, vocab_size=tok.vocab_size, mesh=mesh)
  with jax.set_mesh(mesh):
    params = init_fn()["params"]
  # A "pretrained" file: the same shapes with other values, towers only.
  rng = np.random.default_rng(0)
  flat = {
    k: rng.normal(size=v.shape).astype(np.float32)
    for k, v in mesh_lib.path_names(params).items()
    if k.startswith(("img/", "llm/"))
  }
  path = str(tmp_path / "pretrained.npz")
  big_vision.export_npz(flat, path, {"img/": "params/img/", "llm/": "params/llm/"})
  with config.unlocked():
    config.model_init.path = path
  loaded = state_lib.load_model_init(params, setup.shardings["params"], config.model_init)
  got = mesh_lib.path_names(loaded)
  for k, v in flat.items():
    np.testing.assert_array_equal(np.asarray(got[k]), v)
    assert got[k].sharding == mesh_lib.path_names(setup.shardings["params"])[k]
  # The connector is not in the file: it keeps its fresh init.
  before = mesh_lib.path_names(params)
  for k in got:
    if k.startswith("connector/"):
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(before[k]))
  # A file that lacks a tower parameter is an error naming it.
  del flat["llm/final_norm/scale"]
  big_vision.export_npz(flat, path, {"img/": "params/img/", "llm/": "params/llm/"})
  with pytest.raises(KeyError, match="llm/final_norm/scale"):
    state_lib.load_model_init(params, setup.shardings["params"], config.model_init)


def test_a_phase_starts_from_the_previous_phases_final_params(built, tmp_path):
  """``init_from``: phase 2's first params are phase 1's last, not a fresh init."""
  import shutil

  workdir = str(tmp_path / "phases")
  shutil.copytree(built, workdir)
  shutil.rmtree(os.path.join(workdir, "train"), ignore_errors=True)
  config = _config(workdir)
  with config.unlocked():
    config.pretrain.update(dict(config.train.to_dict(), split="train", total_steps=3))
    config.train.init_from = "pretrain"
    config.train.lr = 0.0  # no update (AdamW's decay scales with lr): params pass through
  with pytest.raises(FileNotFoundError, match="phase 'pretrain' has not finished"):
    loop_lib.run_train(config, workdir)
  assert loop_lib.run_train(config, workdir, phase="pretrain").final_step == 3
  assert os.path.isdir(loop_lib.checkpoint_dir(workdir, "pretrain"))
  loop_lib.run_train(config, workdir)
  _, pre, pre_meta = loop_lib.load_params(config, workdir, phase="pretrain")
  _, post, post_meta = loop_lib.load_params(config, workdir)
  assert (pre_meta["phase"], pre_meta["step"]) == ("pretrain", 3)
  assert (post_meta["phase"], post_meta["step"]) == ("train", 6)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(pre), jax.device_get(post))
  # A fresh init differs, so the equality above is the carried-over weights.
  mesh = mesh_lib.make_mesh(config.mesh)
  _, init_fn = state_lib.setup_state(config, vocab_size=pre_meta["vocab_size"], mesh=mesh)
  with jax.set_mesh(mesh):
    fresh = jax.device_get(init_fn()["params"])
  pairs = zip(jax.tree.leaves(fresh), jax.tree.leaves(jax.device_get(pre)))
  assert any(not np.array_equal(a, b) for a, b in pairs)


def test_lora_adapters_are_sharded_like_their_weights_and_keep_the_loss(built, one_device_losses):
  """All-projection LoRA on a 2x2x2 mesh: adapters sharded over fsdp/tensor, same loss as 1 device."""
  _, tok, batches, _ = one_device_losses
  config = _config(built)
  with config.unlocked():
    config.model.lora.targets = (
      r"llm/layers[^/]*/attn/(q|kv|attn_vec)_einsum/w$",
      r"llm/layers[^/]*/mlp/(gating_einsum|linear)$",
    )
  losses = {}
  for shape in ((1, 1, 1), (2, 2, 2)):
    devices = jax.devices()[: int(np.prod(shape))]
    mesh = mesh_lib.make_mesh(tuple(zip(("data", "fsdp", "tensor"), shape)), devices)
    setup, _ = state_lib.setup_state(config, vocab_size=tok.vocab_size, mesh=mesh)
    specs = {
      "/".join(str(p.key) for p in path): s.spec
      for path, s in jax.tree_util.tree_leaves_with_path(setup.shardings["params"])
    }
    adapters = {k: v for k, v in specs.items() if "_lora_" in k}
    assert len(adapters) == 10
    if shape == (2, 2, 2):
      assert all(any(ax is not None for ax in spec) for spec in adapters.values()), adapters
    metrics, _, _ = _run_steps(config, mesh, tok.vocab_size, batches)
    losses[shape] = [float(m["loss"]) for m in metrics]
  np.testing.assert_allclose(losses[(2, 2, 2)], losses[(1, 1, 1)], atol=1e-5, rtol=0)
  assert losses[(1, 1, 1)][2] < losses[(1, 1, 1)][0]


def test_lora_phase_trains_adapters_and_connector_only(built, tmp_path):
  """LLaVA-1.5 stage 2 groups: frozen towers stay bit-identical and carry no optimizer
  state; adapters and connector move."""
  workdir = fresh_workdir(built, tmp_path, "lora")
  groups = lora_groups()
  config = _config(workdir, param_groups=groups, total_steps=3, ckpt_every_steps=3)
  with config.unlocked():
    config.model.lora.targets = (r"llm/layers[^/]*/attn/(q|kv)_einsum/w$",)
  tok = build_lib.load_tokenizer(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  setup, init_fn = state_lib.setup_state(config, vocab_size=tok.vocab_size, mesh=mesh)
  with jax.set_mesh(mesh):
    before = mesh_lib.path_names(jax.device_get(init_fn()["params"]))
  lora = sorted(k for k in before if "_lora_" in k)
  assert lora and set(setup.group_members["g0"]) == set(lora)
  # Adam keeps mu and nu for trainable params only (plus scalar counts).
  opt_sizes = sum(x.size for x in jax.tree.leaves(setup.abstract["opt_state"]) if x.ndim)
  assert opt_sizes == 2 * setup.num_trainable
  assert setup.num_trainable == sum(
    before[k].size for k in before if "_lora_" in k or k.startswith("connector/")
  )

  loop_lib.run_train(config, workdir)
  _, after, _ = loop_lib.load_params(config, workdir)
  after = mesh_lib.path_names(jax.device_get(after))
  for k, v in before.items():
    if "_lora_" in k or k.startswith("connector/"):
      if not k.endswith("_lora_a"):  # A gets a gradient only once B is non-zero
        assert not np.array_equal(v, after[k]), f"{k} did not train"
    else:
      np.testing.assert_array_equal(v, after[k], err_msg=f"frozen {k} changed")


@pytest.mark.parametrize("connector", sorted(connectors.CONNECTORS))
def test_the_trainer_trains_every_connector(built, tmp_path, connector):
  """Issue 4: each connector of the menu trains through the real loop (stage-1 style:
  only the connector learns), with finite losses, and its checkpoint restores."""
  workdir = fresh_workdir(built, tmp_path, f"conn_{connector}")
  prefix = "img/head/" if connector == "linear" else "connector/"
  trained = prefix + ".*"
  config = _config(
    workdir, param_groups=((trained, 1.0), (f"(?!{prefix}).*", None)), total_steps=2,
    ckpt_every_steps=2,
    lr=1e-2,
  )  # fmt: skip
  with config.unlocked():
    config.model.connector = connector
  tok = build_lib.load_tokenizer(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, init_fn = state_lib.setup_state(config, vocab_size=tok.vocab_size, mesh=mesh)
  with jax.set_mesh(mesh):
    before = mesh_lib.path_names(jax.device_get(init_fn()["params"]))
  loop_lib.run_train(config, workdir)
  with open(os.path.join(workdir, "train", loop_lib.METRICS_FILE)) as f:
    losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
  assert len(losses) == 2 and np.isfinite(losses).all()
  _, after, _ = loop_lib.load_params(config, workdir)
  after = mesh_lib.path_names(jax.device_get(after))
  moved = [
    k for k in before if re.fullmatch(trained, k) and not np.array_equal(before[k], after[k])
  ]
  assert moved, f"no {connector} parameter trained"
  frozen = [k for k in before if not re.fullmatch(trained, k)]
  assert all(np.array_equal(before[k], after[k]) for k in frozen)
