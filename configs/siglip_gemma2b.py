"""SigLIP So400m/14 @ 224 + mlp2x_gelu + Gemma-2B (the COMPACT paper's small setting).

  python -m compact_jax.main --config=configs/siglip_gemma2b.py --workdir=DIR
  python -m compact_jax.main --config=configs/siglip_gemma2b.py:tiny --workdir=DIR

Checkpoints:
  huggingface-cli download google/gemma-2b --local-dir /ckpt/gemma-2b
  huggingface-cli download google/siglip-so400m-patch14-224 --local-dir /ckpt/so400m224
  python -m compact_jax.checkpoints.cli hf-to-npz --kind=causal_lm \\
      --src=/ckpt/gemma-2b --dst=/ckpt/gemma2b.npz
  python -m compact_jax.checkpoints.cli hf-to-npz --kind=siglip \\
      --src=/ckpt/so400m224 --dst=/ckpt/so400m224.npz
(big_vision's SigLIP npz, ``webli_en_so400m_224_*.npz``, loads directly with
``checkpoints.init_from_npz(model, path, {"params/img/": "img/"},
ignore=(r"^params/(txt|t|b)(/|$)", r"^params/img/MAPHead_0/"))``.)
"""

from __future__ import annotations

from compact_jax import configlib
from configs import base


def get_config(arg: str | None = None):
  a = configlib.parse_arg(arg, tiny=False)
  c = base.get_config()
  c.model.vit_variant = "So400m/14"
  c.data.image_size = 224
  c.model.connector = "mlp2x_gelu"
  c.model.llm_variant = "gemma_2b"
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "nothing_saveable"
  c.data.template = "gemma"
  c.build.tokenizer_file = "/ckpt/gemma-2b/tokenizer.model"
  c.train.lr = 2e-5
  c.train.param_groups = (("img/.*", None), ("(connector|llm)/.*", 1.0))
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
