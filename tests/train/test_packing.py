"""Sequence packing: a packed row computes exactly what its examples compute one per row.

The reference is always the unpacked path (``VLM.__call__`` on ``pipeline.collate``
batches), which the model and trainer tests check on their own.
"""

import io

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import configs.tiny_world as tiny_world
from compact_jax import sharding as sharding_lib
from compact_jax.data import pipeline as pipeline_lib
from compact_jax.data import template as template_lib
from compact_jax.train import mesh as mesh_lib
from compact_jax.train import state as state_lib
from compact_jax.train import step as step_lib
from tests import helpers
from tests.models import tiny_models as tm

# --- the model: logits and isolation (tiny towers, 4 image tokens) -------------------


def _example(rng, num_text: int, has_image: bool) -> dict[str, np.ndarray]:
  """A prompt (mask_ar 0) then an answer (mask_ar 1, trained on), like the templates'."""
  prompt = num_text // 2
  ar = np.array([0] * prompt + [1] * (num_text - prompt), np.int32)
  size = tm.IMAGE_SIZE
  image = rng.uniform(-1, 1, (size, size, 3)) if has_image else np.zeros((size, size, 3))
  return {
    "image": image.astype(np.float32),
    "has_image": np.asarray(has_image),
    "tokens": rng.integers(1, tm.VOCAB, num_text).astype(np.int32),
    "mask_ar": ar,
    "mask_loss": ar.copy(),
  }


def _tiny_examples(seed=0):
  rng = np.random.default_rng(seed)
  return [_example(rng, n, img) for n, img in ((5, True), (9, False), (3, True), (7, True))]


# Rows [[0, 1], [2, 3]]; N = 4 image tokens: (row, first text position) per example.
TINY_SPEC = pipeline_lib.PackSpec(length=20, max_images=2, window=4, num_image_tokens=4)
TINY_TEXT_AT = {0: (0, 4), 1: (0, 9), 2: (1, 4), 3: (1, 11)}


@nnx.jit
def _packed_logits(model, b):
  keys = ("image", "tokens", "mask_ar", "mask_input", "segment_ids", "positions", "image_index")
  return model.forward_packed(*(b[k] for k in keys))[0]


@pytest.mark.parametrize("causal_image", [False, True])
def test_packed_logits_equal_one_example_per_row(causal_image):
  model, _ = tm.random_vlm(seed=1, causal_image=causal_image)
  examples = _tiny_examples()
  unpacked = pipeline_lib.collate(examples, 9)
  expected, _ = tm.apply(
    model, *(unpacked[k] for k in ("image", "tokens", "mask_ar", "mask_input", "has_image"))
  )
  packed = pipeline_lib.pack_rows([examples[:2], examples[2:]], TINY_SPEC)
  got = np.asarray(_packed_logits(model, packed))
  assert got.shape == (2, 20, tm.VOCAB)
  for i, (row, at) in TINY_TEXT_AT.items():
    n = len(examples[i]["tokens"])
    np.testing.assert_allclose(got[row, at : at + n], expected[i, :n], rtol=1e-5, atol=1e-5)


def test_no_attention_across_segments():
  """Changing example 2's text and image changes its logits and nothing of example 1's."""
  model, _ = tm.random_vlm(seed=2)
  examples = _tiny_examples()
  base = np.asarray(_packed_logits(model, pipeline_lib.pack_rows([examples[2:]], TINY_SPEC)))
  rng = np.random.default_rng(7)
  other = dict(examples[3], tokens=rng.integers(1, tm.VOCAB, 7).astype(np.int32))
  other["image"] = rng.uniform(-1, 1, other["image"].shape).astype(np.float32)
  moved = np.asarray(
    _packed_logits(model, pipeline_lib.pack_rows([[examples[2], other]], TINY_SPEC))
  )
  first = slice(0, 7)  # example 2: its 4 image tokens and 3 text tokens
  np.testing.assert_allclose(moved[0, first], base[0, first], rtol=0, atol=1e-6)
  assert np.abs(moved[0, 11:18] - base[0, 11:18]).max() > 1e-2  # the perturbation is real


def test_packed_rows_restart_positions_and_mask_boundaries():
  examples = _tiny_examples()
  # First text tokens marked as targets (which an unpacked row never scores).
  examples[1]["mask_loss"][:] = 1
  examples[3]["mask_loss"][:] = 1
  b = pipeline_lib.pack_rows([examples[:2], examples[2:]], TINY_SPEC)
  # Hand-laid: [img0 x4, text0 x5, text1 x9, pad x2],
  # [img2 x4, text2 x3, img3 x4, text3 x7, pad x2].
  np.testing.assert_array_equal(b["segment_ids"][0], [1] * 9 + [2] * 9 + [0] * 2)
  np.testing.assert_array_equal(b["positions"][0, :18], [*range(9), *range(9)])
  np.testing.assert_array_equal(b["segment_ids"][1], [1] * 7 + [2] * 11 + [0] * 2)
  np.testing.assert_array_equal(b["positions"][1, :18], [*range(7), *range(11)])
  np.testing.assert_array_equal(b["image_index"][1, :11], [0, 1, 2, 3, -1, -1, -1, 4, 5, 6, 7])
  np.testing.assert_array_equal(b["has_image"], [[True, False], [True, True]])
  np.testing.assert_array_equal(b["image"][1, 1], examples[3]["image"])
  assert not b["image"][0, 1].any()
  # An example's first text token is no target: before it is an image or another example.
  assert b["mask_loss"][0, 9] == 0 and b["mask_loss"][0, 10:18].all()
  assert b["mask_loss"][1, 11] == 0 and b["mask_loss"][1, 12:18].all()
  assert not b["mask_loss"][1, 7:11].any()  # image tokens
  np.testing.assert_array_equal(b["mask_input"][1], [True] * 18 + [False] * 2)
  with pytest.raises(ValueError, match=r"row 0 overflows at example 2"):
    pipeline_lib.pack_rows([examples[:2]], pipeline_lib.PackSpec(17, 2, 4, 4))


# --- the trainer: loss, gradients and compiles (the tiny world's smoke model) --------

IMAGE_SIZE = 64


def _config(pack_length: int = 0, batch_size: int = 4):
  c = tiny_world.get_config("smoke")
  with c.unlocked():
    c.data.seq_buckets = (48, 64)
    c.data.pack_length = pack_length
    c.data.pack_max_images = 3
    c.train.batch_size = batch_size
    c.train.param_groups = ((".*", 1.0),)  # the ViT too: image tokens get gradients
    c.train.fail_on_recompile = True
  return c


def _png(colour) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
  return buf.getvalue()


def _records(n: int):
  """Toy records; every fifth one is text-only. Odd ones drop their second QA turn, so
  lengths vary (about 16 to 35 tokens)."""
  recs = []
  for i, conv in enumerate(helpers.toy_conversations(n)):
    recs.append(
      {
        "id": f"r{i}",
        "image": _png((i * 10, 255 - i * 5, 40)) if i % 5 else b"",
        "has_image": bool(i % 5),
        "conversations": conv if i % 2 == 0 else conv[:2],
      }
    )
  return recs


def _one_device_mesh():
  return mesh_lib.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)), jax.devices()[:1])


def test_packed_loss_and_gradients_equal_unpacked():
  tok = helpers.toy_tokenizer("gemma")
  template = template_lib.TEMPLATES["gemma"]
  recs = _records(7)
  rng = np.random.default_rng(3)
  examples = []
  for r in recs:
    enc = pipeline_lib.encode_record(r, tok, template)
    image = rng.uniform(-1, 1, (IMAGE_SIZE, IMAGE_SIZE, 3)) if r["has_image"] else None
    examples.append(
      {
        "image": np.zeros((IMAGE_SIZE,) * 2 + (3,)) if image is None else image,
        "has_image": np.asarray(r["has_image"]),
        "tokens": enc.tokens,
        "mask_ar": enc.mask_ar,
        "mask_loss": enc.mask_loss,
      }
    )
  # First tokens marked as targets (a template could): unpacked rows never score them.
  examples[0]["mask_loss"][0] = examples[1]["mask_loss"][0] = 1
  unpacked = pipeline_lib.collate(examples, 64)
  unpacked["image"] = unpacked["image"].astype(np.float32)

  packed_config = _config(pack_length=128)
  mesh = _one_device_mesh()
  setup, init_fn = state_lib.setup_state(packed_config, vocab_size=tok.vocab_size, mesh=mesh)
  spec = pipeline_lib.PackSpec(128, 3, 8, setup.num_image_tokens)
  sizes = [spec.size(len(e["tokens"]), bool(e["has_image"])) for e in examples]
  rows = pipeline_lib.first_fit_decreasing(
    sizes, [int(e["has_image"]) for e in examples], capacity=128, max_images=3
  )
  assert len(rows) < len(examples)  # really packed: some row holds several
  packed = pipeline_lib.pack_rows([[examples[i] for i in row] for row in rows], spec)
  packed["image"] = packed["image"].astype(np.float32)

  out = {}
  with jax.set_mesh(mesh), sharding_lib.axis_rules(packed_config.sharding_rules):
    params = init_fn()["params"]
    for name, config, batch in (
      ("unpacked", _config(), unpacked),
      ("packed", packed_config, packed),
    ):
      fn = jax.jit(step_lib.make_loss_and_grads(setup, config))
      out[name] = jax.device_get(fn(params, step_lib.to_global_batch(batch, mesh)))
  (g_u, s_u), (g_p, s_p) = out["unpacked"], out["packed"]
  assert s_u["n_tokens"] == s_p["n_tokens"] == unpacked["mask_loss"][:, 1:].sum() > 0
  assert s_p["n_tokens"] < unpacked["mask_loss"].sum()
  assert s_u["n_correct"] == s_p["n_correct"]
  np.testing.assert_allclose(s_p["nll"], s_u["nll"], rtol=1e-5)
  np.testing.assert_allclose(s_p["nll"] / s_p["n_tokens"], s_u["nll"] / s_u["n_tokens"], rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_u))
  vit_scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_u["img"]))
  assert vit_scale > 0  # the image tokens' gradients reach the ViT
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale), g_u, g_p
  )


def test_packed_step_compiles_once_over_mixed_lengths():
  tok = helpers.toy_tokenizer("gemma")
  template = template_lib.TEMPLATES["gemma"]
  recs = _records(24)
  config = _config(pack_length=128, batch_size=4)
  _, idx = pipeline_lib.analyze(recs, tok, template, config.data.seq_buckets)
  mesh = mesh_lib.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)), jax.devices()[:2])
  setup, init_fn = state_lib.setup_state(config, vocab_size=tok.vocab_size, mesh=mesh)
  spec = pipeline_lib.PackSpec(128, 3, 256, setup.num_image_tokens)
  ds = pipeline_lib.make_train_dataset(
    recs,
    idx,
    tok,
    template,
    image_size=IMAGE_SIZE,
    batch_size=4,
    seq_buckets=config.data.seq_buckets,
    seed=0,
    pack=spec,
  )
  batches = [ds[i] for i in range(4)]
  # Mixed data: the rows hold different numbers of examples and of tokens.
  per_row = {(int(r.max()), int((r > 0).sum())) for b in batches for r in b["segment_ids"]}
  assert len(per_row) > 2
  with jax.set_mesh(mesh):
    state = init_fn()
    step = step_lib.TrainStep(setup, config, mesh)
    losses = []
    for b in batches:
      state, metrics = step(state, step_lib.to_global_batch(b, mesh))
      losses.append(float(metrics["loss"]))
  assert step.num_traces == 1 and step.num_retraces == 0
  assert all(np.isfinite(losses))
