"""The tiny world, end to end: generate -> build -> train -> eval on a CPU.

  python -m compact_jax.main --config=configs/tiny_world.py --workdir=/tmp/tw
  python -m compact_jax.main --config=configs/tiny_world.py:smoke --workdir=/tmp/tw_smoke

Arguments (after the colon, comma-separated):
  smoke: shrink everything so all four stages finish in about a minute or two
    (tests and CI use it).
"""

from __future__ import annotations

import ml_collections

from compact_jax import configlib
from configs import base


def get_config(arg: str | None = None):
  a = configlib.parse_arg(arg, smoke=False)
  c = base.get_config()
  # Two layers-stacks of 4 run ~25% faster unrolled on XLA:CPU than scanned; the
  # compile costs a few seconds more. Real models keep scan (configs/base.py).
  c.model.scan_layers = False
  # Three steps, as a real run has them: a pretrained vision tower (here trained
  # on the train scenes' dense cell labels, world/vision.py, the stand-in for
  # SigLIP), LLaVA's caption stage (`pretrain`: one dense caption per train
  # image, world/caption.py), then the COMPACT question mix from those weights.
  # The tower stays frozen afterwards, as LLaVA keeps its SigLIP/CLIP frozen: trained
  # on with the caption and question losses from a random decoder, its per-cell
  # features washed out (k=1 0.56 trained on vs 0.80 frozen, README "Measured").
  c.stages = ("generate", "build", "vision", "pretrain", "train", "eval")
  frozen_tower = ((base.VISION_TOWER, None), (base.NOT_VISION_TOWER, 1.0))
  c.pretrain.param_groups = frozen_tower
  c.train.param_groups = frozen_tower
  c.build.records = ml_collections.ConfigDict({"train": (), "test": (), "captions": ()})
  c.model_init.path = "vision/img.npz"
  c.model_init.parts = (("params/img/", "img/"),)
  c.pretrain.total_steps = 400
  c.train.init_from = "pretrain"
  c.train.total_steps = 500
  if a.smoke:
    c.world.num_train_images = 160
    c.world.num_test_images = 60
    c.world.num_workers = 0  # ~4 s in-process; worker start-up would not pay off
    c.build.tokenizer_vocab_size = 256
    c.model.vit_variant = "smoke/16"
    c.model.llm_variant = "smoke"
    c.vision.total_steps = 20
    c.vision.batch_size = 16
    c.vision.log_every_steps = 10
    c.vision.eval_images = 60
    for phase in (c.pretrain, c.train):
      phase.batch_size = 16
      phase.total_steps = 30
      phase.warmup_steps = 5
      phase.log_every_steps = 10
      phase.ckpt_every_steps = 15
    c.eval.batch_size = 32
    c.eval.max_examples = 64
  c.lock()
  return c
