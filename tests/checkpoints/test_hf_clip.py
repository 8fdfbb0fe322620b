"""CLIP vision towers and LLaVA export: parity with transformers, round trips.

Every reference is a tiny random HF model saved to safetensors in the test; no
downloads. Parity is max abs diff <= 1e-4 in fp32 on a CPU.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx

from compact_jax.checkpoints import cli, convert, hf, safetensors_io, tables
from compact_jax.models import llm, lora, siglip, vlm
from tests.checkpoints import hf_models as hm
from tests.models import tiny_models as tm

TOL = 1e-4
DEPTH = 3  # so -1, -2 and -3 are three different layers


@pytest.fixture(scope="module")
def clip_ref(tmp_path_factory):
  """(HF CLIPVisionModel, its dir, HF outputs on ``images``, images)."""
  ref = hm.randomize(T.CLIPVisionModel(hm.clip_vision_config(DEPTH)), 0, plain_norm=True)
  path = tmp_path_factory.mktemp("clip")
  ref.save_pretrained(str(path))
  images = tm.random_images(2, seed=11)  # ours: [-1, 1]; HF: CLIP-normalised
  pixels = torch.as_tensor(hm.clip_pixels(images).transpose(0, 3, 1, 2))
  with torch.no_grad():
    out = ref(pixel_values=pixels, output_hidden_states=True)
    normed_last = ref.post_layernorm(out.last_hidden_state)
  return ref, path, out, normed_last.numpy(), images


def test_clip_config_decodes_to_the_clip_family(clip_ref):
  _, path, _, _, _ = clip_ref
  v, size = hf.clip_from_config(hf.read_config(str(path)))
  assert size == 16 and v.family == "clip"
  assert (v.class_token, v.pre_norm, v.patch_bias, v.mlp_act, v.norm_eps) == (
    True,
    True,
    False,
    "quick_gelu",
    1e-5,
  )
  assert v == siglip.ViTVariant(32, DEPTH, 64, 2, 8, **siglip.CLIP)


@pytest.mark.parametrize("layer", [-1, -2, -3])
def test_clip_hidden_states_match_transformers(clip_ref, layer):
  """Our output_layer -n is HF's hidden_states[-n] without the class token (n >= 2);
  -1 is the last block after post_layernorm, whose class row is HF's pooler_output."""
  _, path, out, normed_last, images = clip_ref
  pool = "tok" if layer == -1 else "none"
  vit = hf.load_clip_vision(str(path), output_layer=layer, pool_type=pool)
  got, aux = tm.apply(vit, jnp.asarray(images))
  full = normed_last if layer == -1 else out.hidden_states[layer].numpy()
  assert got.shape == (2, 4, 32)  # 2 x 2 patches, class token dropped
  np.testing.assert_allclose(np.asarray(got), full[:, 1:], atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(aux["encoded"]), full, atol=TOL, rtol=0)
  # The encoder's input: [class; patches] + positions, after pre_layrnorm.
  np.testing.assert_allclose(
    np.asarray(aux["stem"]), out.hidden_states[0].numpy(), atol=TOL, rtol=0
  )
  if layer == -1:
    np.testing.assert_allclose(
      np.asarray(aux["pooled"]), out.pooler_output.numpy(), atol=TOL, rtol=0
    )


def test_clip_unrolled_layers_match_scanned(clip_ref):
  _, path, out, _, images = clip_ref
  vit = hf.load_clip_vision(str(path), output_layer=-2, scan_layers=False)
  assert "Transformer/encoderblock_2/LayerNorm_0/scale" in vlm.param_paths(nnx.state(vit))
  got, _ = tm.apply(vit, jnp.asarray(images))
  np.testing.assert_allclose(
    np.asarray(got), out.hidden_states[-2].numpy()[:, 1:], atol=TOL, rtol=0
  )


def test_clip_export_is_bit_identical_to_the_saved_tensors(clip_ref):
  _, path, _, _, _ = clip_ref
  vit = hf.load_clip_vision(str(path))
  names = set(vlm.param_paths(nnx.state(vit)))
  assert {"cls", "pre_norm/scale", "pre_norm/bias", "pos_embedding"} <= names
  assert "embedding/bias" not in names
  flat = {k: np.asarray(v) for k, v in vlm.flat_params(nnx.state(vit)).items()}
  back = convert.export_tensors(flat, tables.clip_sections(vit.variant))
  saved = safetensors_io.SafetensorsCheckpoint(str(path))
  assert set(back) == set(saved)
  for name in back:
    np.testing.assert_array_equal(back[name], saved[name], err_msg=name)


def test_cli_hf_to_npz_clip_writes_the_tower_under_params_img(clip_ref, tmp_path, capsys):
  from compact_jax.checkpoints import big_vision

  _, path, _, _, _ = clip_ref
  dst = str(tmp_path / "clip.npz")
  cli.main(["hf-to-npz", "--kind=clip", f"--src={path}", f"--dst={dst}"])
  assert "class_token=True" in capsys.readouterr().out
  vit = hf.load_clip_vision(str(path))
  want = vlm.flat_params(nnx.state(vit))
  got = big_vision.NpzCheckpoint(dst)
  assert set(got) == {"params/img/" + k for k in want}
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(got["params/img/" + k]), np.asarray(v), err_msg=k)


def test_a_full_clip_model_file_loads_its_vision_half(clip_ref, tmp_path):
  """OpenAI's repos are ``CLIPModel``s: ``vision_model.*`` next to a text tower."""
  _, path, out, _, images = clip_ref
  saved = safetensors_io.SafetensorsCheckpoint(str(path))
  tensors = {"vision_model." + k: v for k, v in saved.items()}
  tensors["text_model.embeddings.token_embedding.weight"] = np.zeros((5, 4), np.float32)
  tensors["visual_projection.weight"] = np.zeros((4, 32), np.float32)
  tensors["logit_scale"] = np.zeros((), np.float32)
  tensors["vision_model.embeddings.position_ids"] = np.arange(5)[None]
  safetensors_io.save_file(tensors, str(tmp_path / "model.safetensors"))
  cfg = {"model_type": "clip", "vision_config": hf.read_config(str(path))}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  vit = hf.load_clip_vision(str(tmp_path), output_layer=-2)
  got, _ = tm.apply(vit, jnp.asarray(images))
  np.testing.assert_allclose(
    np.asarray(got), out.hidden_states[-2].numpy()[:, 1:], atol=TOL, rtol=0
  )


def test_clip_posemb_resampling_keeps_the_class_position(clip_ref):
  _, path, _, _, _ = clip_ref
  base = hf.load_clip_vision(str(path))
  big = hf.load_clip_vision(str(path), image_size=24)  # 2 x 2 -> 3 x 3 patches
  pe, pe_big = np.asarray(base.pos_embedding[...]), np.asarray(big.pos_embedding[...])
  assert pe_big.shape == (1, 1 + 9, 32)
  np.testing.assert_array_equal(pe_big[:, 0], pe[:, 0])
  np.testing.assert_allclose(pe_big[:, 1:], siglip.resample_posemb(pe[:, 1:], 3), atol=0)


# --- LLaVA ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llavas(tmp_path_factory):
  """tower -> (HF reference, its dir, our import), built once per tower."""
  cache = {}

  def get(tower):
    if tower not in cache:
      ref = hm.llava(tower=tower)
      path = tmp_path_factory.mktemp(f"llava_{tower}")
      ref.save_pretrained(str(path))
      cache[tower] = (ref, path, hf.load_llava(str(path))[0])
    return cache[tower]

  return get


def _prompt(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(HF input ids [image placeholders; text], our text tokens, images)."""
  text = hm.tokens(2, seed=seed, high=hm.VOCAB - 1)
  ids = np.concatenate([np.full((2, n), hm.VOCAB - 1), text], axis=1)
  return ids, text, tm.random_images(2, seed=seed)


def _our_logits(model: vlm.VLM, text: np.ndarray, images: np.ndarray) -> np.ndarray:
  ones = np.ones(text.shape, np.int32)
  got, _ = tm.apply(
    model,
    jnp.asarray(images),
    jnp.asarray(text, jnp.int32),
    jnp.asarray(ones),
    jnp.asarray(ones, bool),
    jnp.ones((2,), bool),
  )
  return np.asarray(got)


def test_llava_with_a_clip_tower_matches_transformers(llavas):
  ref, _, model = llavas("clip")
  assert model.img.variant.family == "clip" and model.img.Transformer.output_layer == -2
  n = model.num_image_tokens
  assert n == 4  # the class token is not an image token
  ids, text, images = _prompt(n, seed=12)
  want = hm.llava_logits(ref, ids, images)
  assert np.abs(want).max() > 1.0, "reference logits too small for the parity check to bite"
  np.testing.assert_allclose(_our_logits(model, text, images), want[:, n:], atol=TOL, rtol=0)


def _from_pretrained(path) -> torch.nn.Module:
  model, info = T.LlavaForConditionalGeneration.from_pretrained(str(path), output_loading_info=True)
  bad = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
    {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
  )
  assert not bad, bad
  return model.eval()


@pytest.mark.parametrize("tower", ["siglip", "clip"])
def test_llava_hf_to_ours_to_hf_round_trip(llavas, tower, tmp_path):
  """Export writes exactly the tensors transformers saved, and reloads with its logits."""
  ref, path, model = llavas(tower)
  hf.export_llava(model, "llama", str(tmp_path), image_token_index=hm.VOCAB - 1)
  saved = safetensors_io.SafetensorsCheckpoint(str(path))
  out = safetensors_io.SafetensorsCheckpoint(str(tmp_path))
  assert set(out) == set(saved)
  for name in out:
    np.testing.assert_array_equal(out[name], saved[name], err_msg=name)
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["vision_feature_select_strategy"] == hm.LLAVA_TOWERS[tower][1]
  again = _from_pretrained(tmp_path)
  ids, _, images = _prompt(model.num_image_tokens, seed=13)
  np.testing.assert_allclose(
    hm.llava_logits(again, ids, images), hm.llava_logits(ref, ids, images), atol=TOL, rtol=0
  )


LLAMA = llm.LLMVariant(
  width=48,
  depth=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,  # != 48 / 4
  mlp_dim=96,
  norm="plain",
  norm_eps=1e-5,
  mlp_act="silu",
  tie_embeddings=False,
  scale_embeddings=False,
)


# Two-block towers (HF's feature layer must be <= -2), CLIP and SigLIP knobs.
TOWERS = {
  "clip": siglip.ViTVariant(32, 2, 64, 2, 8, **siglip.CLIP),
  "siglip": siglip.ViTVariant(32, 2, 64, 2, 8),
}


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_lora_merged_vlm_exports_to_transformers_with_our_logits(tower, tmp_path):
  """Ours (random weights, LoRA with nonzero B on the LLM) -> merge -> HF dir ->
  LlavaForConditionalGeneration gives the unmerged model's logits."""
  model = tm.abstract_vlm(
    vit_variant=TOWERS[tower],
    llm_variant=LLAMA,
    vocab_size=hm.VOCAB,
    vit_output_layer=-2,
    causal_image=True,
  )
  vlm.load_flat_params(model, tm.random_flat_params(model, seed=4, scale=0.2))
  targets = (r"llm/layers/attn/(q|kv|attn_vec)_einsum/w$", r"llm/layers/mlp/linear$")
  lora.apply_lora(model, lora.LoraConfig(targets, rank=2, alpha=4.0), seed=1)
  rng = np.random.default_rng(5)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    var.set_value(jnp.asarray(0.2 * rng.standard_normal(var.get_value().shape), jnp.float32))
  n = model.num_image_tokens
  ids, text, images = _prompt(n, seed=14)
  want = _our_logits(model, text, images)
  with pytest.raises(KeyError, match="no converter rule writes params"):
    hf.export_llava(model, "llama", str(tmp_path / "unmerged"), image_token_index=hm.VOCAB - 1)
  assert len(lora.merge_lora(model)) == 4  # q, kv, attn_vec, linear
  hf.export_llava(model, "llama", str(tmp_path / "hf"), image_token_index=hm.VOCAB - 1)
  got = hm.llava_logits(_from_pretrained(tmp_path / "hf"), ids, images)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got[:, n:], want, atol=TOL, rtol=0)


def test_export_refuses_what_hf_llava_computes_differently(llavas, tmp_path):
  _, path, _ = llavas("clip")
  model, _ = hf.load_llava(str(path))
  with pytest.raises(ValueError, match=r"image_token_index 128 not in \[0, 128\)"):
    hf.export_llava(model, "llama", str(tmp_path), image_token_index=hm.VOCAB)
  model.causal_image = False
  with pytest.raises(ValueError, match="full-attention prefix"):
    hf.export_llava(model, "llama", str(tmp_path), image_token_index=0)
  last = tm.abstract_vlm(vit_variant="clip-smoke/8", llm_variant=LLAMA, causal_image=True)
  with pytest.raises(ValueError, match="output_layer=-1 includes encoder_norm"):
    hf.export_llava(last, "llama", str(tmp_path), image_token_index=0)
  linear = tm.abstract_vlm(connector="linear", llm_variant=LLAMA, vit_output_layer=-2)
  with pytest.raises(ValueError, match="needs the mlp2x_gelu connector"):
    hf.export_llava(linear, "llama", str(tmp_path), image_token_index=0)


def test_llava_select_strategy_must_fit_the_tower(llavas, tmp_path):
  _, path, _ = llavas("clip")
  cfg = json.loads((path / "config.json").read_text())
  cfg["vision_feature_select_strategy"] = "full"
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
  with pytest.raises(ValueError, match="'full' unsupported for a clip tower"):
    hf.load_llava(str(tmp_path))


def test_cli_npz_to_llava_writes_the_api_export(tmp_path, capsys):
  """Ours as a big_vision npz -> ``cli npz-to-llava`` writes the tensors and config
  that ``hf.export_llava`` (parity-tested above) writes for the same model."""
  from compact_jax.checkpoints import big_vision

  model = tm.abstract_vlm(
    vit_variant="clip-tiny/8",
    llm_variant="smoke_llama",
    vocab_size=96,
    vit_output_layer=-2,
    causal_image=True,
  )
  flat = tm.random_flat_params(model, seed=6, scale=0.2)
  vlm.load_flat_params(model, flat)
  npz = str(tmp_path / "ours.npz")
  parts = {"img/": "params/img/", "connector/": "params/connector/", "llm/": "params/llm/"}
  big_vision.export_npz(flat, npz, parts)
  args = ["--vit=clip-tiny/8", "--image_size=16", "--vit_output_layer=-2", "--llm=smoke_llama"]
  args += ["--family=llama", "--vocab=96", "--image_token_index=95", "--dtype=bfloat16"]
  cli.main(["npz-to-llava", *args, f"--src={npz}", f"--dst={tmp_path / 'cli'}"])
  assert "wrote" in capsys.readouterr().out
  hf.export_llava(
    model, "llama", str(tmp_path / "api"), image_token_index=95, dtype=ml_dtypes.bfloat16
  )
  got = safetensors_io.SafetensorsCheckpoint(str(tmp_path / "cli"))
  want = safetensors_io.SafetensorsCheckpoint(str(tmp_path / "api"))
  assert set(got) == set(want) and "vision_tower.embeddings.class_embedding" in got
  for name in got:
    assert got[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got[name].view(np.uint16), want[name].view(np.uint16), name)
  cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
  assert cfg == json.loads((tmp_path / "api" / "config.json").read_text())
  assert cfg["vision_config"]["model_type"] == "clip_vision_model" and cfg["dtype"] == "bfloat16"


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_exported_image_processor_feeds_the_tower_our_pixels(tower, tmp_path):
  """AutoImageProcessor from the export's preprocessor_config.json turns an image into
  the pixels our pipeline gives the tower (after its own normalisation)."""
  import io

  from PIL import Image

  from compact_jax.data import image as image_lib

  model = tm.abstract_vlm(
    vit_variant=TOWERS[tower], llm_variant=LLAMA, vocab_size=hm.VOCAB, vit_output_layer=-2,
    causal_image=True,
  )  # fmt: skip
  vlm.load_flat_params(model, tm.random_flat_params(model, seed=4, scale=0.2))
  hf.export_llava(model, "llama", str(tmp_path), image_token_index=hm.VOCAB - 1)
  size = model.img.image_size
  # A square photo-like image at 3x the model size, so both sides resize (bicubic).
  rng = np.random.default_rng(0)
  small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
  pil = Image.fromarray(small).resize((3 * size, 3 * size), Image.Resampling.BILINEAR)
  buf = io.BytesIO()
  pil.save(buf, format="PNG")
  ours = image_lib.preprocess_image(buf.getvalue(), size)  # [-1, 1], HWC
  norm = model.img.variant.pixel_norm
  if norm is not None:  # what the tower does to its input first
    mean, std = (np.asarray(a, np.float32) for a in norm)
    ours = ((ours + 1.0) / 2.0 - mean) / std
  proc = T.AutoImageProcessor.from_pretrained(str(tmp_path))
  theirs = proc(images=pil, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  assert theirs.shape == ours.shape == (size, size, 3)
  np.testing.assert_allclose(theirs, ours, atol=1e-5)
