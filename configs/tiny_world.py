"""The tiny world, end to end: generate -> build -> train -> eval on a CPU.

  python -m compact_jax.main --config=configs/tiny_world.py --workdir=/tmp/tw
  python -m compact_jax.main --config=configs/tiny_world.py:smoke --workdir=/tmp/tw_smoke

Arguments (after the colon, comma-separated):
  smoke: shrink everything so all four stages finish in about a minute or two
    (tests and CI use it).
"""

from __future__ import annotations

from compact_jax import configlib
from configs import base


def get_config(arg: str | None = None):
  a = configlib.parse_arg(arg, smoke=False)
  c = base.get_config()
  # Two layers-stacks of 4 run ~25% faster unrolled on XLA:CPU than scanned; the
  # compile costs a few seconds more. Real models keep scan (configs/base.py).
  c.model.scan_layers = False
  if a.smoke:
    c.world.num_train_images = 160
    c.world.num_test_images = 60
    c.world.num_workers = 0  # ~4 s in-process; worker start-up would not pay off
    c.build.tokenizer_vocab_size = 256
    c.model.vit_variant = "smoke/16"
    c.model.llm_variant = "smoke"
    c.train.batch_size = 16
    c.train.total_steps = 30
    c.train.warmup_steps = 5
    c.train.log_every_steps = 10
    c.train.ckpt_every_steps = 15
    c.eval.batch_size = 32
    c.eval.max_examples = 64
  c.lock()
  return c
