"""LLaVA-1.5-7B: CLIP ViT-L/14 @ 336 (penultimate layer) + mlp2x_gelu + Vicuna-7B.

  python -m compact_jax.main --config=configs/llava15_7b.py --workdir=DIR
  python -m compact_jax.main --config=configs/llava15_7b.py:tower=siglip --workdir=DIR
  python -m compact_jax.main --config=configs/llava15_7b.py:tiny --workdir=DIR   # CPU-sized

The tower is LLaVA-1.5's own: OpenAI CLIP ViT-L/14-336 (``clip-L/14``: class
token, pre-LayerNorm, quick-GELU), features of the penultimate layer without
the class token, 24 x 24 = 576 image tokens. Its inputs are CLIP-normalised
pixels (mean 0.48145466, 0.4578275, 0.40821073; std 0.26862954, 0.26130258,
0.27577711), not SigLIP's [-1, 1]. ``:tower=siglip`` swaps in the common
replacement, SigLIP So400m/14 @ 384 (729 tokens). ``:tiny`` is a CPU-sized
model on the SigLIP smoke tower (tests/train/test_flops.py hand-counts exactly
that model); ``:tiny,tower=clip`` uses the CLIP smoke tower instead.

The LM is Vicuna (LLaMA-2 knobs: plain RMSNorm eps 1e-5, SwiGLU, untied head),
chat template Vicuna v1. LLaVA attends causally over image tokens (``model.causal_image``, set here;
``hf.load_llava`` builds its models the same way).

Checkpoints (see the README's "Model zoo" for the full recipe):
  huggingface-cli download lmsys/vicuna-7b-v1.5 --local-dir /ckpt/vicuna-7b-v1.5
  huggingface-cli download openai/clip-vit-large-patch14-336 --local-dir /ckpt/clip336 \\
      --include "*.json" "*.safetensors"
  python -m compact_jax.checkpoints.cli hf-to-npz --kind=causal_lm \\
      --src=/ckpt/vicuna-7b-v1.5 --dst=/ckpt/vicuna7b.npz
  python -m compact_jax.checkpoints.cli hf-to-npz --kind=clip \\
      --src=/ckpt/clip336 --dst=/ckpt/clip336.npz
then ``checkpoints.init_from_npz(model, path, {"params/llm/": "llm/"})`` (and
``{"params/img/": "img/"}``) before training the connector. The released
LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf``, all three parts) converts with
``hf-to-npz --kind=llava``; ``npz-to-llava`` writes one back for transformers.
(For SigLIP: ``google/siglip-so400m-patch14-384`` and ``--kind=siglip``.)
"""

from __future__ import annotations

import ml_collections

from compact_jax import configlib
from configs import base

# tower -> (vit_variant, image size): LLaVA-1.5's CLIP-L/14-336 (576 tokens) or
# SigLIP So400m/14 @ 384 (729 tokens).
TOWERS = {"clip": ("clip-L/14", 336), "siglip": ("So400m/14", 384)}
# LLaVA-1.5 pads images to a square with its processor's mean colour,
# tuple(int(x * 255) for x in image_mean): CLIP's (0.4815, 0.4578, 0.4082), SigLIP's 0.5.
PAD_FILL = {"clip": (122, 116, 104), "siglip": (127, 127, 127)}


def get_config(arg: str | None = None):
  a = configlib.parse_arg(arg, tiny=False, tower="")
  # "" = the default tower: LLaVA-1.5's CLIP, but SigLIP for :tiny (see the docstring).
  tower = a.tower or ("siglip" if a.tiny else "clip")
  if tower not in TOWERS:
    raise ValueError(f"llava15_7b: tower must be one of {sorted(TOWERS)}, got {tower!r}")
  c = base.get_config()
  c.model.vit_variant, c.data.image_size = TOWERS[tower]
  c.data.pad_fill = PAD_FILL[tower]
  c.model.vit_output_layer = -2  # LLaVA's penultimate-layer features
  c.model.connector = "mlp2x_gelu"
  c.model.llm_variant = "vicuna_7b"
  c.model.causal_image = True  # LLaVA's image tokens attend causally, as HF LLaVA runs them
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
    c.model.vit_variant = "clip-smoke/16" if tower == "clip" else "smoke/16"
    c.model.vit_output_layer = -1  # the smoke towers have one block
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
