"""The benchmark specs build matched models in compact_jax and in HF + peft."""

from __future__ import annotations

import functools
import pathlib
import sys

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import specs  # noqa: E402

from compact_jax.train import mesh as mesh_lib  # noqa: E402
from compact_jax.train import state as state_lib  # noqa: E402


@functools.cache
def jax_counts(spec: specs.Spec) -> tuple[int, int]:
  """(all params, trainable params) of the compact_jax side, from abstract shapes."""
  config = specs.jax_config(spec)
  mesh = mesh_lib.make_mesh(config.mesh, devices=mesh_lib.jax.devices()[:1])
  setup, _ = state_lib.setup_state(config, vocab_size=spec.vocab_size, mesh=mesh)
  return setup.num_params, setup.num_trainable


@pytest.fixture(scope="module")
def torch_peer():
  # torch, transformers and peft are test requirements: a missing one fails here.
  import torch_peer

  return torch_peer


@functools.cache
def hf_counts(size: str) -> dict[str, int]:
  import torch_peer

  return torch_peer.counts(torch_peer.build_model(specs.SPECS[size], lora=True))


@pytest.mark.parametrize("size", sorted(specs.SPECS))
def test_base_models_have_the_same_parameter_count(size, torch_peer):
  spec = specs.SPECS[size]
  hf = hf_counts(size)
  jax_all, jax_trainable = jax_counts(spec)
  hf_base = hf["params"] - hf["lora_params"]
  assert jax_all - jax_trainable == hf_base
  # The closed form (used nowhere else) agrees with both frameworks.
  assert specs.param_count(spec) == hf_base
  assert specs.lora_param_count(spec) == hf["lora_params"] == hf["trainable"]


@pytest.mark.parametrize("size", sorted(specs.SPECS))
def test_lora_trainable_counts_are_equal(size, torch_peer):
  """peft adapts k and v (and gate and up) with one adapter each; compact_jax's fused
  kv_einsum [2, K, D, H] and gating_einsum [2, D, F] get one adapter per slice
  (models/lora.py), so the trainable counts match exactly."""
  spec = specs.SPECS[size]
  hf = hf_counts(size)
  _, jax_trainable = jax_counts(spec)
  assert jax_trainable == hf["trainable"] == hf["lora_params"]


def test_model_flops_match_a_hand_count():
  f = specs.model_flops(specs.SPECS["tiny"])
  # ViT, forward only (2N): B*P = 8*64 = 512 rows; patch 8*8*3*128 = 24,576 params,
  # 2 blocks of 4*128^2 + 2*128*512 = 196,608 -> 417,792 matmul params.
  assert f.vit == 2 * 512 * 417_792 + 2 * 8 * 4 * 64**2 * 128
  # Connector (mlp2x_gelu 128 -> 256 -> 256), forward only: 98,304 params.
  assert f.connector == 2 * 512 * 98_304
  # LM linears (4N): B*S = 1024 tokens, 4 layers of 4*256^2 + 3*256*1024 = 1,048,576.
  assert f.llm_linear == 4 * 1024 * 4 * 1_048_576
  # LM attention: 4*S^2*D forward per layer and example, x3 with the backward.
  assert f.llm_attention == 3 * 4 * 8 * 4 * 128**2 * 256
  # Untied LM head 256 x 1024 on all 1024 tokens, 4N.
  assert f.lm_head == 4 * 1024 * 256 * 1024
  # LoRA, 6 r (I + O) per token: per layer q, k, v, o 8*512 each, gate/up/down 8*1280.
  assert f.lora == 6 * 1024 * 4 * (4 * 8 * 512 + 3 * 8 * 1280)
  assert f.total == pytest.approx(21_583_888_384, rel=0, abs=1)


def test_both_sides_take_the_loss_on_the_same_tokens(torch_peer):
  spec = specs.SPECS["tiny"]
  jb = specs.jax_batch(spec, seed=3)
  hf = torch_peer.hf_inputs(spec, specs.make_batch(spec, seed=3))
  labels = hf["labels"].numpy()
  # HF: the image placeholders, then the same text; labels only on the answer.
  assert (hf["input_ids"][:, : spec.image_tokens] == spec.image_token_id).all()
  np.testing.assert_array_equal(hf["input_ids"][:, spec.image_tokens :].numpy(), jb["tokens"])
  text_labels = labels[:, spec.image_tokens :]
  np.testing.assert_array_equal(text_labels != -100, jb["mask_loss"].astype(bool))
  np.testing.assert_array_equal(
    text_labels[jb["mask_loss"] == 1], jb["tokens"][jb["mask_loss"] == 1]
  )
  assert (labels[:, : spec.image_tokens] == -100).all()
  assert jb["mask_loss"].sum(1).tolist() == [spec.answer_len] * spec.batch_size
  np.testing.assert_array_equal(hf["pixel_values"].numpy(), jb["image"].transpose(0, 3, 1, 2))


def test_unknown_spec_is_named():
  with pytest.raises(ValueError, match="'huge'"):
    specs.get_spec("huge")
