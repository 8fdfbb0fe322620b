"""big_vision npz: per-layer and scanned SigLIP files, PaliGemma's img/llm split, bf16, errors."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from compact_jax import checkpoints
from compact_jax.checkpoints import big_vision
from compact_jax.models import siglip, vlm
from tests.models import tiny_models as tm

PALIGEMMA = {"params/img/": "img/", "params/llm/": "llm/"}


@pytest.fixture(scope="module")
def paligemma():
  """A scanned tiny VLM with the linear connector (PaliGemma's layout) and its logits."""
  model, flat = tm.random_vlm(seed=11, connector="linear")
  batch = _batch()
  return model, flat, np.asarray(tm.apply(model, *batch)[0])


def _batch():
  rng = np.random.default_rng(11)
  tokens = rng.integers(0, tm.VOCAB, (2, 5)).astype(np.int32)
  mask_ar = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], np.int32)
  return tm.random_images(2, 11), tokens, mask_ar, np.ones((2, 5), bool), np.array([True, True])


@pytest.mark.parametrize("per_layer", [False, True])
def test_paligemma_npz_round_trip_into_either_layout(paligemma, tmp_path, per_layer):
  _, flat, want = paligemma
  path = str(tmp_path / "pg.npz")
  big_vision.export_npz(
    flat, path, {"img/": "params/img/", "llm/": "params/llm/"}, per_layer=per_layer
  )
  keys = set(np.load(path, allow_pickle=False).files)
  # PaliGemma's connector is the ViT head; big_vision spells the stacked axis per file.
  assert "params/img/head/kernel" in keys
  if per_layer:
    assert "params/img/Transformer/encoderblock_1/LayerNorm_0/scale" in keys
    assert "params/llm/layers_0/attn/q_einsum/w" in keys
  else:
    assert keys >= {
      "params/img/Transformer/encoderblock/LayerNorm_0/scale",
      "params/llm/layers/mlp/linear",
    }
  for scan in (True, False):
    fresh = tm.abstract_vlm(connector="linear", scan_layers=scan)
    vlm.load_flat_params(fresh, tm.random_flat_params(fresh, seed=99))  # something else first
    loaded = checkpoints.init_from_npz(fresh, path, PALIGEMMA)
    assert len(loaded) == len(vlm.param_paths(nnx.state(fresh)))
    np.testing.assert_allclose(np.asarray(tm.apply(fresh, *_batch())[0]), want, atol=1e-5, rtol=0)


def test_siglip_release_loads_img_only_and_skips_text_tower(paligemma, tmp_path):
  """A SigLIP webli npz (per-layer img/, MAP head, txt/, t, b) initialises just the ViT."""
  _, flat, _ = paligemma
  img = {k: v for k, v in flat.items() if k.startswith("img/") and not k.startswith("img/head/")}
  path = str(tmp_path / "siglip.npz")
  big_vision.export_npz(img, path, {"img/": "params/img/"}, per_layer=True)
  arrays = dict(np.load(path, allow_pickle=False))
  arrays.update(
    {
      "params/img/MAPHead_0/probe": np.zeros((1, 1, 32), np.float32),
      "params/txt/Encoder_0/encoder_norm/scale": np.ones(8, np.float32),
      "params/t": np.zeros(1, np.float32),
      "params/b": np.zeros(1, np.float32),
    }
  )
  np.savez(path, **arrays)
  vit = nnx.eval_shape(lambda: siglip.ViT(tm.VIT, image_size=tm.IMAGE_SIZE, rngs=nnx.Rngs(0)))
  with pytest.raises(KeyError, match=r"'params/img/MAPHead_0/probe' maps to 'MAPHead_0/probe'"):
    checkpoints.init_from_npz(vit, path, {"params/img/": ""}, ignore=(r"^params/(txt|t|b)(/|$)",))
  ignore = (r"^params/(txt|t|b)(/|$)", r"^params/img/MAPHead_0/")
  loaded = checkpoints.init_from_npz(vit, path, {"params/img/": ""}, ignore=ignore)
  got = vlm.flat_params(nnx.state(vit))
  assert set(loaded) == set(got)
  for k, v in got.items():
    np.testing.assert_array_equal(np.asarray(v), img["img/" + k], err_msg=k)


def test_partial_init_keeps_the_connector_and_names_missing_params(paligemma, tmp_path):
  _, flat, _ = paligemma
  path = str(tmp_path / "llm_only.npz")
  llm_part = {k: v for k, v in flat.items() if k.startswith("llm/")}
  big_vision.export_npz(llm_part, path, {"llm/": "params/llm/"})
  model = tm.abstract_vlm(connector="mlp2x_gelu")
  before = tm.random_flat_params(model, seed=5)
  vlm.load_flat_params(model, before)
  checkpoints.init_from_npz(model, path, {"params/llm/": "llm/"})
  after = vlm.flat_params(nnx.state(model))
  np.testing.assert_array_equal(
    np.asarray(after["connector/Dense_0/kernel"]), before["connector/Dense_0/kernel"]
  )
  np.testing.assert_array_equal(
    np.asarray(after["llm/layers/mlp/linear"]), flat["llm/layers/mlp/linear"]
  )
  # Asking for img/ from a file that has none names what is missing.
  with pytest.raises(KeyError, match=r"does not fill model params \['img/"):
    checkpoints.init_from_npz(model, path, {"params/llm/": "llm/", "params/img/": "img/"})


def test_bfloat16_is_stored_as_void_and_recovered(tmp_path):
  x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
  path = str(tmp_path / "bf16.npz")
  big_vision.export_npz(
    {"img/pos_embedding": x}, path, {"img/": "params/img/"}, dtype=ml_dtypes.bfloat16
  )
  raw = np.load(path, allow_pickle=False)["params/img/pos_embedding"]
  assert raw.dtype == np.dtype("V2")  # big_vision's on-disk spelling
  back = big_vision.NpzCheckpoint(path)["params/img/pos_embedding"]
  assert back.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(
    back.astype(np.float32), x.astype(ml_dtypes.bfloat16).astype(np.float32)
  )


def test_object_arrays_are_refused(tmp_path):
  path = str(tmp_path / "evil.npz")
  np.savez(path, **{"params/img/x": np.array([{"a": 1}], dtype=object)})
  with pytest.raises(ValueError, match="allow_pickle"):
    big_vision.NpzCheckpoint(path)["params/img/x"]
