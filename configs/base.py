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
# param_groups patterns (fullmatched): LoRA adapters, and everything else.
LORA_TRAINABLE = r".*_lora_[ab]"
NOT_LORA = r".*(?<!_lora_a)(?<!_lora_b)"
# The vision tower, and everything else (freezing a pretrained tower, as LLaVA does).
VISION_TOWER = r"img/.*"
NOT_VISION_TOWER = r"(?!img/).*"
# LLaVA-1.5's short-answer instruction (COMPACT appends it to the first question).
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def train_phase() -> ml_collections.ConfigDict:
  """The defaults of one training phase (``config.train``, ``config.pretrain``)."""
  t = ml_collections.ConfigDict()
  t.split = "train"  # built split to train on
  t.template = ""  # chat template of this phase ("" = data.template), e.g. "plain" for captions
  # Phase whose final params initialise this one ("" = random init, then
  # config.model_init); its optimizer state is not carried over.
  t.init_from = ""
  t.batch_size = 32  # global
  t.total_steps = 900
  t.lr = 1e-3
  t.warmup_steps = 50
  t.end_lr_fraction = 0.05  # cosine decays to lr * this
  t.weight_decay = 1e-4
  t.b1 = 0.9
  t.b2 = 0.98
  t.grad_clip_norm = 1.0
  t.label_smoothing = 0.0
  # (regex over "img/..."/"llm/..." paths, lr multiplier or None = frozen);
  # every parameter must match exactly one pattern.
  t.param_groups = ((".*", 1.0),)
  t.log_every_steps = 50
  t.ckpt_every_steps = 250
  t.keep_checkpoints = 2
  # Raise (instead of logging an error) when a shape compiles twice; tests set it.
  t.fail_on_recompile = False
  # Microbatches the global batch is split into inside the jitted step (lax.scan):
  # activation memory drops by this factor; the loss stays the per-token mean over
  # the whole global batch, so the update equals the unaccumulated one.
  t.accum_steps = 1
  # On a non-finite loss or gradient norm: "halt" raises, naming the step and the last
  # good checkpoint; "skip" keeps params and optimizer state unchanged for that step
  # (selected inside the jitted step) and counts skipped steps in the metrics.
  t.nonfinite = "halt"
  # Dense bf16 peak FLOP/s of ONE device, for the logged MFU. 0 = look the device kind
  # up in train/flops.py PEAK_FLOPS; unknown there (e.g. CPU) -> log TFLOP/s only.
  t.peak_flops_per_device = 0.0
  # Besides the latest keep_checkpoints, keep the keep_best checkpoints with the best
  # value of this metric ("" = off): a training metric averaged since the previous
  # checkpoint ("loss", "token_accuracy") or an eval-hook metric ("eval/accuracy").
  t.best_metric = ""
  t.best_mode = "min"  # "min" or "max"
  t.keep_best = 1
  # When the phase finishes, also write <phase>/trainable_params.npz holding only the
  # trained params (the LoRA adapters, a trained connector); resume checkpoints stay
  # complete.
  t.save_adapters_only = False
  # Every this many steps (0 = off) run the eval stage's tiny-world accuracy on the
  # first eval_examples questions of config.eval.split; metrics go to the same logs.
  t.eval_every_steps = 0
  t.eval_examples = 32
  # Benchmarks of compact_jax/eval/benchmarks the eval hook also runs every
  # eval_every_steps ("mme,pope" or a tuple; () = none), on the first eval_examples
  # questions of each, exactly as the benchmarks stage would with config.bench (which
  # the config must then have: configs/eval.py bench_config()). Metrics are logged as
  # eval/<benchmark>/<metric>, e.g. best_metric "eval/pope/headline".
  t.eval_benchmarks = ml_collections.FieldReference((), field_type=object)
  return t


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.stages = STAGES
  c.seed = 0
  # Set by --overwrite: redo finished stages instead of skipping them.
  c.overwrite = False
  # Join a multi-host job with jax.distributed.initialize(): True, False, or None
  # = when the environment shows one (Cloud TPU pod, SLURM, Open MPI).
  c.distributed = None
  # Instead of running the stages, compile the train step of each training phase in
  # config.stages on config.mesh with abstract arrays and print memory, shardings
  # and FLOPs (compact_jax/train/dry_run.py); nothing is read or allocated.
  c.dry_run = False
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
  # Probability of each train_k value (normalised); () = uniform, as COMPACT samples
  # k_gen. configs/experiments/compact_repro.py sets a LLaVA-like skew this way.
  c.world.train_k_weights = ()
  # Exact number of train questions (QA pairs), for equal-budget comparisons: train
  # images are generated until there are this many (the last one keeps only the
  # questions still needed) and num_train_images is ignored; 0 = off.
  c.world.num_train_questions = 0
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
  # Scene files (relative to the workdir, e.g. another run's
  # "../x/generate/scenes/train.jsonl") whose scenes the test split must not repeat
  # either: arms trained on different images then share one fresh test split.
  c.world.test_avoids_scenes = ()
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
  # Splits whose text trains the tokenizer (those of them in build.records).
  c.build.tokenizer_splits = ("train", "captions")
  c.build.tokenizer_vocab_size = 512
  c.build.tokenizer_model_type = "bpe"

  # --- vision: the tiny world's vision-tower pretraining (world/vision.py) -----
  # Dense per-cell labels of the train scenes stand in for SigLIP pretraining;
  # the tower goes to WORKDIR/vision/img.npz (load it with model_init). Off unless
  # "vision" is in config.stages.
  c.vision = ml_collections.ConfigDict()
  c.vision.total_steps = 300
  c.vision.batch_size = 64
  c.vision.lr = 1e-3
  c.vision.warmup_steps = 30
  c.vision.weight_decay = 1e-4
  c.vision.log_every_steps = 50
  c.vision.eval_images = 600  # test images whose cells are scored (never trained on)
  # What trains the tower: "cells" (the labels above), "sigmoid" (SigLIP's contrastive
  # loss on (train image, caption) pairs with a MAP head and a text tower,
  # world/contrastive.py) or "both" (their sum on one tower).
  c.vision.objective = "cells"
  c.vision.txt_variant = ""  # sigmoid/both: the text tower ("" = model.vit_variant)
  # sigmoid: steps and lr of the linear probe of cell labels on the frozen tower (0 = off).
  c.vision.probe_steps = 300
  c.vision.probe_lr = 1e-2

  # --- data: the grain input pipeline (compact_jax/data) --------------------
  c.data = ml_collections.ConfigDict()
  c.data.template = "gemma"  # chat template, see compact_jax/data/template.py
  c.data.image_size = 64  # model input resolution (after pad-to-square)
  # RGB of the pad-to-square (and AnyRes letterbox) padding. Mid-grey is 0 after SigLIP's
  # [-1, 1] scaling; LLaVA-1.5 pads with CLIP's mean colour (configs/llava15_7b.py).
  c.data.pad_fill = (127, 127, 127)
  # Text lengths (tokens) that batches are padded to; one compile per bucket.
  c.data.seq_buckets = (64, 80, 96, 128, 144)
  # Sequence packing (0 = off): rows of pack_length LLM positions (image tokens
  # included) hold several examples, packed first-fit-decreasing per pack_window
  # shuffled examples; segment ids keep them from attending to each other and
  # positions restart per example (data/pipeline.py). Steps have one shape and
  # compile once, and <phase>.batch_size counts rows. Text is still truncated to
  # seq_buckets[-1]; pack_length must hold an image plus that much text.
  # No FLOP/MFU logging for packed steps yet, and the dry run refuses them.
  c.data.pack_length = 0
  c.data.pack_max_images = 4  # image slots per row; the ViT runs on every slot
  c.data.pack_window = 256
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
  # Image tokens attend among themselves causally (LLaVA, and what HF LLaVA export
  # needs) instead of as a full-attention prefix (PaliGemma, the tiny world).
  c.model.causal_image = False
  # LoRA adapters (models/lora.py) on every weight whose "/"-joined path a target
  # regex searches, e.g. r"llm/layers[^/]*/attn/(q|kv|attn_vec)_einsum/w$"; () = none.
  # The adapters are params named <weight>_lora_a / _lora_b: give them a group
  # in <phase>.param_groups (LORA_TRAINABLE / NOT_LORA below).
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.targets = ()
  c.model.lora.rank = 8
  c.model.lora.alpha = 16.0
  c.model.lora.partial = False  # adapters act at image-token positions only
  # peft's lora_dropout: drops the adapters' input activations in training only.
  c.model.lora.dropout = 0.0
  # Dynamic high resolution (models/anyres.py; mode "" = off: one data.image_size image).
  # Each image becomes a global view plus tiles of data.image_size px, cut by the data
  # pipeline, evaluation and benchmarks from these same keys. The ViT encodes all
  # Tiling.num_slots views of every example; the model lays their features out as
  # model.num_image_tokens fixed tokens (the global view's, then the largest tile grid
  # any layout needs) and masks the ones an example does not use. Packing
  # (data.pack_length > 0) and the dry run do not support it yet.
  c.model.dynamic_res = ml_collections.ConfigDict()
  c.model.dynamic_res.mode = ""  # "" | "anyres" (LLaVA-NeXT) | "internvl" (InternVL-1.5)
  # anyres: the allowed (rows, cols) grids, in tiles. LLaVA-NeXT's 336 px
  # grid_pinpoints [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]].
  c.model.dynamic_res.pinpoints = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
  # internvl: how many tiles an image may be cut into (InternVL-1.5 trains with 1..12).
  c.model.dynamic_res.min_tiles = 1
  c.model.dynamic_res.max_tiles = 6
  # The global view: LLaVA-NeXT's base image, InternVL's thumbnail (which InternVL,
  # and so this mode, drops for an image cut into a single tile).
  c.model.dynamic_res.thumbnail = True
  # A learnable separator token after each row of the tile grid (LLaVA-NeXT's
  # image_newline, InternLM-XComposer2-4KHD); the param `image_newline` needs a param group.
  c.model.dynamic_res.newline = False
  # Budget on one image's tile-grid features (after AnyRes unpadding): a larger grid is
  # bilinearly downsampled, aspect kept (LLaVA-OneVision's anyres_max); 0 = none.
  c.model.dynamic_res.max_visual_tokens = 0
  # Start training from a big_vision-layout npz (a relative path is under the
  # workdir; see compact_jax/checkpoints;
  # `python -m compact_jax.checkpoints.cli hf-to-npz` converts HF checkpoints).
  # Only params under `parts`' targets are loaded; the rest keep their init.
  c.model_init = ml_collections.ConfigDict()
  c.model_init.path = ""
  c.model_init.parts = (("params/img/", "img/"), ("params/llm/", "llm/"))
  c.model_init.ignore = ()  # regexes of npz keys to skip (e.g. "^params/txt/")

  # --- train (compact_jax/train) ---------------------------------------------
  # A training phase; `config.pretrain` below has the same keys. The launcher
  # stage of the same name runs it into WORKDIR/<phase>/.
  c.train = train_phase()
  # The caption phase (launcher stage "pretrain"): LLaVA's stage 1, and for a
  # model trained from scratch its vision pretraining. Off unless listed in
  # config.stages; then set train.init_from = "pretrain".
  c.pretrain = train_phase()
  c.pretrain.split = "captions"

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

  # --- export (compact_jax/train/export.py) -----------------------------------
  # The latest checkpoint of this phase -> export/model.npz (LoRA merged, big_vision
  # layout) + model.json.
  c.export = ml_collections.ConfigDict()
  c.export.phase = "train"

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
