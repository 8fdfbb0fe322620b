"""Hugging Face interop: logits parity with transformers, export round trips, bf16, shards."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from compact_jax.checkpoints import convert, hf, safetensors_io, tables
from compact_jax.models import vlm
from tests.checkpoints import hf_models as hm
from tests.models import tiny_models as tm

TOL = 1e-4


def our_logits(model, ids: np.ndarray) -> np.ndarray:
  b, t = ids.shape
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  x = model.embed(jnp.asarray(ids, jnp.int32))
  logits, _ = tm.apply(model, x, pos, mask)
  return np.asarray(logits)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  """family -> (family, HF reference, its checkpoint dir, our imported Decoder), built once."""
  cache = {}

  def get(family):
    if family not in cache:
      ref = hm.causal_lm(family)
      path = str(tmp_path_factory.mktemp(family))
      ref.save_pretrained(path)
      cache[family] = (family, ref, path, hf.load_causal_lm(path))
    return cache[family]

  return get


@pytest.fixture(params=sorted(hm.CAUSAL_LMS))
def imported(request, zoo):
  return zoo(request.param)


def test_causal_lm_logits_match_transformers(imported):
  _, ref, _, model = imported
  ids = hm.tokens(2)
  want = hm.hf_logits(ref, ids)
  got = our_logits(model, ids)
  assert np.abs(want).max() > 1.0, "reference logits too small for the parity check to bite"
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_imported_variant_has_the_family_knobs(imported):
  family, _, _, model = imported
  v = model.variant
  expect = {
    "gemma": dict(norm="zero_centred", mlp_act="gelu_tanh", num_kv_heads=1, head_dim=16),
    "gemma2": dict(post_norms=True, sliding_window=4, attn_softcap=5.0, query_scale=24),
    "llama": dict(norm="plain", tie_embeddings=False, num_kv_heads=2, rope_base=500000.0),
    "qwen2": dict(qkv_bias=True, tie_embeddings=True, mlp_act="silu"),
  }[family]
  assert {k: getattr(v, k) for k in expect} == expect
  if family == "llama":
    assert v.rope_scaling is not None and v.rope_scaling.kind == "llama3"


def test_export_reloads_in_transformers_with_the_same_logits(imported, tmp_path):
  family, ref, _, model = imported
  # One family goes through the sharded writer and index json.
  shard = 20_000 if family == "llama" else None
  hf.export_causal_lm(model, family, str(tmp_path), max_shard_bytes=shard)
  if shard:
    assert os.path.exists(tmp_path / safetensors_io.INDEX_FILE)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
  cls = hm.CAUSAL_LMS[family][1]
  kw = {"attn_implementation": "eager"} if family == "gemma2" else {}
  again = cls.from_pretrained(str(tmp_path), **kw).eval()
  ids = hm.tokens(2, seed=1)
  np.testing.assert_allclose(hm.hf_logits(again, ids), hm.hf_logits(ref, ids), atol=TOL, rtol=0)
  # And the tensors are bit-identical to what transformers saved in the first place.
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  for name, arr in safetensors_io.SafetensorsCheckpoint(str(tmp_path)).items():
    np.testing.assert_array_equal(arr, sd[name], err_msg=name)


def test_sharded_import_equals_single_file(zoo, tmp_path):
  _, ref, _, model = zoo("qwen2")
  ref.save_pretrained(str(tmp_path), max_shard_size="20KB")
  assert os.path.exists(tmp_path / safetensors_io.INDEX_FILE)
  sharded = hf.load_causal_lm(str(tmp_path))
  a, b = vlm.flat_params(nnx.state(model)), vlm.flat_params(nnx.state(sharded))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_bfloat16_checkpoint_imports_exactly(tmp_path):
  family = "gemma"
  ref16 = hm.causal_lm(family).to(torch.bfloat16)
  ref16.save_pretrained(str(tmp_path))
  raw = safetensors_io.SafetensorsCheckpoint(str(tmp_path))
  assert raw["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
  model = hf.load_causal_lm(str(tmp_path))
  ids = hm.tokens(2, seed=2)
  # The same bf16 weights computed in fp32 (reloaded, so RoPE buffers are fp32 too).
  ref32 = hm.CAUSAL_LMS[family][1].from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  want = hm.hf_logits(ref32, ids)
  np.testing.assert_allclose(our_logits(model, ids), want, atol=TOL, rtol=0)
  # Export back to bf16: the original bytes.
  hf.export_causal_lm(model, family, str(tmp_path / "out"), dtype=ml_dtypes.bfloat16)
  out = safetensors_io.SafetensorsCheckpoint(str(tmp_path / "out"))
  for name in out:
    np.testing.assert_array_equal(
      out[name].view(np.uint16), raw[name].view(np.uint16), err_msg=name
    )
  cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert cfg["torch_dtype"] == "bfloat16" and cfg["architectures"] == ["GemmaForCausalLM"]


def test_sliding_window_kv_cache_steps_reproduce_the_full_forward(zoo):
  """Gemma 2's local layers read key positions from the cache, not slot indices."""
  _, _, _, model = zoo("gemma2")
  ids = hm.tokens(2, seed=3)
  b, t = ids.shape
  want = our_logits(model, ids)
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(st, tok, pos, mask, cache, index):
    m = nnx.merge(graphdef, st)
    logits, aux = m(m.embed(tok), pos, mask, cache=cache, cache_index=index)
    return logits, aux["kv_cache"]

  cache = model.init_cache(b, t)
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  got = []
  for i in range(t):
    pos = jnp.full((b, 1), i, jnp.int32)
    logits, cache = step(state, jnp.asarray(ids[:, i : i + 1]), pos, causal[:, i : i + 1], cache, i)
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=TOL, rtol=0)


def test_unknown_tensor_and_missing_tensor_are_named(zoo, tmp_path):
  _, ref, path, _ = zoo("qwen2")
  sd = {k: v.numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  bad = dict(sd, **{"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)})
  safetensors_io.save_file(bad, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(KeyError, match=r"no converter rule for tensors \['model.layers.0.mlp.extra"):
    hf.load_causal_lm(str(tmp_path))
  del sd["model.layers.1.self_attn.k_proj.bias"]
  safetensors_io.save_file(sd, str(tmp_path / "model.safetensors"))
  with pytest.raises(KeyError, match=r"does not fill model params \['layers/attn/kv_einsum/b'\]"):
    hf.load_causal_lm(str(tmp_path))


def test_torch_pickles_are_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(hf.config_from_llm(*_gemma_smoke())))
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
  with pytest.raises(ValueError, match="only torch pickle weights found"):
    hf.load_causal_lm(str(tmp_path))


def _gemma_smoke():
  from compact_jax.models import llm

  return "gemma", llm.decode_variant("smoke"), 64


def test_siglip_vision_model_matches_transformers(tmp_path):
  import transformers as T

  ref = hm.randomize(T.SiglipVisionModel(hm.siglip_vision_config(use_head=True)), 0, True)
  ref.save_pretrained(str(tmp_path))
  images = tm.random_images(2, seed=5)
  with torch.no_grad():
    out = ref(pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
  for layer, want in ((-1, out.last_hidden_state), (-2, out.hidden_states[-2])):
    vit = hf.load_siglip_vision(str(tmp_path), output_layer=layer)
    got, _ = tm.apply(vit, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=TOL, rtol=0)
  # The MAP head: torch's fused in_proj split into big_vision's query/key/value.
  vit = hf.load_siglip_vision(str(tmp_path), pool_type="map")
  _, aux = tm.apply(vit, jnp.asarray(images))
  np.testing.assert_allclose(np.asarray(aux["pooled"]), out.pooler_output.numpy(), atol=TOL)
  flat = {k: np.asarray(v) for k, v in vlm.flat_params(nnx.state(vit)).items()}
  back = convert.export_tensors(flat, tables.siglip_sections(vit.variant, map_head=True))
  sd = {"vision_model." + k: v.numpy() for k, v in ref.state_dict().items()}
  assert back.keys() == sd.keys()
  for name in back:
    np.testing.assert_array_equal(back[name], sd[name], err_msg=name)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  ref = hm.llava()
  path = tmp_path_factory.mktemp("llava")
  ref.save_pretrained(str(path))
  return ref, path


def test_llava_forward_matches_transformers(llava):
  ref, path = llava
  model, info = hf.load_llava(str(path))
  assert model.causal_image and info["family"] == "llama"
  n = model.num_image_tokens
  text = hm.tokens(2, seed=6, high=hm.VOCAB - 1)
  ids = np.concatenate([np.full((2, n), info["image_token_index"]), text], axis=1)
  images = tm.random_images(2, seed=6)
  with torch.no_grad():
    want = ref(
      input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2))
    ).logits.numpy()
  ones = np.ones(text.shape, np.int32)
  got, _ = tm.apply(
    model,
    jnp.asarray(images),
    jnp.asarray(text, jnp.int32),
    jnp.asarray(ones),
    jnp.asarray(ones, bool),
    jnp.ones((2,), bool),
  )
  np.testing.assert_allclose(np.asarray(got), want[:, n:], atol=TOL, rtol=0)


@pytest.mark.parametrize("naming", ["legacy", "current"])
def test_llava_accepts_legacy_and_current_key_prefixes(llava, tmp_path, naming):
  """Hub files from transformers 4.x (``vision_tower.vision_model.``) and the
  >= 4.52 in-memory names (``model.language_model.``, ``lm_head``) both load."""
  _, path = llava
  saved = safetensors_io.SafetensorsCheckpoint(str(path))
  renames = {
    "legacy": (("vision_tower.", "vision_tower.vision_model."),),
    "current": (
      ("vision_tower.", "model.vision_tower."),
      ("multi_modal_projector.", "model.multi_modal_projector."),
      ("language_model.model.", "model.language_model."),
      ("language_model.lm_head.", "lm_head."),
    ),
  }[naming]

  def rename(k):
    for old, new in renames:
      if k.startswith(old):
        return new + k[len(old) :]
    return k

  safetensors_io.save_file(
    {rename(k): v for k, v in saved.items()}, str(tmp_path / "model.safetensors")
  )
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  want = vlm.flat_params(nnx.state(hf.load_llava(str(path))[0]))
  got = vlm.flat_params(nnx.state(hf.load_llava(str(tmp_path))[0]))
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


def test_hf_to_npz_to_ours_keeps_transformers_logits(zoo, tmp_path):
  """HF Gemma -> ours -> big_vision npz (PaliGemma's llm/ layout) -> a per-layer model."""
  from compact_jax import checkpoints
  from compact_jax.checkpoints import big_vision
  from compact_jax.models import llm

  _, ref, _, model = zoo("gemma")
  path = str(tmp_path / "llm.npz")
  flat = {k: np.asarray(v) for k, v in vlm.flat_params(nnx.state(model)).items()}
  big_vision.export_npz(flat, path, {"": "params/llm/"})
  fresh = nnx.eval_shape(
    lambda: llm.Decoder(model.variant, model.vocab_size, scan_layers=False, rngs=nnx.Rngs(0))
  )
  checkpoints.init_from_npz(fresh, path, {"params/llm/": ""})
  ids = hm.tokens(2, seed=8)
  np.testing.assert_allclose(our_logits(fresh, ids), hm.hf_logits(ref, ids), atol=TOL, rtol=0)


def test_converter_command_writes_an_npz_that_init_from_npz_loads(llava, tmp_path, capsys):
  from compact_jax import checkpoints
  from compact_jax.checkpoints import cli

  _, path = llava
  dst = str(tmp_path / "llava.npz")
  cli.main(["hf-to-npz", "--kind=llava", f"--src={path}", f"--dst={dst}"])
  assert "llava: vit" in capsys.readouterr().out
  want, _ = hf.load_llava(str(path))
  fresh, _ = hf.load_llava(str(path))
  vlm.load_flat_params(fresh, tm.random_flat_params(fresh, seed=3))
  parts = {"params/img/": "img/", "params/connector/": "connector/", "params/llm/": "llm/"}
  checkpoints.init_from_npz(fresh, dst, parts)
  a, b = vlm.flat_params(nnx.state(want)), vlm.flat_params(nnx.state(fresh))
  for k in a:
    np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)
