"""Hugging Face safetensors import and export for the decoder LMs, SigLIP, CLIP and LLaVA.

Families: ``GemmaForCausalLM``, ``Gemma2ForCausalLM``, ``LlamaForCausalLM``
(LLaMA-2/Vicuna, LLaMA-3), ``Qwen2ForCausalLM``, ``SiglipVisionModel``,
``CLIPVisionModel`` (or a ``CLIPModel``'s vision half) and
``LlavaForConditionalGeneration`` (SigLIP or CLIP tower + mlp2x projector + any
of the LMs; imported with ``load_llava``, written with ``export_llava``). A
checkpoint is a directory with ``config.json`` and either
``model.safetensors`` or a sharded ``model.safetensors.index.json``. Only
safetensors are read: torch pickles (``*.bin``) are refused. No torch or
transformers import happens here.

Typical use::

  model = hf.load_causal_lm("/ckpt/gemma-2b")            # a models.llm.Decoder
  hf.export_causal_lm(model, "gemma", "/out/gemma-2b")   # back to HF
  vlm_model, info = hf.load_llava("/ckpt/llava-1.5-7b-hf")
  hf.export_llava(vlm_model, "llama", "/out/llava", image_token_index=32000)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from compact_jax.checkpoints import convert, safetensors_io, tables
from compact_jax.models import llm, siglip, vlm

# architectures[0] -> family in tables.FAMILIES
ARCHITECTURES: dict[str, str] = {
  "GemmaForCausalLM": "gemma",
  "Gemma2ForCausalLM": "gemma2",
  "LlamaForCausalLM": "llama",
  "Qwen2ForCausalLM": "qwen2",
}
FAMILY_ARCH = {family: arch for arch, family in ARCHITECTURES.items()}
# Non-parameter buffers some exporters write.
IGNORE = (r"rotary_emb\.inv_freq$",)
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "silu": "silu"}


def read_config(path: str) -> dict[str, Any]:
  """``config.json`` of a checkpoint directory."""
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face checkpoint dir?)")
  with open(file) as f:
    return json.load(f)


def open_weights(path: str) -> safetensors_io.SafetensorsCheckpoint:
  """The safetensors weights of ``path``; refuses directories with only torch pickles."""
  has_st = any(f.endswith((".safetensors", ".safetensors.index.json")) for f in os.listdir(path))
  if not has_st and any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
    raise ValueError(
      f"{path}: only torch pickle weights found; convert them to safetensors first "
      "(compact_jax never unpickles)"
    )
  return safetensors_io.SafetensorsCheckpoint(path)


def _rope(cfg: Mapping[str, Any]) -> tuple[float, llm.RopeScaling | None]:
  """Reads both transformers 5 ``rope_parameters`` and legacy ``rope_theta``/``rope_scaling``."""
  params = dict(cfg.get("rope_parameters") or {})
  legacy = dict(cfg.get("rope_scaling") or {})
  base = float(params.get("rope_theta", cfg.get("rope_theta", llm.ROPE_MAX_WAVELENGTH)))
  spec = params if params.get("rope_type", "default") != "default" else legacy
  kind = spec.get("rope_type", spec.get("type", "default"))
  if kind == "default":
    return base, None
  if kind == "linear":
    return base, llm.RopeScaling("linear", float(spec["factor"]))
  if kind == "llama3":
    return base, llm.RopeScaling(
      "llama3",
      float(spec["factor"]),
      float(spec["low_freq_factor"]),
      float(spec["high_freq_factor"]),
      int(spec["original_max_position_embeddings"]),
    )
  raise ValueError(f"config.json: unsupported RoPE type {kind!r} (known: default, linear, llama3)")


def llm_from_config(cfg: Mapping[str, Any]) -> tuple[str, llm.LLMVariant, int]:
  """HF text ``config.json`` -> (family, ``LLMVariant``, vocab size)."""
  arch = (cfg.get("architectures") or [None])[0]
  family = ARCHITECTURES.get(arch) or {
    "gemma": "gemma",
    "gemma2": "gemma2",
    "llama": "llama",
    "qwen2": "qwen2",
  }.get(cfg.get("model_type"))
  if family is None:
    raise ValueError(
      f"config.json: unsupported architecture {arch!r} / model_type {cfg.get('model_type')!r}; "
      f"known: {sorted(ARCHITECTURES)}"
    )
  d, n = cfg["hidden_size"], cfg["num_attention_heads"]
  act = cfg.get("hidden_activation") or cfg.get("hidden_act")
  if family in ("gemma", "gemma2"):
    act = "gelu_pytorch_tanh"  # HF forces the tanh GELU for Gemma whatever "hidden_act" says
  if act not in _ACTS:
    raise ValueError(f"config.json: unsupported activation {act!r}; known: {sorted(_ACTS)}")
  base, scaling = _rope(cfg)
  gemma = family in ("gemma", "gemma2")
  window = None
  if family == "gemma2":
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    depth = cfg["num_hidden_layers"]
    want = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(depth)]
    if types is not None and list(types) != want:
      raise ValueError(f"config.json: layer_types {types} is not Gemma 2's alternation {want}")
  if family == "qwen2" and cfg.get("use_sliding_window"):
    raise ValueError("config.json: Qwen2 use_sliding_window=true is not supported")
  variant = llm.LLMVariant(
    width=d,
    depth=cfg["num_hidden_layers"],
    num_heads=n,
    num_kv_heads=cfg.get("num_key_value_heads") or n,
    head_dim=cfg.get("head_dim") or d // n,
    mlp_dim=cfg["intermediate_size"],
    vocab_size=cfg["vocab_size"],
    norm="zero_centred" if gemma else "plain",
    norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
    rope_base=base,
    rope_scaling=scaling,
    qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
    mlp_act=_ACTS[act],
    tie_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
    scale_embeddings=gemma,
    query_scale=cfg.get("query_pre_attn_scalar") if family == "gemma2" else None,
    attn_softcap=cfg.get("attn_logit_softcapping") if family == "gemma2" else None,
    final_softcap=cfg.get("final_logit_softcapping") if family == "gemma2" else None,
    post_norms=family == "gemma2",
    sliding_window=window,
  )
  if family in ("llama", "qwen2") and cfg.get("mlp_bias"):
    raise ValueError("config.json: mlp_bias=true is not supported")
  return family, variant, cfg["vocab_size"]


def config_from_llm(family: str, v: llm.LLMVariant, vocab_size: int) -> dict[str, Any]:
  """The HF ``config.json`` for a decoder (inverse of ``llm_from_config``)."""
  if family not in FAMILY_ARCH:
    raise ValueError(f"Unknown LLM family {family!r}; known: {sorted(FAMILY_ARCH)}")
  gemma = family in ("gemma", "gemma2")
  if gemma != (v.norm == "zero_centred") or gemma != v.scale_embeddings:
    raise ValueError(f"variant's norm/embedding scaling do not match HF family {family!r}")
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": v.rope_base}
  if v.rope_scaling is not None:
    s = v.rope_scaling
    rope.update(rope_type=s.kind, factor=s.factor)
    if s.kind == "llama3":
      rope.update(
        low_freq_factor=s.low_freq_factor,
        high_freq_factor=s.high_freq_factor,
        original_max_position_embeddings=s.original_max_len,
      )
  cfg: dict[str, Any] = {
    "architectures": [FAMILY_ARCH[family]],
    "model_type": family,
    "vocab_size": vocab_size,
    "hidden_size": v.width,
    "intermediate_size": v.mlp_dim,
    "num_hidden_layers": v.depth,
    "num_attention_heads": v.num_heads,
    "num_key_value_heads": v.num_kv_heads,
    "head_dim": v.head_dim,
    "hidden_act": "gelu_pytorch_tanh" if v.mlp_act == "gelu_tanh" else "silu",
    "rms_norm_eps": v.norm_eps,
    "rope_parameters": rope,
    "tie_word_embeddings": v.tie_embeddings,
    "torch_dtype": "float32",
  }
  if gemma:
    cfg["hidden_activation"] = cfg["hidden_act"]
  if family == "llama":
    cfg["attention_bias"] = v.qkv_bias
  elif v.qkv_bias != (family == "qwen2"):
    raise ValueError(f"family {family!r} cannot express qkv_bias={v.qkv_bias}")
  if family == "gemma2":
    cfg.update(
      query_pre_attn_scalar=v.query_scale or v.head_dim,
      attn_logit_softcapping=v.attn_softcap,
      final_logit_softcapping=v.final_softcap,
      sliding_window=v.sliding_window,
      layer_types=[
        "sliding_attention" if v.is_local(i) else "full_attention" for i in range(v.depth)
      ],
    )
  return cfg


def siglip_from_config(cfg: Mapping[str, Any]) -> tuple[siglip.ViTVariant, int]:
  """HF ``SiglipVisionConfig`` dict (or a ``SiglipConfig`` with ``vision_config``) -> (variant, image size)."""
  cfg = cfg.get("vision_config", cfg)
  act = cfg.get("hidden_act", "gelu_pytorch_tanh")
  if act != "gelu_pytorch_tanh":
    raise ValueError(f"config.json: SigLIP hidden_act {act!r} unsupported (need gelu_pytorch_tanh)")
  return _vit_variant(cfg), cfg["image_size"]


def clip_from_config(cfg: Mapping[str, Any]) -> tuple[siglip.ViTVariant, int]:
  """HF ``CLIPVisionConfig`` dict (or a ``CLIPConfig`` with ``vision_config``) ->
  (variant, image size)."""
  cfg = cfg.get("vision_config", cfg)
  act = cfg.get("hidden_act", "quick_gelu")
  if act != "quick_gelu":
    raise ValueError(f"config.json: CLIP hidden_act {act!r} unsupported (need quick_gelu)")
  if cfg.get("num_channels", 3) != 3:
    raise ValueError(f"config.json: CLIP num_channels {cfg['num_channels']} unsupported (need 3)")
  family = dict(siglip.CLIP, norm_eps=float(cfg.get("layer_norm_eps", 1e-5)))
  return _vit_variant(cfg, **family), cfg["image_size"]


def _vit_variant(cfg: Mapping[str, Any], **family: Any) -> siglip.ViTVariant:
  """The sizes every HF ViT config names, plus a family's knobs (``siglip.CLIP``)."""
  return siglip.ViTVariant(
    cfg["hidden_size"],
    cfg["num_hidden_layers"],
    cfg["intermediate_size"],
    cfg["num_attention_heads"],
    cfg["patch_size"],
    **family,
  )


# HF vision ``model_type`` -> its config reader.
VISION_CONFIGS = {"siglip_vision_model": siglip_from_config, "clip_vision_model": clip_from_config}


def vision_from_config(cfg: Mapping[str, Any]) -> tuple[siglip.ViTVariant, int]:
  """A LLaVA ``vision_config`` (SigLIP or CLIP, by ``model_type``) -> (variant, image size)."""
  kind = cfg.get("model_type", "siglip_vision_model")
  if kind not in VISION_CONFIGS:
    raise ValueError(
      f"config.json: vision tower {kind!r} unsupported; known: {sorted(VISION_CONFIGS)}"
    )
  return VISION_CONFIGS[kind](cfg)


def config_from_vit(v: siglip.ViTVariant, image_size: int) -> dict[str, Any]:
  """The HF vision config (``SiglipVisionConfig`` or ``CLIPVisionConfig``) of a tower."""
  cfg: dict[str, Any] = {
    "hidden_size": v.width,
    "intermediate_size": v.mlp_dim,
    "num_hidden_layers": v.depth,
    "num_attention_heads": v.num_heads,
    "patch_size": v.patch_size,
    "image_size": image_size,
    "num_channels": 3,
    "layer_norm_eps": v.norm_eps,
    "attention_dropout": 0.0,
  }
  # Only the two families' exact knob sets exist in HF (e.g. no biased CLIP patch
  # conv); the LayerNorm eps is a config field in both.
  for knobs, extra in (
    (siglip.CLIP, {"model_type": "clip_vision_model", "hidden_act": "quick_gelu"}),
    (
      siglip.FAMILIES["siglip"],
      # VLMs use the per-patch tokens; HF would otherwise build (and init) a MAP head.
      {
        "model_type": "siglip_vision_model",
        "hidden_act": "gelu_pytorch_tanh",
        "vision_use_head": False,
      },
    ),
  ):
    base = siglip.ViTVariant(v.width, v.depth, v.mlp_dim, v.num_heads, v.patch_size, **knobs)
    if v == dataclasses.replace(base, norm_eps=v.norm_eps):
      return cfg | extra
  raise ValueError(f"ViT variant {v} has no Hugging Face equivalent (neither SigLIP nor CLIP)")


def _expected(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  return vlm.param_paths(nnx.state(model))


def load_causal_lm(
  path: str, *, scan_layers: bool = True, dtype: str = "float32", remat_policy: str = "none"
) -> llm.Decoder:
  """A ``Decoder`` with the weights of an HF ``*ForCausalLM`` checkpoint directory."""
  family, variant, vocab = llm_from_config(read_config(path))
  model = nnx.eval_shape(
    lambda: llm.Decoder(
      variant,
      vocab,
      scan_layers=scan_layers,
      dtype=dtype,
      remat_policy=remat_policy,
      rngs=nnx.Rngs(0),
    )
  )
  ignore = IGNORE + ((r"^lm_head\.weight$",) if variant.tie_embeddings else ())
  flat = convert.import_tensors(
    open_weights(path),
    tables.causal_lm_sections(family, variant),
    _expected(model),
    ignore=ignore,
    what=path,
  )
  vlm.load_flat_params(model, flat)
  return model


def export_causal_lm(
  model: llm.Decoder,
  family: str,
  out_dir: str,
  *,
  dtype: Any = np.float32,
  max_shard_bytes: int | None = None,
) -> None:
  """Writes ``model`` as an HF checkpoint: safetensors (sharded if ``max_shard_bytes``) + config.json."""
  v = model.variant
  flat = {k: np.asarray(x) for k, x in vlm.flat_params(nnx.state(model)).items()}
  tensors = convert.export_tensors(flat, tables.causal_lm_sections(family, v), dtype=dtype)
  _write(tensors, out_dir, config_from_llm(family, v, model.vocab_size), max_shard_bytes)


def _write(tensors, out_dir, config, max_shard_bytes) -> None:
  os.makedirs(out_dir, exist_ok=True)
  first = next(iter(tensors.values()))
  config["torch_dtype"] = config["dtype"] = (
    "bfloat16" if first.dtype.name == "bfloat16" else "float32"
  )
  if max_shard_bytes is None:
    safetensors_io.save_file(tensors, os.path.join(out_dir, safetensors_io.SINGLE_FILE))
  else:
    safetensors_io.save_sharded(tensors, out_dir, max_shard_bytes=max_shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=1)


def _load_vit(
  path: str,
  variant: siglip.ViTVariant,
  size: int,
  sections: list[tables.Section],
  ignore: tuple[str, ...],
  *,
  image_size: int | None,
  **vit_kw: Any,
) -> siglip.ViT:
  """Imports a vision tower; ``image_size`` != ``size`` resamples the patch position
  embeddings (``siglip.resample_posemb``; a class token's position is kept)."""
  image_size = image_size or size

  def build(px: int) -> siglip.ViT:
    return nnx.eval_shape(lambda: siglip.ViT(variant, image_size=px, rngs=nnx.Rngs(0), **vit_kw))

  flat = convert.import_tensors(
    open_weights(path), sections, _expected(build(size)), ignore=ignore, what=path
  )
  model = build(image_size)
  if image_size != size:
    grid = image_size // variant.patch_size
    c = int(variant.class_token)
    pe = flat["pos_embedding"]
    flat["pos_embedding"] = np.concatenate(
      [pe[:, :c], siglip.resample_posemb(pe[:, c:], grid)], axis=1
    )
  vlm.load_flat_params(model, flat)
  return model


def load_siglip_vision(
  path: str,
  *,
  output_layer: int = -1,
  pool_type: str = "none",
  scan_layers: bool = True,
  dtype: str = "float32",
  image_size: int | None = None,
) -> siglip.ViT:
  """A ``ViT`` with the weights of an HF ``SiglipVisionModel`` directory.

  ``pool_type="map"`` also loads the MAP head (``head.*``); otherwise it is
  skipped (VLMs use the per-patch features). An ``image_size`` other than the
  checkpoint's resamples the position embeddings (``siglip.resample_posemb``).
  """
  variant, size = siglip_from_config(read_config(path))
  return _load_vit(
    path,
    variant,
    size,
    tables.siglip_sections(variant, map_head=pool_type == "map"),
    () if pool_type == "map" else (tables.SIGLIP_HEAD,),
    image_size=image_size,
    output_layer=output_layer,
    pool_type=pool_type,
    scan_layers=scan_layers,
    dtype=dtype,
  )


def load_clip_vision(
  path: str,
  *,
  output_layer: int = -1,
  pool_type: str = "none",
  scan_layers: bool = True,
  dtype: str = "float32",
  image_size: int | None = None,
) -> siglip.ViT:
  """A CLIP ``ViT`` from an HF ``CLIPVisionModel`` or ``CLIPModel`` directory
  (OpenAI's ``openai/clip-vit-large-patch14-336``; the text tower is skipped).

  ``output_layer=-n`` (n >= 2) gives HF's ``hidden_states[-n]`` without the class
  token; -1 is the last block after ``post_layernorm`` (HF applies that norm to
  the class token only: ``pool_type="tok"`` returns it as ``aux["pooled"]``, HF's
  ``pooler_output``). Inputs are CLIP-normalised pixels, not SigLIP's [-1, 1].
  An ``image_size`` other than the checkpoint's resamples the patch position
  embeddings bilinearly (HF's ``interpolate_pos_encoding`` is bicubic).
  """
  variant, size = clip_from_config(read_config(path))
  return _load_vit(
    path,
    variant,
    size,
    tables.clip_sections(variant),
    tables.CLIP_IGNORE,
    image_size=image_size,
    output_layer=output_layer,
    pool_type=pool_type,
    scan_layers=scan_layers,
    dtype=dtype,
  )


# LLaVA's vision_feature_select_strategy per tower family: "default" drops CLIP's
# class token (as ``siglip.ViT`` does); SigLIP has none, so its LLaVAs use "full".
SELECT_STRATEGY = {"clip": "default", "siglip": "full"}
# A SigLIP tower's MAP head (never used by LLaVA) and CLIP's old position_ids buffer.
_LLAVA_IGNORE = (
  *IGNORE,
  tables.SIGLIP_HEAD,
  r"(?:^|\.)vision_tower\.(?:vision_model\.)?head\.",
  tables.CLIP_IGNORE[1],
)


def load_llava(
  path: str, *, scan_layers: bool = True, dtype: str = "float32"
) -> tuple[vlm.VLM, dict[str, Any]]:
  """A ``VLM`` (causal image attention, LLaVA's feature layer) from an HF
  ``LlavaForConditionalGeneration`` directory with a SigLIP or CLIP tower and
  the mlp2x projector (e.g. ``llava-hf/llava-1.5-7b-hf``: CLIP-L/14-336, layer -2).

  Returns (model, info) with info "image_token_index" (the placeholder id in
  HF's vocabulary) and "family".
  """
  cfg = read_config(path)
  vcfg, tcfg = cfg["vision_config"], cfg["text_config"]
  vit_v, size = vision_from_config(vcfg)
  if cfg.get("projector_hidden_act", "gelu") != "gelu":
    raise ValueError(f"{path}: projector_hidden_act must be 'gelu' (mlp2x_gelu)")
  if not cfg.get("multimodal_projector_bias", True):
    raise ValueError(f"{path}: multimodal_projector_bias=false unsupported (mlp2x has biases)")
  strategy = cfg.get("vision_feature_select_strategy", "default")
  if strategy != SELECT_STRATEGY[vit_v.family]:
    raise ValueError(
      f"{path}: vision_feature_select_strategy {strategy!r} unsupported for a "
      f"{vit_v.family} tower (need {SELECT_STRATEGY[vit_v.family]!r}: the patches only)"
    )
  layer = cfg.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise ValueError(f"{path}: multi-layer vision_feature_layer {layer} unsupported")
  family, llm_v, vocab = llm_from_config(tcfg)
  # HF's hidden_states[-n] is our output_layer -n (see siglip.Encoder); -1 in HF
  # would be the raw last block, which only differs from ours by post_layernorm.
  if layer == -1:
    raise ValueError(f"{path}: vision_feature_layer=-1 (pre post_layernorm) unsupported")
  model = nnx.eval_shape(
    lambda: vlm.VLM(
      vit_v,
      "mlp2x_gelu",
      llm_v,
      vocab,
      vit_output_layer=layer,
      image_size=size,
      scan_layers=scan_layers,
      dtype=dtype,
      causal_image=True,
      rngs=nnx.Rngs(0),
    )
  )
  flat = convert.import_tensors(
    open_weights(path),
    tables.llava_sections(vit_v, family, llm_v),
    _expected(model),
    ignore=_LLAVA_IGNORE,
    what=path,
  )
  vlm.load_flat_params(model, flat)
  return model, {
    "image_token_index": cfg.get("image_token_index", cfg.get("image_token_id")),
    "family": family,
  }


def llava_config(model: vlm.VLM, family: str, *, image_token_index: int) -> dict[str, Any]:
  """The ``LlavaConfig`` dict of ``model`` (inverse of what ``load_llava`` reads).

  Raises ValueError for a model HF's LLaVA computes differently: a connector other
  than mlp2x_gelu, the last-layer features (HF's -1 skips ``post_layernorm``), a
  full-attention image prefix (HF's LM is causal), or a placeholder id outside the
  vocabulary.
  """
  vit = model.img
  names = set(vlm.param_paths(nnx.state(model)))
  if vit.head is not None or {k for k in names if k.startswith("connector/")} != {
    f"connector/Dense_{i}/{p}" for i in (0, 1) for p in ("kernel", "bias")
  }:
    raise ValueError("export_llava: LLaVA needs the mlp2x_gelu connector")
  layer = vit.Transformer.output_layer
  if layer == -1:
    raise ValueError(
      "export_llava: vit output_layer=-1 includes encoder_norm, which HF LLaVA's "
      "vision_feature_layer=-1 does not apply; use a model with output_layer <= -2"
    )
  if not model.causal_image:
    raise ValueError(
      "export_llava: the model attends over its image tokens as a full-attention prefix "
      "(causal_image=False), HF LLaVA causally; build it with VLM(..., causal_image=True)"
    )
  vocab = model.llm.vocab_size
  if not 0 <= image_token_index < vocab:
    raise ValueError(f"export_llava: image_token_index {image_token_index} not in [0, {vocab})")
  text = config_from_llm(family, model.llm.variant, vocab)
  return {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "vision_config": config_from_vit(vit.variant, vit.image_size),
    "text_config": text,
    "image_token_index": image_token_index,
    "image_seq_length": model.num_image_tokens,
    "projector_hidden_act": "gelu",
    "multimodal_projector_bias": True,
    "vision_feature_layer": layer,
    "vision_feature_select_strategy": SELECT_STRATEGY[vit.variant.family],
    "tie_word_embeddings": text["tie_word_embeddings"],
  }


def export_llava(
  model: vlm.VLM,
  family: str,
  out_dir: str,
  *,
  image_token_index: int,
  dtype: Any = np.float32,
  max_shard_bytes: int | None = None,
) -> None:
  """Writes ``model`` as an HF ``LlavaForConditionalGeneration`` directory
  (safetensors + config.json) that ``from_pretrained`` loads.

  ``family`` names the LM's HF family (``tables.FAMILIES``); merge LoRA adapters
  first (``lora.merge_lora``): an unmerged adapter is an error naming it. Token
  ids: HF LLaVA replaces every ``image_token_index`` in ``input_ids`` with the
  image features, so prompts put ``model.num_image_tokens`` of them first.
  """
  config = llava_config(model, family, image_token_index=image_token_index)
  flat = {k: np.asarray(x) for k, x in vlm.flat_params(nnx.state(model)).items()}
  sections = tables.llava_sections(model.img.variant, family, model.llm.variant)
  tensors = convert.export_tensors(flat, sections, dtype=dtype)
  _write(tensors, out_dir, config, max_shard_bytes)
  with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
    json.dump(image_processor_config(model.img.variant, model.img.image_size), f, indent=1)


def image_processor_config(variant: siglip.ViTVariant, image_size: int) -> dict[str, Any]:
  """``preprocessor_config.json`` for the tower, so ``AutoImageProcessor.from_pretrained``
  turns a square image into the pixels our pipeline feeds it (bicubic resize to
  ``image_size``, then the tower's normalisation). Like llava-hf's processors it does not
  pad to a square first, as LLaVA-1.5's training code (and ``data.pad_fill``) does: pad
  non-square images before calling it."""
  # The tower's own normalisation of its [-1, 1] input (CLIP's mean/std), else [-1, 1]
  # itself: mean = std = 0.5 (SigLIP, big_vision's value_range(-1, 1)).
  mean, std = variant.pixel_norm or ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
  common = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
            "do_convert_rgb": True}  # fmt: skip
  if variant.family == "clip":
    return {
      "image_processor_type": "CLIPImageProcessor",
      **common,
      "size": {"shortest_edge": image_size},
      "do_center_crop": True,
      "crop_size": {"height": image_size, "width": image_size},
    }
  return {
    "image_processor_type": "SiglipImageProcessor",
    **common,
    "size": {"height": image_size, "width": image_size},
  }
