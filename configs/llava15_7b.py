"""LLaVA-1.5-7B-style: SigLIP So400m/14 @ 384 (penultimate layer) + mlp2x_gelu + Vicuna-7B.

  python -m compact_jax.main --config=configs/llava15_7b.py --workdir=DIR
  python -m compact_jax.main --config=configs/llava15_7b.py:tiny --workdir=DIR   # CPU-sized

LLaVA-1.5 itself uses CLIP ViT-L/14-336, whose class token and pre-LayerNorm the
ViT here does not implement; SigLIP So400m/14 is the common replacement. The
LM is Vicuna (LLaMA-2 knobs: plain RMSNorm eps 1e-5, SwiGLU, untied head),
chat template Vicuna v1. LLaVA attends causally over image tokens: build the
model with ``VLM(..., causal_image=True)`` (``hf.load_llava`` does).

Checkpoints (see /work/notes/modelzoo_readme.md for the full recipe):
  huggingface-cli download lmsys/vicuna-7b-v1.5 --local-dir /ckpt/vicuna-7b-v1.5
  huggingface-cli download google/siglip-so400m-patch14-384 --local-dir /ckpt/so400m384
  python -m compact_jax.checkpoints.cli hf-to-npz --kind=causal_lm \\
      --src=/ckpt/vicuna-7b-v1.5 --dst=/ckpt/vicuna7b.npz
  python -m compact_jax.checkpoints.cli hf-to-npz --kind=siglip \\
      --src=/ckpt/so400m384 --dst=/ckpt/so400m384.npz
then ``checkpoints.init_from_npz(model, path, {"params/llm/": "llm/"})`` (and
``{"params/img/": "img/"}``) before training the connector.
"""

from __future__ import annotations

from compact_jax import configlib
from configs import base


def get_config(arg: str | None = None):
  a = configlib.parse_arg(arg, tiny=False)
  c = base.get_config()
  c.model.vit_variant = "So400m/14"
  c.data.image_size = 384
  c.model.vit_output_layer = -2  # LLaVA's penultimate-layer features
  c.model.connector = "mlp2x_gelu"
  c.model.llm_variant = "vicuna_7b"
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "nothing_saveable"
  c.data.template = "vicuna_v1"
  c.build.tokenizer_file = "/ckpt/vicuna-7b-v1.5/tokenizer.model"
  c.train.lr = 2e-5  # LLaVA-1.5 fine-tuning
  # Stage 2 of LLaVA: train connector + LLM, keep the ViT frozen.
  c.train.param_groups = (("^img/", None), (".*", 1.0))
  if a.tiny:
    c.model.vit_variant = "smoke/16"
    c.model.vit_output_layer = -1  # smoke/16 has one block
    c.data.image_size = 64
    c.model.llm_variant = "smoke_llama"
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    c.build.tokenizer_file = ""
    c.train.lr = 1e-3
  c.lock()
  return c
