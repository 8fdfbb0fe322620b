"""LoRA: zero-init equals base, merge equals unmerged, einsum-shaped weights,
only adapters get gradients, adapter-only save/load, regex errors; activation-side
adapters equal the merged weight (outputs and gradients), per-slice adapters on
fused weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compact_jax import models
from compact_jax.models import llm, lora, siglip, vlm
from compact_jax.train import flops as flops_lib
from tests.models import tiny_models as tm

TARGETS = (
  r"^llm/layers/attn/(q|kv|attn_vec)_einsum/w$",  # einsum (N, D, H) / (2, K, D, H) / (N, H, D)
  r"^llm/layers/mlp/(gating_einsum|linear)$",
  r"^connector/Dense_\d/kernel$",  # 2-D
  r"^img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel$",
)


def _batch():
  rng = np.random.default_rng(21)
  tokens = rng.integers(0, tm.VOCAB, (2, 5)).astype(np.int32)
  mask_ar = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], np.int32)
  return tm.random_images(2, 21), tokens, mask_ar, np.ones((2, 5), bool), np.array([True, False])


def _randomize_b(model, seed=1):
  """Non-zero B factors, so adapters change the function."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.LoRAParam)
  for path, var in nnx.to_flat_state(state):
    if str(path[-1]).endswith("_lora_b"):
      var.set_value(jnp.asarray(0.3 * rng.standard_normal(var.shape), jnp.float32))
  nnx.update(model, state)


@pytest.fixture(scope="module")
def base():
  model, flat = tm.random_vlm(seed=21)
  return flat, np.asarray(tm.apply(model, *_batch())[0])


CONFIG = lora.LoraConfig(TARGETS, rank=2, alpha=4.0)


def _adapted(flat):
  model = tm.abstract_vlm()
  vlm.load_flat_params(model, flat)
  paths = lora.apply_lora(model, CONFIG)
  return model, paths


def test_zero_initialised_b_leaves_the_model_unchanged(base):
  flat, want = base
  model, paths = _adapted(flat)
  assert len(paths) == 8
  np.testing.assert_allclose(np.asarray(tm.apply(model, *_batch())[0]), want, atol=1e-5)


def test_merged_equals_unmerged_and_differs_from_base(base):
  flat, plain = base
  model, _ = _adapted(flat)
  _randomize_b(model)
  unmerged = np.asarray(tm.apply(model, *_batch())[0])
  assert np.abs(unmerged - plain).max() > 1e-2
  merged = lora.merge_lora(model)
  assert len(merged) == 8 and not lora.adapter_params(model)
  assert vlm.param_paths(nnx.state(model)).keys() == flat.keys()  # back to the base tree
  np.testing.assert_allclose(np.asarray(tm.apply(model, *_batch())[0]), unmerged, atol=1e-4)


def test_einsum_weight_delta_is_the_low_rank_product_in_the_right_layout():
  """q_einsum (N, D, H): the adapter acts on D (input) and produces (N, H)."""
  v = tm.LLM
  shape, in_axes = (
    (v.num_heads, v.width, v.head_dim),
    lora.input_axes(("heads", "embed", "head_dim")),
  )
  assert in_axes == (1,)
  rng = np.random.default_rng(3)
  a = rng.standard_normal((v.width, 2)).astype(np.float32)
  b = rng.standard_normal((2, v.num_heads * v.head_dim)).astype(np.float32)
  from compact_jax.models import lora_delta

  d = np.asarray(lora_delta(jnp.asarray(a), jnp.asarray(b), shape, in_axes, 0.5))
  x = rng.standard_normal(v.width).astype(np.float32)
  # x . delta[n, :, h] == 0.5 * (x @ A @ B)[n * H + h]
  want = (0.5 * (x @ a @ b)).reshape(v.num_heads, v.head_dim)
  np.testing.assert_allclose(np.einsum("d,ndh->nh", x, d), want, rtol=1e-4, atol=1e-4)
  assert lora.input_axes(("heads", "head_dim", "embed")) == (0, 1)
  assert lora.input_axes(("mlp", "embed")) == (0,)


def test_only_adapters_are_differentiated(base):
  flat, _ = base
  model, _ = _adapted(flat)
  _randomize_b(model)

  def loss(m):
    return jnp.mean(m(*[jnp.asarray(x) for x in _batch()])[0] ** 2)

  grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  keys = {"/".join(str(p) for p in path) for path, _ in nnx.to_flat_state(grads)}
  assert keys == set(lora.adapter_params(model))
  assert all(str(k).endswith(("_lora_a", "_lora_b")) for k in keys)


def test_adapter_only_checkpoint_round_trip(base, tmp_path):
  flat, _ = base
  model, _ = _adapted(flat)
  _randomize_b(model, seed=7)
  want = np.asarray(tm.apply(model, *_batch())[0])
  lora.save_adapters(model, str(tmp_path / "adapters.npz"))
  saved = np.load(tmp_path / "adapters.npz")
  assert all(k.split("/")[-1].endswith(("_lora_a", "_lora_b")) for k in saved.files)
  other, _ = _adapted(flat)  # same base, fresh adapters
  lora.load_adapters(other, str(tmp_path / "adapters.npz"))
  np.testing.assert_allclose(np.asarray(tm.apply(other, *_batch())[0]), want, atol=1e-6)


def test_patterns_that_match_nothing_are_errors():
  model = nnx.eval_shape(lambda: siglip.ViT(tm.VIT, image_size=16, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"match no weight: \['q_proj'\]"):
    lora.apply_lora(model, lora.LoraConfig(("q_proj", "query/kernel")))
  paths = list(vlm.param_paths(nnx.state(model)))
  mask = lora.freeze_mask(paths, [r"^Transformer/encoder_norm/"])
  assert sum(mask.values()) == 2 and not mask["embedding/kernel"]
  with pytest.raises(ValueError, match=r"match no parameter: \['\^llm/'\]"):
    lora.freeze_mask(paths, ["^llm/"])


def test_partial_lora_leaves_text_only_outputs_unchanged(base):
  flat, _ = base
  config = lora.LoraConfig(TARGETS[:2], rank=2, alpha=4.0, partial=True)
  model = tm.abstract_vlm()
  vlm.load_flat_params(model, flat)
  lora.apply_lora(model, config)
  _randomize_b(model, seed=9)
  plain = tm.abstract_vlm()
  vlm.load_flat_params(plain, flat)
  image, tokens, mask_ar, mask_input, _ = _batch()
  for has_image in (np.array([False, False]), np.array([True, True])):
    args = (image, tokens, mask_ar, mask_input, has_image)
    got = np.asarray(tm.apply(model, *args)[0])
    want = np.asarray(tm.apply(plain, *args)[0])
    if has_image.any():
      # Image tokens' keys/values carry the adapter, and text attends to them.
      assert np.abs(got - want).max() > 1e-2
    else:
      np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(ValueError, match="Partial LoRA needs a VLM"):
    lora.apply_lora(
      nnx.eval_shape(lambda: siglip.ViT(tm.VIT, image_size=16, rngs=nnx.Rngs(0))), config
    )


# --- activation-side adapters (models.project) and per-slice adapters on fused weights ----

BLOCK_TARGETS = (r"attn/(q|kv|attn_vec)_einsum/w$", r"mlp/(gating_einsum|linear)$")
# Every einsum llm.py reads an adapted weight with: (eqn, module path, name, index, x's
# trailing shape). Sizes of tm.LLM: D 48, N 4, K 2, H 16, F 96.
PROJECTIONS = [
  ("BTD,NDH->BTNH", "attn.q_einsum", "w", None, (48,)),
  ("BSD,KDH->BSKH", "attn.kv_einsum", "w", 0, (48,)),
  ("BSD,KDH->BSKH", "attn.kv_einsum", "w", 1, (48,)),
  ("BTNH,NHD->BTD", "attn.attn_vec_einsum", "w", None, (4, 16)),
  ("BTD,DF->BTF", "mlp", "gating_einsum", 0, (48,)),
  ("BTD,DF->BTF", "mlp", "gating_einsum", 1, (48,)),
  ("BTF,FD->BTD", "mlp", "linear", None, (96,)),
  # Not in llm.py: a fused weight read whole; both slices' adapters at once.
  ("BTD,SDF->BTSF", "mlp", "gating_einsum", None, (48,)),
]
MASK = np.array([[True, False, True], [False, False, True]])


def _block(seed: int = 0, *, rank: int = 3):
  """One unscanned decoder block with random weights and adapters (B non-zero)."""
  blk = nnx.eval_shape(lambda: llm.Block(tm.LLM, dtype="float32", rngs=nnx.Rngs(0)))
  vlm.load_flat_params(blk, tm.random_flat_params(blk, seed))
  lora.apply_lora(blk, lora.LoraConfig(BLOCK_TARGETS, rank=rank, alpha=2.0 * rank), seed=seed)
  _randomize_b(blk, seed + 1)
  return blk


def _module(blk, dotted: str):
  for part in dotted.split("."):
    blk = getattr(blk, part)
  return blk


@pytest.fixture(scope="module")
def blocks():
  """(adapted block, the same block merged by merge_lora, the base weights)."""
  merged = _block()
  base = {k: np.asarray(v) for k, v in vlm.flat_params(nnx.state(merged)).items()}
  assert len(lora.merge_lora(merged)) == 5
  return _block(), merged, base


@pytest.mark.parametrize("masked", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("eqn, path, name, index, x_shape", PROJECTIONS)
def test_activation_side_lora_equals_the_merged_weight(
  blocks, eqn, path, name, index, x_shape, masked
):
  adapted, merged, base = blocks
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 3, *x_shape)), jnp.float32)
  mask = jnp.asarray(MASK) if masked else None
  got = models.project(eqn, x, _module(adapted, path), name, jnp.float32, mask, index=index)

  def pick(w):
    return w if index is None else w[index]

  want = np.asarray(jnp.einsum(eqn, x, pick(getattr(_module(merged, path), name)[...])))
  plain = np.asarray(jnp.einsum(eqn, x, pick(base[path.replace(".", "/") + "/" + name])))
  assert np.abs(want - plain).max() > 1e-2  # the adapter matters
  if masked:
    m = MASK.reshape(MASK.shape + (1,) * (want.ndim - 2))
    want = np.where(m, want, plain)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # models.weight (the merged read siglip.py uses) agrees as well.
  np.testing.assert_allclose(
    np.asarray(models.weight(_module(adapted, path), name)),
    np.asarray(getattr(_module(merged, path), name)[...]),
    rtol=1e-6,
    atol=1e-6,
  )


def test_fused_weights_get_one_adapter_per_slice():
  """kv_einsum [2, K, D, H] and gating_einsum [2, D, F]: A [S, I, r], B [S, r, O] with a
  "layers" axis in front when scanned, as peft's k_proj/v_proj and gate_proj/up_proj."""
  v, r = tm.LLM, 2
  model = tm.abstract_vlm()
  lora.apply_lora(model, lora.LoraConfig(TARGETS[:2], rank=r))
  shapes = vlm.param_paths(nnx.state(model, nnx.LoRAParam))
  axes = vlm.param_logical_axes(nnx.state(model, nnx.LoRAParam))
  pre = "llm/layers/"
  kv_out = v.num_kv_heads * v.head_dim
  assert shapes[pre + "attn/kv_einsum/w_lora_a"] == (v.depth, 2, v.width, r)
  assert shapes[pre + "attn/kv_einsum/w_lora_b"] == (v.depth, 2, r, kv_out)
  assert shapes[pre + "mlp/gating_einsum_lora_a"] == (v.depth, 2, v.width, r)
  assert shapes[pre + "mlp/gating_einsum_lora_b"] == (v.depth, 2, r, v.mlp_dim)
  # A's rows are named like W's (outermost) input dim and B's columns like its output
  # dims' outermost, so the rules shard adapters as they shard W.
  assert axes[pre + "attn/kv_einsum/w_lora_a"] == ("layers", None, "embed", "lora_rank")
  assert axes[pre + "attn/kv_einsum/w_lora_b"] == ("layers", None, "lora_rank", "kv_heads")
  assert axes[pre + "mlp/gating_einsum_lora_b"] == ("layers", None, "lora_rank", "mlp")
  # Unfused weights keep one adapter.
  assert shapes[pre + "attn/q_einsum/w_lora_a"] == (v.depth, v.width, r)
  assert axes[pre + "attn/q_einsum/w_lora_a"] == ("layers", "embed", "lora_rank")
  assert axes[pre + "attn/q_einsum/w_lora_b"] == ("layers", "lora_rank", "heads")
  # peft's count per layer: r * (I + O) for each of q, k, v, o, gate, up, down.
  d, n, h, f = v.width, v.num_heads, v.head_dim, v.mlp_dim
  per_layer = r * ((d + n * h) + 2 * (d + kv_out) + (n * h + d) + 2 * (d + f) + (f + d))
  assert sum(int(np.prod(s)) for s in shapes.values()) == v.depth * per_layer


def test_a_slice_adapter_changes_only_its_slice():
  blk = _block(seed=3)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 3, 48)), jnp.float32)
  kv, mlp = blk.attn.kv_einsum, blk.mlp

  def outputs():
    return [
      np.asarray(models.project(e, x, m, n, jnp.float32, index=i))
      for e, m, n in (("BSD,KDH->BSKH", kv, "w"), ("BTD,DF->BTF", mlp, "gating_einsum"))
      for i in (0, 1)
    ]

  k, v, gate, up = outputs()
  for var in (kv.w_lora_b, mlp.gating_einsum_lora_b):
    var.set_value(var[...].at[1].add(1.0))
  k2, v2, gate2, up2 = outputs()
  np.testing.assert_array_equal(k2, k)
  np.testing.assert_array_equal(gate2, gate)
  assert np.abs(v2 - v).max() > 1e-2 and np.abs(up2 - up).max() > 1e-2
  # The k slice by hand: x W_k + alpha/r * (x A_0) B_0, B_0 [r, K * H] laid out as (K, H).
  a0, b0 = np.asarray(kv.w_lora_a[...][0]), np.asarray(kv.w_lora_b[...][0])
  xn = np.asarray(x)
  want = np.einsum("bsd,kdh->bskh", xn, np.asarray(kv.w[...][0]))
  want += 2.0 * (xn @ a0 @ b0).reshape(2, 3, 2, 16)
  np.testing.assert_allclose(k, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("eqn, path, name, index, x_shape", PROJECTIONS[:4])
def test_adapter_gradients_equal_the_weight_level_formulation(
  eqn, path, name, index, x_shape, masked
):
  """d loss / d(A, B) through the activation-side adapter equals it through the merged
  weight W + alpha/r * reshape(A @ B) (the formulation models.lora replaced)."""
  blk = _block(seed=4)
  module = _module(blk, path)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 3, *x_shape)), jnp.float32)
  mask = jnp.asarray(MASK) if masked else None
  spec = models.lora_spec(module, name)
  w = getattr(module, name)[...]
  a, b = getattr(module, f"{name}_lora_a")[...], getattr(module, f"{name}_lora_b")[...]
  y_shape = jax.eval_shape(lambda: models.project(eqn, x, module, name, jnp.float32, mask, index))
  target = jnp.asarray(rng.standard_normal(y_shape.shape), jnp.float32)

  def loss_of(y):
    return jnp.sum(jnp.sin(y) * target)

  def activation_side(m):
    return loss_of(models.project(eqn, x, m, name, jnp.float32, mask, index=index))

  def weight_level(a, b):
    merged = w + models.lora_delta(a, b, w.shape, spec.in_axes, spec.scale)
    pick = (lambda t: t) if index is None else (lambda t: t[index])
    y = jnp.einsum(eqn, x, pick(merged))
    if mask is not None:
      plain = jnp.einsum(eqn, x, pick(w))
      y = jnp.where(mask.reshape(mask.shape + (1,) * (y.ndim - 2)), y, plain)
    return loss_of(y)

  grads = nnx.grad(activation_side, argnums=nnx.DiffState(0, nnx.LoRAParam))(module)
  ga, gb = jax.grad(weight_level, argnums=(0, 1))(a, b)
  assert float(jnp.abs(gb).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(grads[f"{name}_lora_a"][...]), ga, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grads[f"{name}_lora_b"][...]), gb, rtol=1e-4, atol=1e-5)
  if index is not None:  # the other slice's adapter gets no gradient
    other = 1 - index
    assert not np.asarray(grads[f"{name}_lora_b"][...][other]).any()


@pytest.mark.parametrize("eqn, path, name, index, x_shape", PROJECTIONS)
def test_every_gradient_through_an_adapted_projection_matches_autodiff(
  eqn, path, name, index, x_shape
):
  """``project`` multiplies by the merged weight and hand-writes its backward
  (``models._merged_lora_matmul``): d loss / d(x, W, A, B) must equal autodiff of
  ``x.W + scale * (x.A).B``, including x's (what the layers below train on) and a
  trainable W's."""
  blk = _block(seed=11)
  module = _module(blk, path)
  spec = models.lora_spec(module, name)
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.standard_normal((2, 3, *x_shape)), jnp.float32)
  w = getattr(module, name)[...]
  a, b = getattr(module, f"{name}_lora_a")[...], getattr(module, f"{name}_lora_b")[...]
  y_shape = jax.eval_shape(lambda: models.project(eqn, x, module, name, jnp.float32, index=index))
  target = jnp.asarray(rng.standard_normal(y_shape.shape), jnp.float32)

  graphdef, state = nnx.split(module)

  def via_project(x, state):
    y = models.project(eqn, x, nnx.merge(graphdef, state), name, jnp.float32, index=index)
    return jnp.sum(jnp.sin(y) * target)

  def reference(x, w, a, b):
    merged = w + models.lora_delta(a, b, w.shape, spec.in_axes, spec.scale)
    y = jnp.einsum(eqn, x, merged if index is None else merged[index])
    return jnp.sum(jnp.sin(y) * target)

  gx, gs = jax.grad(via_project, argnums=(0, 1))(x, state)
  got = [gx] + [gs[v][...] for v in (name, f"{name}_lora_a", f"{name}_lora_b")]
  want = jax.grad(reference, argnums=(0, 1, 2, 3))(x, w, a, b)
  for which, g, r in zip("xWAB", got, want):
    assert float(jnp.abs(r).max()) > 1e-3, which
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5, err_msg=which)


def test_the_merged_weight_is_not_kept_for_the_backward(capsys):
  """Saving ``W + scale * A @ B`` as a residual would hold a second copy of every adapted
  weight from the forward to the backward; only W itself (a param, alive anyway) may be
  kept at [I, O]."""
  from jax.ad_checkpoint import print_saved_residuals

  i, o, r = 32, 48, 4
  rng = np.random.default_rng(13)
  x, w, a, b = (
    jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((6, i), (i, o), (i, r), (r, o))
  )

  def loss(x, w, a, b):
    return jnp.sum(jnp.sin(models._merged_lora_matmul(x, w, a, b, jnp.float32(2.0))))

  print_saved_residuals(loss, x, w, a, b)
  lines = capsys.readouterr().out.splitlines()
  big = [line for line in lines if f"[{i},{o}]" in line]
  assert big == [f"f32[{i},{o}] from the argument w"], lines


def test_adapter_einsums_are_derived_from_the_projection():
  assert models.lora_einsums("BTD,NDH->BTNH", (1,)) == ("BTD,Dr->BTr", "BTr,rNH->BTNH")
  assert models.lora_einsums("BTNH,NHD->BTD", (0, 1)) == ("BTNH,NHr->BTr", "BTr,rD->BTD")
  assert models.lora_einsums("BTD,SDF->BTSF", (0,), sliced=True) == (
    "BTD,SDr->BTSr",
    "BTSr,SrF->BTSF",
  )
  # A weight annotated with "embed" on the wrong axis for this einsum.
  with pytest.raises(ValueError, match=r"'BTD,NDH->BTNH'.*contracts 'N'.*contracts 'D'"):
    models.lora_einsums("BTD,NDH->BTNH", (0,))


def test_indexing_a_weight_whose_adapter_spans_all_slices_is_an_error():
  blk = _block(seed=2)
  x = jnp.zeros((1, 2, 48), jnp.float32)
  # Head 0 of q_einsum [N, D, H] is a valid base einsum, but q's adapter is not per head.
  with pytest.raises(ValueError, match=r"index=0.*'w'.*spans every slice"):
    models.project("BTD,DH->BTH", x, blk.attn.q_einsum, "w", jnp.float32, index=0)


def test_adapters_saved_before_per_slice_adapters_do_not_load(base, tmp_path):
  """An adapter file with one kv adapter [L, D, r] (the old layout) is refused by name."""
  flat, _ = base
  model, _ = _adapted(flat)
  saved = lora.adapter_params(model)
  key = "llm/layers/attn/kv_einsum/w_lora_a"
  saved[key] = saved[key][:, 0]
  np.savez(tmp_path / "old.npz", **saved)
  with pytest.raises(ValueError, match=rf"adapter {key} has shape"):
    lora.load_adapters(model, str(tmp_path / "old.npz"))


def test_adapter_gradient_costs_rank_r_matmuls_not_a_weight_gradient():
  """XLA's FLOP count of d loss / d(A, B) through ``project``: x.A, then dB, d(x.A), dA,
  4 * rows * r * (I + O) in all, far below the 2 * rows * I * O of the full weight
  gradient that the merged-weight formulation computed first."""
  blk = _block(seed=8, rank=2)
  graphdef, state = nnx.split(blk.mlp)
  rows, i, o, r = 2 * 64, tm.LLM.mlp_dim, tm.LLM.width, 2
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.standard_normal((2, 64, i)), jnp.float32)
  target = jnp.asarray(rng.standard_normal((2, 64, o)), jnp.float32)

  def grads(state, x, target):
    def loss(m):
      return jnp.sum(models.project("BTF,FD->BTD", x, m, "linear", jnp.float32) * target)

    return nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(nnx.merge(graphdef, state))

  def weight_level_grads(a, b, x, target):
    def loss(a, b):
      merged = blk.mlp.linear[...] + models.lora_delta(a, b, (i, o), (0,), 2.0)
      return jnp.sum(jnp.einsum("BTF,FD->BTD", x, merged) * target)

    return jax.grad(loss, argnums=(0, 1))(a, b)

  def count(fn, *args):
    return flops_lib.xla_flops(jax.jit(fn).lower(*args).compile())

  flops = count(grads, state, x, target)
  assert flops == pytest.approx(4 * rows * r * (i + o), rel=0.05)
  ab = (blk.mlp.linear_lora_a[...], blk.mlp.linear_lora_b[...])
  assert count(weight_level_grads, *ab, x, target) > 2 * rows * i * o > 6 * flops
