"""LoRA dropout (peft's ``lora_dropout``): ``x W + scale * (drop(x) A) B`` in training only."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compact_jax import models
from compact_jax import sharding as sharding_lib
from compact_jax.models import llm, lora, vlm
from compact_jax.train import mesh as mesh_lib
from compact_jax.train import state as state_lib
from compact_jax.train import step as step_lib
from tests.models import tiny_models as tm
from tests.models.test_lora import BLOCK_TARGETS, PROJECTIONS, _batch, _module, _randomize_b
from tests.train.test_train import _batches, _config, built  # noqa: F401 (fixture)

LLM_TARGETS = (r"^llm/layers(_\d)?/attn/(q|kv|attn_vec)_einsum/w$", r"^llm/layers(_\d)?/mlp/")
RATE = 0.5


def _block(rate: float, seed: int = 0) -> llm.Block:
  blk = nnx.eval_shape(lambda: llm.Block(tm.LLM, dtype="float32", rngs=nnx.Rngs(0)))
  vlm.load_flat_params(blk, tm.random_flat_params(blk, seed))
  lora.apply_lora(blk, lora.LoraConfig(BLOCK_TARGETS, rank=3, alpha=6.0, dropout=rate), seed=seed)
  _randomize_b(blk, seed + 1)
  return blk


def _vlm(rate: float, *, scan_layers: bool = True) -> vlm.VLM:
  model, _ = tm.random_vlm(seed=21, scan_layers=scan_layers)
  lora.apply_lora(model, lora.LoraConfig(LLM_TARGETS, rank=2, alpha=4.0, dropout=rate))
  _randomize_b(model)
  return model


@nnx.jit
def _logits(model, args, key):
  return model(*args, dropout_rng=key)[0]


def _x(shape, seed=5):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((2, 3, *shape)), jnp.float32)


@pytest.fixture(scope="module")
def blocks():
  return _block(0.0), _block(RATE)


@pytest.mark.parametrize("eqn, path, name, index, shape", PROJECTIONS[:7])
def test_no_key_or_zero_rate_is_bitwise_the_base_lora_output(blocks, eqn, path, name, index, shape):
  plain, dropped = blocks
  key = jax.random.key(3)
  x = _x(shape)

  def run(blk, rng):
    return np.asarray(
      models.project(eqn, x, _module(blk, path), name, jnp.float32, index=index, rng=rng)
    )

  want = run(plain, None)
  # Rate 0 ignores a key; a rate without a key (eval, decode) applies no dropout.
  np.testing.assert_array_equal(run(plain, key), want)
  np.testing.assert_array_equal(run(dropped, None), want)
  assert np.abs(run(dropped, key) - want).max() > 1e-3  # and with a key it drops


def test_at_eval_a_dropout_model_is_bitwise_the_rate_zero_model():
  args = _batch()
  np.testing.assert_array_equal(
    np.asarray(_logits(_vlm(RATE), args, None)), np.asarray(_logits(_vlm(0.0), args, None))
  )


@pytest.mark.parametrize("eqn, path, name, index, shape", PROJECTIONS[:7])
def test_dropout_equals_the_hand_built_reference(blocks, eqn, path, name, index, shape):
  """``x W + scale * (drop(x) A) B``, the base path on undropped x, with the keep mask
  drawn from the same key over the tokens-flattened x the adapter sees."""
  _, blk = blocks
  mod = _module(blk, path)
  x = _x(shape)
  key = jax.random.key(11)
  got = models.project(eqn, x, mod, name, jnp.float32, index=index, rng=key)

  w = np.asarray(getattr(mod, name)[...])
  a = np.asarray(getattr(mod, f"{name}_lora_a")[...])
  b = np.asarray(getattr(mod, f"{name}_lora_b")[...])
  if index is not None:
    w, a, b = w[index], a[index], b[index]
  xn = np.asarray(x)
  keep = np.asarray(jax.random.bernoulli(key, 1 - RATE, (6, *shape))).reshape(xn.shape)
  assert 0.3 < keep.mean() < 0.7
  xd = np.where(keep, xn / (1 - RATE), 0.0)
  spec = models.lora_spec(mod, name)
  # W as a plain [I, O] matrix (input axes first) so the reference is a numpy matmul.
  out_axes = [i for i in range(w.ndim) if i not in spec.in_axes]
  w2 = np.transpose(w, (*spec.in_axes, *out_axes)).reshape(a.shape[0], -1)
  xf, xdf = xn.reshape(6, -1), xd.reshape(6, -1)
  want = xf @ w2 + spec.scale * (xdf @ a) @ b
  np.testing.assert_allclose(np.asarray(got).reshape(6, -1), want, rtol=1e-4, atol=1e-4)


def test_the_mean_over_keys_is_the_undropped_output(blocks):
  """Inverted scaling: E[drop(x)] = x, so the average of K dropped outputs tends to the
  undropped one. Per element, delta = scale * sum_i x_i m_i / (1 - p) (AB)_i has variance
  scale^2 p / (1 - p) sum_i (x_i (AB)_i)^2; the mean of K samples is within 5 of its
  standard deviations (a 6e-7 chance per element under a normal approximation)."""
  plain, dropped = blocks
  mod = _module(dropped, "attn.q_einsum")
  x = _x((48,), seed=8)[:1, :1]
  k = 4000
  keys = jax.random.split(jax.random.key(0), k)
  outs = jax.vmap(
    lambda r: models.project("BTD,NDH->BTNH", x, mod, "w", jnp.float32, rng=r).reshape(-1)
  )(keys)
  mean = np.asarray(outs).mean(0)
  want = np.asarray(
    models.project("BTD,NDH->BTNH", x, _module(plain, "attn.q_einsum"), "w", jnp.float32)
  ).reshape(-1)
  a, b = (np.asarray(getattr(mod, f"w_lora_{s}")[...]) for s in "ab")
  spec = models.lora_spec(mod, "w")
  ab = a @ b  # [D, N * H] in (N, H) order, matching the output's flattening
  contrib = np.asarray(x).reshape(48, 1) * ab * spec.scale
  sd = np.sqrt(RATE / (1 - RATE) * (contrib**2).sum(0) / k)
  assert np.all(np.abs(mean - want) <= 5 * sd + 1e-5), np.abs(mean - want).max()
  # Individual samples are far from the mean: the test has power.
  assert np.abs(np.asarray(outs)[0] - want).max() > 10 * sd.max()


def test_every_layer_and_site_draws_its_own_mask(monkeypatch):
  """Recorded keep masks of an unrolled two-layer LLM: 2 layers x 7 sites, all distinct;
  and the scanned LLM (keys passed as scan xs) gives the unrolled logits."""
  masks = []
  real = models.lora_dropout

  def record(rng, x, rate):
    out = real(rng, x, rate)
    masks.append(np.asarray(out != 0))
    return out

  monkeypatch.setattr(models, "lora_dropout", record)
  unrolled = _vlm(RATE, scan_layers=False)
  args = _batch()
  key = jax.random.key(7)
  got = np.asarray(unrolled(*args, dropout_rng=key)[0])  # eager, so masks are concrete
  assert len(masks) == 2 * 7
  for m1, m2 in itertools.combinations(masks, 2):
    if m1.shape == m2.shape:
      assert not np.array_equal(m1, m2)
  monkeypatch.setattr(models, "lora_dropout", real)

  scanned = _vlm(RATE, scan_layers=True)
  flat = vlm.flat_params(nnx.state(unrolled))
  vlm.load_flat_params(scanned, vlm.per_layer_to_scanned(flat))
  np.testing.assert_allclose(np.asarray(_logits(scanned, args, key)), got, rtol=1e-4, atol=1e-4)
  other = np.asarray(_logits(scanned, args, jax.random.key(8)))
  assert np.abs(other - got).max() > 1e-3


def test_a_merged_read_adapter_with_dropout_is_an_error():
  model, _ = tm.random_vlm(seed=21)
  target = r"^img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel$"
  lora.apply_lora(model, lora.LoraConfig((target,), rank=2, dropout=0.1))
  with pytest.raises(ValueError, match=r"kernel: this weight is read merged"):
    model(*_batch())
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    lora.LoraConfig((target,), dropout=1.0)


def _dropout_config(built, rate, accum_steps=1):  # noqa: F811
  config = _config(built, accum_steps=accum_steps)
  with config.unlocked():
    config.model.lora.targets = LLM_TARGETS
    config.model.lora.dropout = rate
  return config


def test_train_step_draws_step_and_microbatch_masks_deterministically(built):  # noqa: F811
  config = _dropout_config(built, 0.3, accum_steps=2)
  tok, batches = _batches(built, config, 3)
  mesh = mesh_lib.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)), jax.devices()[:1])
  setup, init_fn = state_lib.setup_state(config, vocab_size=tok.vocab_size, mesh=mesh)
  specs = [
    models.lora_spec(m, n)
    for _, m in nnx.iter_graph(nnx.merge(setup.graphdef, nnx.State(setup.abstract["params"])))
    if isinstance(m, nnx.Module)
    for n in ("w", "gating_einsum", "linear")
    if models.lora_spec(m, n) is not None
  ]
  assert specs and all(s.dropout == 0.3 for s in specs)  # the config reached the model
  with jax.set_mesh(mesh), sharding_lib.axis_rules(config.sharding_rules):
    state = init_fn()
    # B starts at zero, where dropping the adapter's input changes nothing: make it matter.
    rng = np.random.default_rng(0)
    state["params"] = jax.tree_util.tree_map_with_path(
      lambda p, v: (
        v + jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype)
        if str(getattr(p[-1], "key", "")).endswith("_lora_b")
        else v
      ),
      state["params"],
    )
    batch = step_lib.to_global_batch(batches[0], mesh)
    fn = jax.jit(step_lib.make_loss_and_grads(setup, config))
    nll = [float(fn(state["params"], batch, s)[1]["nll"]) for s in (0, 0, 1)]
    assert nll[0] == nll[1]  # same (seed, step, microbatch): same masks, for resume
    assert nll[0] != nll[2]  # a new step, new masks
    assert "random_bits" in str(jax.make_jaxpr(fn)(state["params"], batch, 0))
    plain = jax.jit(step_lib.make_loss_and_grads(setup, _dropout_config(built, 0.0, 2)))
    assert "random_bits" not in str(jax.make_jaxpr(plain)(state["params"], batch, 0))
    assert float(plain(state["params"], batch, 0)[1]["nll"]) != nll[0]

    step = step_lib.TrainStep(setup, config, mesh)
    losses = []
    for b in batches:
      state, m = step(state, step_lib.to_global_batch(b, mesh))
      losses.append(float(m["loss"]))
  assert np.all(np.isfinite(losses))
  assert step.num_retraces == 0
  np.testing.assert_array_equal(
    jax.random.key_data(step_lib.dropout_key(0, 5, 1)),
    jax.random.key_data(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 5), 1)),
  )
