"""Every default of compact_jax, in one place.

Experiment configs start from ``get_config()`` here, change what they need,
and return the result locked (``--config.key=value`` on the command line then
fails on a misspelled key). Library code reads keys directly and never calls
``config.get(key, default)``.

Durations carry their unit in the name (``total_steps``, ``log_every_steps``).
Paths are relative to the workdir unless absolute.
"""

from __future__ import annotations

import ml_collections

STAGES = ("generate", "build", "train", "eval")
# LLaVA-1.5's short-answer instruction (COMPACT appends it to the first question).
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.stages = STAGES
  c.seed = 0
  # Set by --overwrite: redo finished stages instead of skipping them.
  c.overwrite = False
  # Persistent XLA compilation cache ("" = off); reruns skip compiles.
  c.compilation_cache_dir = "~/.cache/compact_jax/xla"

  # --- generate: the tiny world (compact_jax/world) -------------------------
  c.world = ml_collections.ConfigDict()
  c.world.image_size = 64  # rendered square images, px
  c.world.grid_size = 4  # cells per side; objects sit in cells
  c.world.min_objects = 1
  c.world.max_objects = 5
  # Minimal-pair distractors the composer may add per question, so that every
  # constraint is necessary (compact_jax/world/plant.py); scenes stay <= 3/4 full.
  c.world.max_distractors = 4
  c.world.num_train_images = 4000
  c.world.num_test_images = 600
  c.world.train_k = (1, 2, 3)
  c.world.test_k = (1, 2, 3, 4, 5)
  c.world.questions_per_image = (2, 3)  # inclusive range, as COMPACT
  # Capability weights when sampling a question's k capabilities (COMPACT
  # doubles action_recognition); unnamed capabilities weigh 1.
  c.world.capability_weights = ml_collections.ConfigDict({"action_recognition": 2.0})
  # Combinations (sorted names joined by "+") never asked in train; the test
  # split asks them and reports them separately.
  c.world.heldout_combinations = (
    "color+counting+text_recognition",
    "object_interaction+shape+spatial_recognition",
  )
  # Chance that a test image whose k matches a held-out combination asks one
  # first (uniform sampling alone asks each about once per 120 k=3 questions).
  c.world.heldout_test_rate = 0.25
  # COMPACT's first human turn carries LLaVA's short-answer instruction.
  c.world.answer_suffix = SHORT_ANSWER
  c.world.max_attempts_per_question = 32
  # Processes generating images (0: this one; -1: one per core). The output does
  # not depend on it.
  c.world.num_workers = -1

  # --- build: records -> TFDS (array_record) + tokenizer --------------------
  c.build = ml_collections.ConfigDict()
  # split -> record files (JSON array, JSONL or COMPACT's concatenated arrays).
  # Empty means the generate stage's output under the workdir.
  c.build.records = ml_collections.ConfigDict({"train": (), "test": ()})
  c.build.image_roots = ()  # searched in order; empty = generate's dir
  c.build.dataset_name = "llava_records"
  c.build.skip_bad_records = False
  # Tokenizer: a sentencepiece model trained on the records' text, or an
  # existing .model file (then no training).
  c.build.tokenizer_file = ""
  c.build.tokenizer_vocab_size = 512
  c.build.tokenizer_model_type = "bpe"

  # --- data: the grain input pipeline (compact_jax/data) --------------------
  c.data = ml_collections.ConfigDict()
  c.data.template = "gemma"  # chat template, see compact_jax/data/template.py
  c.data.image_size = 64  # model input resolution (after pad-to-square)
  # Text lengths (tokens) that batches are padded to; one compile per bucket.
  c.data.seq_buckets = (64, 80, 96, 128)
  c.data.worker_count = 0  # grain multiprocessing workers; 0 = in-process
  c.data.shuffle_buffer_seed = 0

  # --- model (compact_jax/models) --------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.vit_variant = "tiny/16"  # see models/siglip.py VARIANTS
  c.model.vit_output_layer = -1  # -1 last layer, -2 penultimate (LLaVA)
  c.model.connector = "mlp2x_gelu"  # see models/connectors.py CONNECTORS
  c.model.llm_variant = "mini"  # see models/llm.py VARIANTS
  c.model.scan_layers = True
  c.model.remat_policy = "none"  # "none" or a jax.checkpoint_policies name
  c.model.dtype = "float32"  # compute dtype; params stay float32
  # Start training from a big_vision-layout npz (see compact_jax/checkpoints;
  # `python -m compact_jax.checkpoints.cli hf-to-npz` converts HF checkpoints).
  # Only params under `parts`' targets are loaded; the rest keep their init.
  c.model_init = ml_collections.ConfigDict()
  c.model_init.path = ""
  c.model_init.parts = (("params/img/", "img/"), ("params/llm/", "llm/"))
  c.model_init.ignore = ()  # regexes of npz keys to skip (e.g. "^params/txt/")

  # --- train (compact_jax/train) ---------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # global
  c.train.total_steps = 900
  c.train.lr = 1e-3
  c.train.warmup_steps = 50
  c.train.end_lr_fraction = 0.05  # cosine decays to lr * this
  c.train.weight_decay = 1e-4
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.grad_clip_norm = 1.0
  c.train.label_smoothing = 0.0
  # (regex over "img/..."/"llm/..." paths, lr multiplier or None = frozen);
  # every parameter must match exactly one pattern.
  c.train.param_groups = ((".*", 1.0),)
  c.train.log_every_steps = 50
  c.train.ckpt_every_steps = 250
  c.train.keep_checkpoints = 2

  # --- mesh and sharding (one rules table; models name logical axes only) ----
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  c.sharding_rules = (
    ("act_batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
  )

  # --- eval (compact_jax/eval) -------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"
  c.eval.batch_size = 64
  c.eval.max_new_tokens = 8
  c.eval.max_examples = -1  # -1 = all
  c.eval.prompt_buckets = (32, 64, 96, 128)
  # Every question is asked as a first turn ending in this instruction.
  c.eval.prompt_suffix = SHORT_ANSWER
  return c
