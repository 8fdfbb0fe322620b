"""Model FLOPs per step: a hand count on a smoke model, and XLA's own count."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import configs.llava15_7b as llava15_7b
import configs.tiny_world as tiny_world
from compact_jax.models import llm as llm_lib
from compact_jax.models import lora as lora_lib
from compact_jax.models import siglip
from compact_jax.train import flops as flops_lib
from compact_jax.train import optimizer as optimizer_lib
from compact_jax.train import state as state_lib

FREEZE_VIT = (("img/.*", None), ("(connector|llm)/.*", 1.0))
CONNECTOR_ONLY = (("connector/.*", 1.0), ("(img|llm)/.*", None))
# Exactly one pattern per parameter: the frozen one must exclude the adapters.
LORA_ONLY = ((r".*_lora_[ab]", 1.0), (r".*(?<!_lora_a)(?<!_lora_b)", None))
LORA_TARGETS = (r"llm/layers(_\d+)?/attn/(q|kv)_einsum/w$",)


def _model(model_cfg, *, vocab, image_size, lora_rank=0):
  """(graphdef, abstract params): shapes only, nothing is initialised or compiled.

  The config's own LoRA (llava15_7b's stage 2) is dropped: these counts add adapters
  explicitly (``lora_rank``) so the hand counts stay readable."""
  model_cfg = model_cfg.copy_and_resolve_references()
  with model_cfg.unlocked():
    model_cfg.lora.targets = ()

  def make():
    model = state_lib.build_model(model_cfg, vocab_size=vocab, image_size=image_size, seed=0)
    if lora_rank:
      lora_lib.apply_lora(model, lora_lib.LoraConfig(LORA_TARGETS, rank=lora_rank))
    return model

  graphdef, params = nnx.split(nnx.eval_shape(make), nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def _count(model_cfg, params, groups, *, vocab, image_size, batch, seq):
  shapes, trained = flops_lib.shapes_and_trainable(
    params, optimizer_lib.trainable_mask(params, groups)
  )
  return flops_lib.step_flops(
    model_cfg,
    vocab_size=vocab,
    image_size=image_size,
    batch_size=batch,
    seq_len=seq,
    shapes=shapes,
    trainable=trained,
  )


# --- the hand count -------------------------------------------------------------------
# llava15_7b:tiny is smoke/16 @ 64 px (16 patches, width 32, mlp 64, one block),
# mlp2x_gelu 32 -> 32 -> 32, smoke_llama (width 32, 2 heads x 16, 2 kv heads, mlp 64,
# one layer, untied head). Vocabulary 128, B = 2 examples of T = 8 text tokens, so
# the LLM sees S = 16 + 8 = 24 tokens. Forward FLOPs per example, 2 per multiply-add:
P, D, FV, V, T, B, S, R = 16, 32, 64, 128, 8, 2, 24, 4
PATCH = 2 * P * (16 * 16 * 3) * D  # patch embedding
VIT_PROJ = 2 * P * D * D * 4 + 2 * P * D * FV * 2  # q, k, v, out; two MLP denses
VIT_ATTN = 2 * (2 * P * P * D)  # scores + values over the full P x P square
CONN0 = CONN1 = 2 * P * D * D
LLM_Q = LLM_OUT = 2 * S * D * (2 * 16)
LLM_KV = 2 * S * D * (2 * 2 * 16)
LLM_MLP = 2 * S * D * (2 * 64) + 2 * S * 64 * D  # gate+up, down
LLM_ATTN = 2 * (2 * S * S * 2 * 16)
HEAD_ALL, HEAD_TEXT = 2 * S * D * V, 2 * T * D * V
FORWARD = PATCH + VIT_PROJ + VIT_ATTN + CONN0 + CONN1
FORWARD += LLM_Q + LLM_KV + LLM_OUT + LLM_MLP + LLM_ATTN + HEAD_ALL
# LoRA (rank R) on q [2, 32, 16] (I = 32, O = 32) and on each slice of kv [2, 2, 32, 16]
# (k and v: I = 32, O = 32 each), forward x.A and (x.A).B on the activations.
LORA_A = 2 * S * R * 32 * 3  # x.A for q, k, v
LORA_B = 2 * S * R * 32 * 3  # (x.A).B for q, k, v


def _rest_of_llm(mult):
  return mult * (LLM_OUT + LLM_MLP + LLM_ATTN)


@pytest.fixture(scope="module")
def smoke():
  cfg = llava15_7b.get_config("tiny")
  return cfg.model, _model(cfg.model, vocab=V, image_size=64)[1]


@pytest.mark.parametrize(
  "groups, model, executed",
  [
    # Everything trained: 3x each matmul, but nothing needs the image's gradient.
    (
      ((".*", 1.0),),
      2 * PATCH + 3 * (FORWARD - PATCH - HEAD_ALL) + 3 * HEAD_TEXT,
      2 * PATCH + 3 * (FORWARD - PATCH),
    ),
    # Frozen ViT (forward only); the connector's first dense needs no input gradient.
    (
      FREEZE_VIT,
      PATCH
      + VIT_PROJ
      + VIT_ATTN
      + 2 * CONN0
      + 3 * CONN1
      + 3 * (LLM_Q + LLM_KV)
      + _rest_of_llm(3)
      + 3 * HEAD_TEXT,
      PATCH
      + VIT_PROJ
      + VIT_ATTN
      + 2 * CONN0
      + 3 * CONN1
      + 3 * (LLM_Q + LLM_KV)
      + _rest_of_llm(3)
      + 3 * HEAD_ALL,
    ),
    # Connector alignment: the frozen LLM is backpropagated through (2x, attention 3x).
    (
      CONNECTOR_ONLY,
      PATCH
      + VIT_PROJ
      + VIT_ATTN
      + 2 * CONN0
      + 3 * CONN1
      + 2 * (LLM_Q + LLM_KV)
      + 2 * (LLM_OUT + LLM_MLP)
      + 3 * LLM_ATTN
      + 2 * HEAD_TEXT,
      PATCH
      + VIT_PROJ
      + VIT_ATTN
      + 2 * CONN0
      + 3 * CONN1
      + 2 * (LLM_Q + LLM_KV)
      + 2 * (LLM_OUT + LLM_MLP)
      + 3 * LLM_ATTN
      + 2 * HEAD_ALL,
    ),
  ],
)
def test_hand_count(smoke, groups, model, executed):
  model_cfg, params = smoke
  got = _count(model_cfg, params, groups, vocab=V, image_size=64, batch=B, seq=T)
  assert got.forward == B * FORWARD
  assert got.model == B * model
  assert got.executed == B * executed
  assert got.text_tokens == B * T
  assert sum(got.by_part.values()) == pytest.approx(got.model)


def test_hand_count_lora():
  cfg = llava15_7b.get_config("tiny")
  _, params = _model(cfg.model, vocab=V, image_size=64, lora_rank=R)
  got = _count(cfg.model, params, LORA_ONLY, vocab=V, image_size=64, batch=B, seq=T)
  frozen_front = PATCH + VIT_PROJ + VIT_ATTN + CONN0 + CONN1
  # q/kv: frozen base weights with nothing trained before them (forward only);
  # everything after them is backpropagated through.
  llm = LLM_Q + LLM_KV + 2 * (LLM_OUT + LLM_MLP) + 3 * LLM_ATTN
  # Adapters: trained matmul pairs on the activations. x.A: forward + dA (nothing earlier
  # is trained, so no dx); (x.A).B: forward + dB + d(x.A), which dA needs.
  lora = 2 * LORA_A + 3 * LORA_B
  assert got.by_part["lora"] == B * lora
  assert got.model == B * (frozen_front + llm + 2 * HEAD_TEXT + lora)
  # Executed: the same (no merged weight, no full weight gradient), the head on all S.
  assert got.executed == B * (frozen_front + llm + 2 * HEAD_ALL + lora)
  assert got.forward == B * (FORWARD + LORA_A + LORA_B)


def test_unknown_parameter_is_an_error(smoke):
  model_cfg, params = smoke
  params = {**params, "extra": {"kernel": jax.ShapeDtypeStruct((3, 3), jnp.float32)}}
  with pytest.raises(ValueError, match=r"present but not counted.*extra/kernel"):
    _count(model_cfg, params, ((".*", 1.0),), vocab=V, image_size=64, batch=B, seq=T)


def test_mfu_and_chips():
  # 1e15 FLOPs in 2 s on 4 v5e chips (788e12 FLOP/s): 63.5%.
  peak = flops_lib.PEAK_FLOPS["tpu_v5e"] * 4
  assert flops_lib.mfu(1e15, 2.0, peak) == pytest.approx(1e15 / 2.0 / 788e12)
  assert flops_lib.chip_name("TPU v5 lite") == "tpu_v5e"
  assert flops_lib.chip_name("TPU v5") == "tpu_v5p"
  assert flops_lib.chip_name("cpu") is None
  with pytest.raises(ValueError, match="positive"):
    flops_lib.mfu(1e15, 0.0, peak)


# --- against XLA ----------------------------------------------------------------------
# XLA's count includes elementwise work (norms, softmax, GELU, the loss), so the
# model must be wide enough for matmuls to dominate: width 128 towers (the tiny
# world's tiny/16 and mini, cut to one layer to compile fast). Unscanned, because
# XLA's cost analysis counts a while loop's body once, not once per layer.
# Measured: XLA counts +1.7% (forward) to +2.3% (steps) more. Tolerance 4%.
XLA_TOL = 0.04


@pytest.fixture
def mini(monkeypatch):
  monkeypatch.setitem(siglip.VARIANTS, "w128d1", (128, 1, 512, 4))
  lm = dataclasses.replace(llm_lib.VARIANTS["mini"], depth=1)
  monkeypatch.setitem(llm_lib.VARIANTS, "mini_d1", lm)
  cfg = tiny_world.get_config()
  with cfg.unlocked():
    cfg.model.vit_variant = "w128d1/16"
    cfg.model.llm_variant = "mini_d1"
    cfg.model.scan_layers = False
  return cfg.model


def _xla_step_flops(graphdef, params, groups, *, batch, seq, vocab, image_size, forward=False):
  trainable = optimizer_lib.trainable_mask(params, groups)
  image = jnp.zeros((batch, image_size, image_size, 3))
  tokens = jnp.zeros((batch, seq), jnp.int32)
  mask_ar = jnp.ones((batch, seq), jnp.int32)
  valid = jnp.ones((batch, seq), bool)
  has_image = jnp.ones((batch,), bool)

  def loss(p):
    logits, _ = state_lib.merge_model(graphdef, p)(image, tokens, mask_ar, valid, has_image)
    return logits.mean()

  def grads(p):
    # As in train/step.py: the loss is an output (so the forward is not dead
    # code), and frozen gradients are replaced by constants.
    value, g = jax.value_and_grad(loss)(p)
    return value, jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), g, trainable)

  return flops_lib.xla_flops(jax.jit(loss if forward else grads).lower(params).compile())


@pytest.mark.parametrize(
  "groups, lora_rank, forward",
  [(FREEZE_VIT, 0, True), (CONNECTOR_ONLY, 0, False), (LORA_ONLY, 8, False)],
  ids=["forward", "connector_only_step", "lora_step"],
)
def test_matches_xla(mini, groups, lora_rank, forward):
  kw = dict(batch=2, seq=32, vocab=512, image_size=64)
  graphdef, params = _model(mini, vocab=512, image_size=64, lora_rank=lora_rank)
  ours = _count(mini, params, groups, **kw)
  xla = _xla_step_flops(graphdef, params, groups, forward=forward, **kw)
  expected = ours.forward if forward else ours.executed
  assert xla == pytest.approx(expected, rel=XLA_TOL)
