"""Regex parameter groups, frozen parameters and the LR schedule."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from compact_jax.train import optimizer as optimizer_lib

PARAMS = {
  "img": {"embedding": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}},
  "llm": {"final_norm": {"scale": jnp.ones((3,))}, "layers": {"w": jnp.ones((3, 3))}},
}


def _cfg(**kw):
  c = ml_collections.ConfigDict(
    dict(
      lr=0.1,
      warmup_steps=2,
      total_steps=10,
      end_lr_fraction=0.1,
      weight_decay=0.0,
      b1=0.9,
      b2=0.99,
      grad_clip_norm=0.0,
      param_groups=((".*", 1.0),),
    )
  )
  c.update(kw)
  return c


def test_every_parameter_must_match_exactly_once():
  with pytest.raises(ValueError, match="llm/layers/w: matches no pattern"):
    optimizer_lib.assign_groups(PARAMS, [("img/.*", 1.0), ("llm/final_norm/.*", 1.0)])
  with pytest.raises(ValueError, match=r"img/embedding/kernel: matches \['img/.\*', '.\*kernel'\]"):
    optimizer_lib.assign_groups(PARAMS, [("img/.*", 1.0), (".*kernel", 1.0), ("llm/.*", 1.0)])


def test_frozen_params_get_no_state_and_no_update():
  cfg = _cfg(param_groups=(("img/.*", None), ("llm/.*", 0.5)), warmup_steps=0)
  tx, members, _ = optimizer_lib.make_optimizer(cfg, PARAMS)
  assert sorted(members["frozen"]) == ["img/embedding/bias", "img/embedding/kernel"]
  state = tx.init(PARAMS)
  # Adam moments exist only for the llm leaves.
  leaves = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0]
  assert sum(x.size for x in leaves) == 2 * (3 + 9)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, state, PARAMS)
  assert float(jnp.abs(updates["img"]["embedding"]["kernel"]).sum()) == 0.0
  assert float(jnp.abs(updates["llm"]["layers"]["w"]).sum()) > 0.0


def test_lr_multiplier_scales_the_first_adam_step():
  # Adam's first update is lr * sign(g) (bias-corrected), so it exposes the LR.
  cfg = _cfg(param_groups=(("img/.*", 2.0), ("llm/.*", 1.0)), warmup_steps=0)
  tx, _, schedule = optimizer_lib.make_optimizer(cfg, PARAMS)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  lr0 = float(schedule(0))
  np.testing.assert_allclose(updates["llm"]["layers"]["w"], -lr0, rtol=1e-4)
  np.testing.assert_allclose(updates["img"]["embedding"]["kernel"], -2 * lr0, rtol=1e-4)


def test_schedule_warms_up_then_decays_to_end_fraction():
  s = optimizer_lib.make_schedule(_cfg(), 0.1)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(2)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 0.01, rtol=1e-6)
  assert float(s(5)) < 0.1


def test_weight_decay_skips_norms_and_vectors():
  cfg = _cfg(weight_decay=0.5, warmup_steps=0)
  # Learned tokens (the ViT's class token, the MAP probe) are 3-D but not weights.
  params = {**PARAMS, "tok": {"cls": jnp.ones((1, 1, 3)), "head": {"probe": jnp.ones((1, 1, 3))}}}
  tx, _, _ = optimizer_lib.make_optimizer(cfg, params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.abs(updates["llm"]["final_norm"]["scale"]).sum()) == 0.0
  assert float(jnp.abs(updates["img"]["embedding"]["bias"]).sum()) == 0.0
  assert float(jnp.abs(updates["tok"]["cls"]).sum()) == 0.0
  assert float(jnp.abs(updates["tok"]["head"]["probe"]).sum()) == 0.0
  assert float(jnp.abs(updates["llm"]["layers"]["w"]).sum()) > 0.0


def test_group_names_read_negative_lookarounds_as_not():
  from configs import base

  groups = [
    (base.VISION_TOWER, None),
    (base.NOT_VISION_TOWER, 1.0),
    (base.LORA_TRAINABLE, 1.0),
    ("connector/.*", 0.1),
    (".*", 1.0),
  ]
  # Frozen groups have no learning rate, so no name; the index keeps names unique.
  assert optimizer_lib.group_names(groups) == {
    "g1": "g1_not_img",
    "g2": "g2_lora_ab",
    "g3": "g3_connector",
    "g4": "g4",
  }
