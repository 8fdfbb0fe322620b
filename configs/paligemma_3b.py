"""PaliGemma-3B: SigLIP So400m/14 @ 224 + linear (``img/head``) + Gemma-2B, prefix-LM.

  python -m compact_jax.main --config=configs/paligemma_3b.py --workdir=DIR
  python -m compact_jax.main --config=configs/paligemma_3b.py:tiny --workdir=DIR

Checkpoints: big_vision's PaliGemma npz (Kaggle ``google/paligemma``, e.g.
``pt_224.npz``; the ``*.bf16.npz`` files too) loads by name, scanned layers
and all: ``checkpoints.init_from_npz(model, "pt_224.npz",
{"params/img/": "img/", "params/llm/": "llm/"})``. Its vocabulary is 257152
(Gemma's 256000 + 1024 ``<loc>`` + 128 ``<seg>``), so ``build.tokenizer_file``
must be PaliGemma's sentencepiece model and the table sizes must agree.
"""

from __future__ import annotations

from compact_jax import configlib
from configs import base


def get_config(arg: str | None = None):
  a = configlib.parse_arg(arg, tiny=False)
  c = base.get_config()
  c.model.vit_variant = "So400m/14"
  c.data.image_size = 224
  c.model.connector = "linear"
  c.model.llm_variant = "gemma_2b"
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "nothing_saveable"
  c.data.template = "gemma"
  c.build.tokenizer_file = "/ckpt/paligemma/paligemma_tokenizer.model"
  c.train.lr = 1e-5
  if a.tiny:
    c.model.vit_variant = "smoke/16"
    c.data.image_size = 64
    c.model.llm_variant = "smoke"
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    c.build.tokenizer_file = ""
    c.train.lr = 1e-3
  c.lock()
  return c
