"""COMPACT data generation: your images -> k-capability QA records -> a LLaVA mix.

  # offline, with the tiny world's oracle (renders its own image pool):
  python -m compact_jax.main --config=configs/datagen.py:backend=world --workdir=/tmp/dg
  # Gemini (key in $GEMINI_API_KEY):
  python -m compact_jax.main --config=configs/datagen.py:backend=gemini \
      --config.images=/data/llava/coco/train2017 --config.image_root=/data/llava --workdir=/tmp/dg
  # OpenAI or any OpenAI-compatible server (vLLM, SGLang, Ollama, LM Studio):
  python -m compact_jax.main --config=configs/datagen.py:backend=openai \
      --config.backend.base_url=http://localhost:8000/v1 --config.backend.model=Qwen/Qwen2.5-VL-7B-Instruct \
      --config.images=DIR --workdir=/tmp/dg

Arguments (after the colon, comma-separated):
  backend=world|openai|gemini: which model answers (default world).
  smoke: a handful of images, for tests and CI.

Stages: ``datagen`` (this shard), ``merge`` (all shards -> datagen/records.jsonl),
``mix`` (+ a LLaVA-665K subset -> mix/train.jsonl); add ``build`` to package the mix.
"""

from __future__ import annotations

import ml_collections

from compact_jax import configlib
from configs import base

# Per backend: (default model, environment variable with the API key, requests per minute).
BACKEND_DEFAULTS = {
  "world": ("tiny-world-oracle", "", 0.0),
  "openai": ("gpt-4o-mini", "OPENAI_API_KEY", 500.0),
  "gemini": ("gemini-2.5-flash", "GEMINI_API_KEY", 500.0),
}

# (model, USD per 1M input tokens, USD per 1M output tokens), the providers' list prices as
# of 2025; check them before relying on config.datagen.max_cost_usd. Add rows for your models
# (a local vLLM server costs 0).
PRICES = (
  ("gemini-2.5-flash", 0.30, 2.50),
  ("gemini-2.5-flash-lite", 0.10, 0.40),
  ("gemini-2.0-flash", 0.10, 0.40),
  ("gemini-2.5-pro", 1.25, 10.00),
  ("gpt-4o-mini", 0.15, 0.60),
  ("gpt-4o", 2.50, 10.00),
  ("gpt-4.1-mini", 0.40, 1.60),
  ("gpt-4.1", 2.00, 8.00),
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = configlib.parse_arg(arg, backend="world", smoke=False)
  if a.backend not in BACKEND_DEFAULTS:
    raise ValueError(f"Unknown backend {a.backend!r}; choose from {list(BACKEND_DEFAULTS)}")
  model, key_env, rpm = BACKEND_DEFAULTS[a.backend]
  c = base.get_config()
  c.stages = ("datagen", "merge", "mix")
  # The image pool: every image file under `images` (recursively). Record paths are relative
  # to `image_root` (default: `images`), e.g. images=/data/llava/coco/train2017 with
  # image_root=/data/llava gives "coco/train2017/x.jpg", as in LLaVA-665K. Empty `images` with
  # the world backend renders a pool of world scenes.
  c.images = ""
  c.image_root = ""
  # This process handles the images whose path hashes to shard_index (mod num_shards).
  c.shard_index = 0
  c.num_shards = 1
  # Print the first image's prompts and exit: no backend, no network, no API key.
  c.dry_run = False

  c.backend = ml_collections.ConfigDict()
  c.backend.name = a.backend
  c.backend.model = model
  c.backend.base_url = ""  # "" = the SDK's default endpoint
  c.backend.api_key_env = key_env  # the key is read from this variable, never from config
  c.backend.temperature = 0.1  # COMPACT's settings
  c.backend.top_p = 0.9
  c.backend.generation_max_output_tokens = 1000
  c.backend.verification_max_output_tokens = 500
  c.backend.structured_output = True  # JSON schema / response_format where supported
  c.backend.request_timeout_s = 60.0
  c.backend.max_tokens_param = "max_tokens"  # openai: or "max_completion_tokens" (o-series)
  c.backend.image_detail = "auto"  # openai: "low" | "high" | "auto"
  c.backend.thinking_budget = -1  # gemini: -1 = the model's default, 0 = no thinking
  c.backend.world_max_attempts = 64  # world: programs proposed per generation call

  d = c.datagen = ml_collections.ConfigDict()
  # --- the recipe ---
  d.k_values = (1, 2, 3)  # each image draws its k uniformly from these
  d.questions_per_image = (2, 3)  # inclusive range of questions to keep
  d.min_questions = 2  # fewer verified questions: the image is dropped
  d.capability_weights = ml_collections.ConfigDict({"action_recognition": 2.0})  # others 1
  d.attempts_per_question = 3  # generation calls per capability set
  d.max_capability_sets = 6  # capability sets tried per image
  d.duplicate_overlap = 0.6  # near-duplicate: shared words / smaller word set above this
  d.capability_match = "exact"  # verification must name the same set ("size": same size)
  d.answer_suffix = base.SHORT_ANSWER
  d.id_prefix = "compact"
  d.source = "compact"
  # --- the engine (0 = no limit) ---
  d.max_concurrency = 16
  d.requests_per_minute = rpm
  d.tokens_per_minute = 0.0
  d.max_retries_per_request = 6
  d.max_retries_per_image = 20
  d.backoff_initial_s = 1.0
  d.backoff_max_s = 60.0
  d.max_retry_after_s = 300.0
  d.max_requests = 0  # budget caps, per invocation
  d.max_tokens = 0
  d.max_cost_usd = 0.0
  d.prices = PRICES
  d.image_token_estimate = 800  # for the tokens-per-minute limiter before usage is known
  d.max_image_side = 1024  # larger images are downscaled before upload
  d.max_image_pixels = 100_000_000  # larger images fail ("too large")
  d.progress = True
  d.fsync = True
  d.retry_failed = False  # on resume, also redo images recorded as failed
  d.cache = True
  d.merge_allow_partial = False
  d.world_pool_images = 200  # world backend with empty config.images

  m = c.mix = ml_collections.ConfigDict()
  m.compositional = ()  # record files; empty = datagen/records.jsonl (merge's output)
  m.compositional_count = -1  # -1 = all; else a seeded subset (COMPACT: 32K)
  m.llava_file = ""  # a LLaVA-665K-format file (JSON array, JSONL, ...); "" = none
  m.llava_fraction = 0.05  # COMPACT: 5% of LLaVA-665K
  m.llava_count = -1  # >= 0 overrides the fraction
  m.llava_source = "llava_665k"  # `source` given to LLaVA records that have none
  m.seed = 0
  m.output = "mix/train.jsonl"

  # The build stage (if added to stages) packages the mix.
  c.build.records = ml_collections.ConfigDict({"train": ("mix/train.jsonl",)})
  if a.backend == "world":
    c.build.image_roots = ("datagen/world_pool",)
    # The oracle already searches many programs per call; a set it cannot ask about in a
    # fixed scene will not work on a retry, so move on to another set instead.
    d.attempts_per_question = 1
    d.max_capability_sets = 10

  if a.smoke:
    d.world_pool_images = 12
    d.max_concurrency = 4
    d.progress = False
  c.lock()
  return c
