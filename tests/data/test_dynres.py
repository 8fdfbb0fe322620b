"""Dynamic resolution end to end in miniature: known images through the pipeline's tiling,
a predictable "ViT", the model's token layout; batches; the VLM on mixed layouts."""

from __future__ import annotations

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from compact_jax.data import image as image_lib
from compact_jax.data import pipeline as pipeline_lib
from compact_jax.data import template as template_lib
from compact_jax.eval import run as eval_run
from compact_jax.models import anyres, vlm
from configs import tiny_dynres
from tests import helpers
from tests.models import tiny_models

S, P = 8, 4  # tile side and "patch" side: each view is a 2 x 2 feature grid
G = S // P
ANYRES = anyres.Tiling("anyres", S, pinpoints=((1, 2), (2, 1), (2, 2)))
INTERNVL = anyres.Tiling("internvl", S, min_tiles=1, max_tiles=6)


def _png(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _patch_means(pixels: np.ndarray) -> np.ndarray:
  """float[H, W, 3] -> float[H/P, W/P, 3]: what the stand-in ViT sees in each patch."""
  h, w, c = pixels.shape
  return pixels.reshape(h // P, P, w // P, P, c).mean((1, 3))


def _patch_mean_vit(views: np.ndarray) -> np.ndarray:
  """float[V, S, S, 3] -> float[V, G*G, 3]: a ViT whose features are patch means."""
  return np.stack([_patch_means(v).reshape(G * G, 3) for v in views])


# (tiling, image h x w, expected rows x cols, expected feature box (top, left, h, w)). The
# image sizes need no resampling, so the expected features come from the original pixels.
CASES = {
  "anyres_wide": (ANYRES, (8, 16), (1, 2), (0, 0, 2, 4)),
  "anyres_tall": (ANYRES, (16, 8), (2, 1), (0, 0, 4, 2)),
  "anyres_square": (ANYRES, (16, 16), (2, 2), (0, 0, 4, 4)),
  # A square image letterboxed into the 1 x 2 pinpoint (the first of a tie): the
  # padding is one feature column on each side, which unpadding drops.
  "anyres_letterboxed": (ANYRES, (8, 8), (1, 2), (0, 1, 2, 2)),
  "internvl_wide": (INTERNVL, (8, 16), (1, 2), (0, 0, 2, 4)),
  "internvl_tall": (INTERNVL, (24, 8), (3, 1), (0, 0, 6, 2)),
  "internvl_square": (INTERNVL, (16, 16), (2, 2), (0, 0, 4, 4)),
  # Too small to fill 2 x 2 tiles: one tile, so InternVL drops the thumbnail.
  "internvl_single": (INTERNVL, (8, 8), (1, 1), (0, 0, 2, 2)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_known_image_round_trips_through_tiles_and_the_token_layout(name):
  tiling, (h, w), layout, (top, left, bh, bw) = CASES[name]
  pixels = _pattern(h, w)
  views, tile_layout = image_lib.ImagePreprocessor(S, tiling)(_png(pixels), where=name)
  assert views.shape == (tiling.num_slots, S, S, 3)
  np.testing.assert_array_equal(tile_layout, [*layout, h, w])
  rows, cols = layout
  assert not views[1 + rows * cols :].any()  # unused slots are zeros
  # The global view is the whole image squashed to S x S.
  squashed = np.asarray(Image.fromarray(pixels).resize((S, S), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(views[0], squashed / np.float32(127.5) - 1)

  feats = _patch_mean_vit(views)
  tokens, valid = jax.jit(functools.partial(anyres.arrange_tokens, tiling=tiling))(
    jnp.asarray(feats)[None], jnp.asarray(tile_layout)[None]
  )
  tokens, valid = np.asarray(tokens[0]), np.asarray(valid[0])
  assert tokens.shape == (tiling.num_tokens(G), 3)
  thumb = G * G
  expected_grid = _patch_means(pixels / np.float32(127.5) - 1)
  # The letterboxed case: the image's features sit in the middle of the padded grid.
  assert expected_grid.shape == (bh, bw, 3)
  got_grid = tokens[thumb:][valid[thumb:]].reshape(bh, bw, 3)
  np.testing.assert_allclose(got_grid, expected_grid, atol=1e-6)
  assert valid[thumb:].sum() == bh * bw  # outside the layout and the letterbox: invalid
  assert not valid[thumb + bh * bw :].any()  # compacted to the front of the buffer
  thumbnail_kept = not (tiling.mode == "internvl" and rows * cols == 1)
  assert valid[:thumb].all() == thumbnail_kept and valid[:thumb].any() == thumbnail_kept
  if tiling.mode == "anyres":
    want = anyres.unpad_mask((h, w), (rows * G, cols * G))
    assert want.sum() == bh * bw and want[top : top + bh, left : left + bw].all()


def test_letterbox_pixels_are_the_neutral_fill():
  pixels = _pattern(8, 12)
  canvas = np.asarray(image_lib.resize_and_pad(Image.fromarray(pixels), (8, 16)))
  np.testing.assert_array_equal(canvas[:, 2:14], pixels)  # 12 px wide, centred
  np.testing.assert_array_equal(canvas[:, [0, 1, 14, 15]], 127)


def test_batches_carry_views_and_layouts_of_mixed_images():
  tok = helpers.toy_tokenizer("gemma")
  template = template_lib.TEMPLATES["gemma"]
  sizes = [(8, 16), (16, 8), (16, 16), None]  # wide, tall, square, text-only
  recs = [
    {
      "id": f"r{i}",
      "image": _png(_pattern(*size, seed=i)) if size else b"",
      "has_image": size is not None,
      "conversations": conv,
    }
    for i, (size, conv) in enumerate(zip(sizes, helpers.toy_conversations(4)))
  ]
  _, idx = pipeline_lib.analyze(recs, tok, template, (32, 48, 64))
  kw = dict(image_size=S, batch_size=4, seq_buckets=(32, 48, 64), seed=0)
  ds = pipeline_lib.make_train_dataset(recs, idx, tok, template, tiling=ANYRES, **kw)
  batch = ds[0]
  assert batch["image"].shape == (4, ANYRES.num_slots, S, S, 3)
  assert batch["tile_layout"].dtype == np.int32 and batch["tile_layout"].shape == (4, 4)
  by_layout = {tuple(lay[:2]): lay for lay in batch["tile_layout"]}
  assert {(1, 2), (2, 1), (2, 2)} <= set(by_layout)
  text_only = np.flatnonzero(~batch["has_image"])
  assert len(text_only) == 1 and not batch["image"][text_only[0]].any()
  # Without tiling the batch is exactly what it was.
  plain = pipeline_lib.make_train_dataset(recs, idx, tok, template, **kw)[0]
  assert "tile_layout" not in plain and plain["image"].shape == (4, S, S, 3)
  # Packing cannot hold tiles yet: the error names both keys.
  spec = pipeline_lib.PackSpec(length=96, max_images=2, window=8, num_image_tokens=4)
  with pytest.raises(ValueError, match=r"data\.pack_length.*model\.dynamic_res\.mode"):
    pipeline_lib.make_train_dataset(recs, idx, tok, template, tiling=ANYRES, pack=spec, **kw)


def test_evaluation_tiles_images_as_training_does():
  """The eval stage's preprocessing is the pipeline's, read from the same config keys."""
  config = tiny_dynres.get_config("smoke")
  prep = eval_run.image_preprocessor(config)
  assert prep.tiling.mode == "internvl" and prep.tiling.tile_size == config.data.image_size
  record = {"id": "x", "image": _png(_pattern(128, 128)), "has_image": True}
  record["conversations"] = helpers.toy_conversations(1)[0]
  tok = helpers.toy_tokenizer("gemma")
  train_example = pipeline_lib._Preprocess(
    tok, template_lib.TEMPLATES["gemma"], config.data.image_size, 64, prep.tiling
  )(record)
  views, layout = prep(record["image"])
  np.testing.assert_array_equal(views, train_example["image"])
  np.testing.assert_array_equal(layout, train_example["tile_layout"])
  np.testing.assert_array_equal(layout, [2, 2, 128, 128])


# --- the VLM with tiles ---------------------------------------------------------------------

VLM_TILING = anyres.Tiling(
  "anyres", tiny_models.IMAGE_SIZE, pinpoints=((1, 2), (2, 1), (2, 2)), newline=True
)
# tiny_models: 16 px views, 8 px patches -> 2 x 2 features per view.
LAYOUTS = np.array([[1, 2, 30, 70], [2, 1, 80, 20], [2, 2, 50, 50]], np.int32)


@functools.cache
def _tiled_vlm():
  return tiny_models.random_vlm(tiling=VLM_TILING)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  b, t = len(LAYOUTS), 8
  image = rng.uniform(-1, 1, (b, VLM_TILING.num_slots, 16, 16, 3)).astype(np.float32)
  tokens = rng.integers(1, tiny_models.VOCAB, (b, t)).astype(np.int32)
  mask_ar = np.concatenate([np.zeros((b, 3)), np.ones((b, t - 3))], 1).astype(np.int32)
  return image, tokens, mask_ar, np.ones((b, t), bool), np.ones((b,), bool)


def test_vlm_token_count_and_newline_param():
  model, flat = _tiled_vlm()
  # 4 base tokens + the largest grid: 2 x 2 tiles -> 4 x 4 features + 4 separators.
  assert model.num_image_tokens == VLM_TILING.num_tokens(2) == 4 + 4 * 5
  assert flat["image_newline"].shape == (tiny_models.LLM.width,)
  with pytest.raises(ValueError, match="connector"):
    tiny_models.abstract_vlm(connector="resampler", tiling=VLM_TILING)


def test_vlm_compiles_once_and_ignores_what_the_layouts_do_not_use():
  model, _ = _tiled_vlm()
  graphdef, state = nnx.split(model)
  traces = []

  @jax.jit
  def forward(state, image, tokens, mask_ar, mask_input, has_image, tile_layout):
    traces.append(1)
    m = nnx.merge(graphdef, state)
    return m(image, tokens, mask_ar, mask_input, has_image, tile_layout=tile_layout)

  image, tokens, mask_ar, mask_input, has_image = _inputs()
  logits, aux = forward(state, image, tokens, mask_ar, mask_input, has_image, LAYOUTS)
  # Slots outside each layout (1 x 2 uses 1..2, 2 x 1 uses 1..2), and an image-less row.
  perturbed = image.copy()
  perturbed[0, 3:] = perturbed[1, 3:] = 9.0
  has_image2 = np.array([True, True, False])
  perturbed[2] = -9.0
  logits2, _ = forward(state, perturbed, tokens, mask_ar, mask_input, has_image, LAYOUTS)
  np.testing.assert_array_equal(np.asarray(logits2[:2]), np.asarray(logits[:2]))
  blank, _ = forward(state, image, tokens, mask_ar, mask_input, has_image2, LAYOUTS)
  blank2, _ = forward(state, perturbed, tokens, mask_ar, mask_input, has_image2, LAYOUTS)
  np.testing.assert_array_equal(np.asarray(blank2[2]), np.asarray(blank[2]))
  # Other layouts, same shapes: no new compile. A used tile does change the answer.
  relaid = LAYOUTS[::-1].copy()
  forward(state, image, tokens, mask_ar, mask_input, has_image, relaid)
  used = image.copy()
  used[0, 2] = 9.0
  logits3, _ = forward(state, used, tokens, mask_ar, mask_input, has_image, LAYOUTS)
  assert np.abs(np.asarray(logits3[0]) - np.asarray(logits[0])).max() > 1e-3
  assert len(traces) == 1
  assert aux["img/valid"].shape == (3, model.num_image_tokens)


def test_vlm_equals_the_llm_on_the_compact_sequence():
  """Masking the unused image tokens is dropping them: the LLM run directly on
  [valid image tokens ; text], with nothing padded, gives the same text logits."""
  model, _ = _tiled_vlm()
  graphdef, state = nnx.split(model)
  image, tokens, mask_ar, mask_input, has_image = _inputs(1)

  @jax.jit
  def forward(state, tile_layout):
    m = nnx.merge(graphdef, state)
    return m(image, tokens, mask_ar, mask_input, has_image, tile_layout=tile_layout)

  @functools.partial(jax.jit, static_argnums=1)
  def compact(state, n, z, tokens, mask_ar):
    m = nnx.merge(graphdef, state)
    x = jnp.concatenate([z, m.llm.embed(tokens)], axis=1)
    full_ar = m.full_mask_ar(n, mask_ar)
    positions = jnp.arange(x.shape[1])[None]
    mask = vlm.make_attn_mask(jnp.ones(x.shape[:2], bool), full_ar)
    return m.llm(x, positions, mask)[0][:, n:]

  logits, aux = forward(state, LAYOUTS)
  for i in range(len(LAYOUTS)):
    z = np.asarray(aux["img/zimg"][i])[np.asarray(aux["img/valid"][i])]
    want = compact(state, len(z), z[None], tokens[i : i + 1], mask_ar[i : i + 1])
    np.testing.assert_allclose(np.asarray(logits[i]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
