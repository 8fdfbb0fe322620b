"""The export stage: a LoRA-trained workdir -> a merged npz that a LoRA-free model loads
with the same logits."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compact_jax import checkpoints
from compact_jax.train import export as export_lib
from compact_jax.train import loop as loop_lib
from compact_jax.train import mesh as mesh_lib
from compact_jax.train import state as state_lib
from tests.train.test_train import (  # noqa: F401 (fixture)
  _batches,
  _config,
  built,
  fresh_workdir,
  lora_groups,
)


def test_export_merges_adapters_and_a_plain_model_reproduces_the_logits(built, tmp_path):  # noqa: F811
  workdir = fresh_workdir(built, tmp_path, "export")
  groups = lora_groups()
  # lr high enough that the adapters' B (zero at init) moves far from zero in 3 steps.
  config = _config(workdir, param_groups=groups, total_steps=3, ckpt_every_steps=3, lr=3e-2)
  with config.unlocked():
    config.model.lora.targets = (r"llm/layers[^/]*/attn/(q|kv)_einsum/w$", r"llm/.*mlp/linear$")
  with pytest.raises(FileNotFoundError, match="no 'train' checkpoint"):
    export_lib.run_export(config, workdir)
  loop_lib.run_train(config, workdir)
  info = export_lib.run_export(config, workdir)
  assert info["step"] == 3 and info["merged_lora"]
  with np.load(info["npz"], allow_pickle=False) as f:
    keys = set(f.files)
  assert not any("_lora_" in k for k in keys)
  assert {k.split("/")[1] for k in keys} == {"img", "connector", "llm"}

  # The trained model, adapters unmerged, on real batches ...
  graphdef, params, meta = loop_lib.load_params(config, workdir)
  # The export directory carries the run's tokenizer byte for byte.
  assert os.path.dirname(info["tokenizer_file"]) == export_lib.export_dir(workdir)
  with open(info["tokenizer_file"], "rb") as f, open(meta["tokenizer"], "rb") as g:
    assert f.read() == g.read()
  trained = jax.tree.map(np.asarray, params)
  _, batches = _batches(workdir, config, 1)
  batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
  args = (
    batch["image"],
    batch["tokens"],
    batch["mask_ar"],
    batch["mask_input"],
    batch["has_image"],
  )
  want = jax.jit(lambda p: nnx.merge(graphdef, p)(*args)[0])(params)
  # ... and a model with no adapters at all, initialised from the export alone.
  with config.unlocked():
    config.model.lora.targets = ()
  plain = state_lib.build_model(
    config.model, vocab_size=meta["vocab_size"], image_size=info["image_size"], seed=123
  )
  loaded = checkpoints.init_from_npz(
    plain, info["npz"], {v: k for k, v in export_lib.PARTS.items()}
  )
  assert len(loaded) == len(keys)
  got = plain(*args)[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
  # The adapters changed the model: the merged q weight is not the frozen base.
  base_q = next(v for k, v in mesh_lib.path_names(trained).items() if k.endswith("attn/q_einsum/w"))
  with np.load(info["npz"], allow_pickle=False) as f:
    exported_q = next(f[k] for k in f.files if k.endswith("attn/q_einsum/w"))
  assert np.abs(exported_q - base_q).max() > 1e-4

  # A rerun for the same step is skipped; model.json is the record of what was written.
  mtime = os.path.getmtime(info["npz"])
  assert export_lib.run_export(config, workdir)["step"] == 3
  assert os.path.getmtime(info["npz"]) == mtime
  with open(os.path.join(export_lib.export_dir(workdir), export_lib.INFO_FILE)) as f:
    assert json.load(f)["merged_lora"] == info["merged_lora"]
