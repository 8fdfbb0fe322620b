"""Tiny random Hugging Face reference models (test-only: torch + transformers).

Weights are redrawn at a scale where every knob matters (HF's default 0.02 init
makes logits nearly constant, so a wrong norm or missing bias could hide).
"""

from __future__ import annotations

import numpy as np
import torch
import transformers as T

VOCAB = 128
SEQ = 10  # > the Gemma 2 sliding window below, so local layers really differ


def randomize(model: torch.nn.Module, seed: int, plain_norm: bool) -> torch.nn.Module:
  """Normal weights; norm gains near 1 for plain norms and LayerNorms, near 0 for Gemma's
  zero-centred ones (``plain_norm`` False)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
      is_norm = "norm" in name and p.ndim == 1
      if is_norm and name.endswith("weight"):
        p.copy_((1.0 if plain_norm else 0.0) + 0.1 * noise)
      else:
        p.copy_(0.2 * noise)
  return model.eval()


def gemma_config() -> T.GemmaConfig:
  # MQA (1 kv head) and head_dim 16 != D / N = 8.
  return T.GemmaConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
  )


def gemma2_config() -> T.Gemma2Config:
  # GQA with 2 kv heads for 4 query heads; query scale 24 != head_dim.
  return T.Gemma2Config(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    sliding_window=4,
    attn_logit_softcapping=5.0,
    final_logit_softcapping=3.0,
    attn_implementation="eager",
  )


def llama_config() -> T.LlamaConfig:
  # LLaMA-3.1-style: GQA 6/2, RoPE base 500k with llama3 scaling, untied head, eps 1e-5.
  return T.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_parameters={
      "rope_type": "llama3",
      "rope_theta": 500000.0,
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 4,
    },
  )


def qwen2_config() -> T.Qwen2Config:
  # q/k/v biases, tied head, RoPE base 1e6.
  return T.Qwen2Config(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
  )


CAUSAL_LMS = {
  "gemma": (gemma_config, T.GemmaForCausalLM, False),
  "gemma2": (gemma2_config, T.Gemma2ForCausalLM, False),
  "llama": (llama_config, T.LlamaForCausalLM, True),
  "qwen2": (qwen2_config, T.Qwen2ForCausalLM, True),
}


def causal_lm(family: str, seed: int = 0) -> torch.nn.Module:
  make_config, cls, plain = CAUSAL_LMS[family]
  torch.manual_seed(seed)
  return randomize(cls(make_config()), seed, plain)


def siglip_vision_config(use_head: bool = True) -> T.SiglipVisionConfig:
  return T.SiglipVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=8,
    vision_use_head=use_head,
  )


def clip_vision_config(depth: int = 2) -> T.CLIPVisionConfig:
  # HF defaults for the family knobs: quick_gelu, layer_norm_eps 1e-5, no patch bias.
  return T.CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=depth,
    num_attention_heads=2,
    image_size=16,
    patch_size=8,
  )


# LLaVA tower -> (vision config, vision_feature_select_strategy): CLIP's "default"
# drops the class token, SigLIP (none to drop) needs "full".
LLAVA_TOWERS = {
  "siglip": (lambda: siglip_vision_config(use_head=False), "full"),
  "clip": (clip_vision_config, "default"),
}


def llava(seed: int = 0, tower: str = "siglip") -> torch.nn.Module:
  text = T.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
  )
  vision, strategy = LLAVA_TOWERS[tower]
  cfg = T.LlavaConfig(
    vision_config=vision(),
    text_config=text,
    image_token_index=VOCAB - 1,
    vision_feature_select_strategy=strategy,
    vision_feature_layer=-2,
    projector_hidden_act="gelu",
  )
  torch.manual_seed(seed)
  return randomize(T.LlavaForConditionalGeneration(cfg), seed, plain_norm=True)


# OpenAI CLIP's processor statistics, typed here independently of compact_jax.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def clip_pixels(images: np.ndarray) -> np.ndarray:
  """Our [-1, 1] images -> what ``CLIPImageProcessor`` feeds HF CLIP (same layout)."""
  return (((images + 1) / 2 - CLIP_MEAN) / CLIP_STD).astype(np.float32)


def llava_logits(model: torch.nn.Module, ids: np.ndarray, images: np.ndarray) -> np.ndarray:
  """HF logits float32[B, S, V]; ``images`` float32[B, H, W, 3] in our [-1, 1]
  range, renormalised for a CLIP tower as its processor would."""
  if model.config.vision_config.model_type == "clip_vision_model":
    images = clip_pixels(images)
  with torch.no_grad():
    return model(
      input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(images.transpose(0, 3, 1, 2))
    ).logits.numpy()


def tokens(batch: int, seed: int = 0, high: int = VOCAB - 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, high, (batch, SEQ)).astype(np.int64)


def hf_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids)).logits.float().numpy()
