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

import ml_collections

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
  # LLaVA-1.5's two phases (scripts/v1_5/pretrain.sh, finetune_lora.sh; see
  # ../shared/reference): `pretrain` aligns the connector on captions (558K, one
  # epoch at batch 256, lr 1e-3, plain template) with the towers frozen; `train`
  # tunes LoRA r=128 alpha=256 on every LLM projection at lr 2e-4 and the connector
  # at 2e-5, batch 128, one epoch, from the pretrain phase's params.
  c.stages = ("build", "pretrain", "train", "eval")
  c.build.records = ml_collections.ConfigDict({"train": (), "test": (), "captions": ()})
  c.pretrain.template = "plain"
  c.pretrain.batch_size = 256
  c.pretrain.total_steps = 2180  # 558K captions / 256
  c.pretrain.lr = 1e-3
  c.pretrain.warmup_steps = 65  # 3%
  c.pretrain.weight_decay = 0.0
  c.pretrain.param_groups = (("(img|llm)/.*", None), ("connector/.*", 1.0))
  # "layers" when scanned, "layers_<i>" when not.
  c.model.lora.targets = (r"llm/layers[^/]*/attn/(q|kv|attn_vec)_einsum/w$",
                          r"llm/layers[^/]*/mlp/(gating_einsum|linear)$")  # fmt: skip
  c.model.lora.rank = 128
  c.model.lora.alpha = 256.0
  c.train.init_from = "pretrain"
  c.train.batch_size = 128
  c.train.total_steps = 5200  # 665K samples / 128; COMPACT's 65K mix: ~510
  c.train.lr = 2e-4
  c.train.warmup_steps = 156  # 3%
  c.train.weight_decay = 0.0
  c.train.param_groups = (
    (base.LORA_TRAINABLE, 1.0),
    ("connector/.*", 0.1),  # 2e-5
    (r"(img|llm)/" + base.NOT_LORA, None),
  )
  if a.tiny:
    c.model.vit_variant = "smoke/16"
    c.model.vit_output_layer = -1  # smoke/16 has one block
    c.data.image_size = 64
    c.model.llm_variant = "smoke_llama"
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    c.build.tokenizer_file = ""
    c.model.lora.rank = 4
    c.model.lora.alpha = 8.0
    for phase in (c.pretrain, c.train):
      phase.batch_size = 8
      phase.total_steps = 20
      phase.warmup_steps = 2
  c.lock()
  return c
