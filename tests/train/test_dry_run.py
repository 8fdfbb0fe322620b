"""The dry run: compiles the real step from shapes alone and reports memory and FLOPs."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

import configs.llava15_7b as llava15_7b
from compact_jax.models import vlm as vlm_lib
from compact_jax.train import dry_run as dry_run_lib
from compact_jax.train import flops as flops_lib
from compact_jax.train import state as state_lib

VOCAB, BATCH, SEQ = 128, 8, 32
# Exactly one pattern per parameter: ViT frozen, connector and LLM trained.
GROUPS = (("img/.*", None), ("(connector|llm)/.*", 1.0))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config():
  c = llava15_7b.get_config("tiny")
  with c.unlocked():
    c.mesh = (("data", 1), ("fsdp", 8), ("tensor", 1))
    c.train.batch_size = BATCH
    c.train.param_groups = GROUPS
    c.data.seq_buckets = (16, SEQ)
  return c


@pytest.fixture(scope="module")
def report():
  before = {id(a) for a in jax.live_arrays()}
  out = dry_run_lib.dry_run(_config(), vocab_size=VOCAB, chip="tpu_v5e")
  new = [a for a in jax.live_arrays() if id(a) not in before]
  return out, new


def _abstract_model():
  c = _config()
  return jax.eval_shape(
    lambda: state_lib.build_model(c.model, vocab_size=VOCAB, image_size=64, seed=0)
  )


def _by_hand():
  """(total, trainable, per-device) param bytes. With fsdp = 8 and the default rules,
  a parameter is split 8 ways along its "embed" axis when 8 divides it (every
  width here is 32), and replicated otherwise."""
  from flax import nnx

  model = _abstract_model()
  shapes = vlm_lib.param_paths(nnx.state(model, nnx.Param))
  axes = vlm_lib.param_logical_axes(nnx.state(model, nnx.Param))
  total = trainable = per_device = 0
  for name, shape in shapes.items():
    size = 4 * math.prod(shape)
    total += size
    trainable += 0 if name.startswith("img/") else size
    embed = [d for d, a in zip(shape, axes[name]) if a == "embed"]
    per_device += size // 8 if embed and embed[0] % 8 == 0 else size
  return total, trainable, per_device


def test_reports_memory_without_allocating(report):
  rep, new = report
  # Nothing was materialised: no device array of any size appeared.
  assert sum(a.size for a in new) == 0
  mem = rep["memory_analysis"]
  assert mem["arguments"] > 0 and mem["outputs"] > 0 and mem["temps"] > 0
  # The state is donated: its outputs reuse its argument buffers.
  assert mem["aliased"] > 0
  assert mem["peak_estimate"] == (mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temps"])
  assert rep["fit"]["fits"] is True and rep["fit"]["chip"] == "tpu_v5e"
  assert rep["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert rep["batch"]["seq_len"] == SEQ and rep["batch"]["batch_size"] == BATCH


def test_param_bytes_match_hand_count(report):
  rep, _ = report
  total, trainable, per_device = _by_hand()
  by = rep["bytes_per_device"]
  assert by["params"] == per_device
  assert rep["params"]["total"] * 4 == total
  assert rep["params"]["trainable"] * 4 == trainable
  # AdamW keeps mu and nu (fp32, sharded like the params) for trained params only;
  # the frozen ViT has no optimizer state. Trained params are all connector/LLM
  # ones, every one of which has an 8-divisible embed axis or is a 1-D norm.
  assert trainable // 8 * 2 < by["opt_state"] < trainable * 2
  # XLA's own accounting of the step's inputs: state + batch, to the byte
  # (or within per-buffer alignment).
  ours = by["params"] + by["opt_state"] + by["batch"] + by["step"]
  assert ours <= rep["memory_analysis"]["arguments"] <= ours + 64 * 200


def test_groups_and_flops(report):
  rep, _ = report
  groups = rep["groups"]
  assert set(groups) == {"frozen", "g1"}
  assert groups["frozen"]["params"] == rep["params"]["frozen"]
  assert groups["g1"]["params"] == rep["params"]["trainable"]
  for g in groups.values():
    assert sum(s["arrays"] for s in g["specs"].values()) == g["arrays"]
  specs = groups["g1"]["specs"]
  assert any("'fsdp'" in spec for spec in specs)
  fl = rep["flops"]
  # Frozen ViT forward only, trained LLM: model FLOPs sit between 2x and 6x the
  # forward; XLA's count (scanned stacks counted once) is positive.
  assert fl["model_per_step"] > 0 and fl["xla_cost_analysis_per_step"] > 0
  assert fl["by_part"]["img"] > 0 and fl["by_part"]["llm"] > fl["by_part"]["img"]
  assert rep["fit"]["ideal_step_seconds"] == pytest.approx(
    fl["model_per_step"] / (flops_lib.PEAK_FLOPS["tpu_v5e"] * 8)
  )
  text = dry_run_lib.format_report(rep)
  assert "peak estimate" in text and "fits in tpu_v5e" in text


def test_parse_mesh():
  assert dry_run_lib.parse_mesh("data=2,fsdp=4") == (("data", 2), ("fsdp", 4), ("tensor", 1))
  assert dry_run_lib.parse_mesh("fsdp=-1") == (("data", 1), ("fsdp", -1), ("tensor", 1))
  with pytest.raises(ValueError, match="AXIS=SIZE"):
    dry_run_lib.parse_mesh("model=8")
  with pytest.raises(ValueError, match="integer"):
    dry_run_lib.parse_mesh("fsdp=x")


def test_batch_must_divide_over_batch_axes():
  mesh = jax.make_mesh(
    (8, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  with pytest.raises(ValueError, match="batch size 12 does not divide over the 8 devices"):
    dry_run_lib.abstract_batch(mesh, batch_size=12, seq_len=8, image_size=64)


def test_command_line(report, tmp_path):
  """The CLI sets up its own simulated devices and applies --mesh and --config.* overrides.
  It compiles the same program as the fixture, so the shared compilation cache
  makes this cheap."""
  out = tmp_path / "report.json"
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.environ["COMPACT_JAX_TEST_XLA_CACHE"])
  env.pop("XLA_FLAGS", None)
  cmd = [
    sys.executable,
    "-m",
    "compact_jax.train.dry_run",
    "--config=configs/llava15_7b.py:tiny",
    "--mesh=fsdp=8",
    f"--vocab_size={VOCAB}",
    "--chip=tpu_v5e",
    f"--json_out={out}",
    f"--config.train.batch_size={BATCH}",
    f"--config.data.seq_buckets=(16,{SEQ})",
    f"--config.train.param_groups={GROUPS!r}",
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "peak estimate" in proc.stdout
  got = json.loads(out.read_text())
  rep, _ = report
  assert got["devices"]["count"] == 8
  assert got["mesh"] == rep["mesh"]
  assert got["bytes_per_device"] == rep["bytes_per_device"]
  assert got["memory_analysis"] == rep["memory_analysis"]
