"""Issue 8's experiment: COMPACT vs atomic vs natural vs large (10x) training questions.

  python -m compact_jax.main --config=configs/experiments/compact_repro.py --workdir=DIR
  python -m compact_jax.main --config=configs/experiments/compact_repro.py:smoke --workdir=DIR

Everything but ``config.experiment`` and ``config.stages`` is the tiny-world recipe,
``configs/tiny_world.get_config()`` (``smoke`` passes through to it), so the
experiment follows the recipe as it changes. The machinery and the layout under
DIR are in ``compact_jax/experiments/compact_repro.py``; a rerun resumes.

Arguments (after the colon, comma-separated):
  smoke: the tiny recipe, 2 seeds, small budgets, few steps: checks the machinery
    (about 2-3 min), not the science.
  seeds=N: run seeds 0..N-1 (default 3).
"""

from __future__ import annotations

import ml_collections

from compact_jax import configlib
from configs import tiny_world

# LLaVA-665K's k distribution as COMPACT annotated it (Gemini-2.0-Flash on 5,400
# questions; shared/reference/data_formats_benchmarks_metrics.md §5): mean k 1.95,
# 77% with k <= 2, 1.1% with k = 0. The world has no k = 0 question (each asks for
# at least one capability), so that 1% is dropped; over k = 1..3 the two moments
# then fix the weights: p1 + p2 = 0.77 and p1 + 2 p2 + 3 p3 = 1.95.
NATURAL_K_WEIGHTS = (0.28, 0.49, 0.23)


def _arm(train_k, train_k_weights=(), budget_factor=1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      "train_k": tuple(train_k),
      "train_k_weights": tuple(float(w) for w in train_k_weights),
      "budget_factor": int(budget_factor),  # times experiment.train_questions
    }
  )


def get_config(arg: str | None = None):
  a = configlib.parse_arg(arg, smoke=False, seeds=3)
  c = tiny_world.get_config("smoke" if a.smoke else None)
  c.unlock()
  e = c.experiment = ml_collections.ConfigDict()
  # The recipe's stages: all but train and eval run once per seed ("stage 1").
  e.recipe_stages = tuple(c.stages)
  c.stages = ("experiment",)
  e.seeds = tuple(range(2 if a.smoke and a.seeds == 3 else a.seeds))
  # Training questions (QA pairs) of a budget-1 arm; 0 = what the recipe's
  # num_train_images carry on average (images x mean questions_per_image).
  e.train_questions = 0
  # Arms sort by name, and the report lists them in that order.
  e.arms = ml_collections.ConfigDict(
    {
      "a_compact": _arm((1, 2, 3)),
      "b_atomic": _arm((1,)),
      "c_natural": _arm((1, 2, 3), NATURAL_K_WEIGHTS),
      "d_large": _arm((1, 2, 3), NATURAL_K_WEIGHTS, budget_factor=10),
    }
  )
  # Whose train images the shared vision tower and caption phase of a seed use.
  e.stage1_arm = "a_compact"
  e.reference_arm = "d_large"  # the Rel. % denominator, as full LLaVA-665K in the paper
  e.comparisons = (("a_compact", "c_natural"), ("a_compact", "b_atomic"))
  e.verdict_k = 4  # the verdict pools k >= this
  e.bootstrap_resamples = 2000
  if a.smoke:
    # Steps and shapes stay tiny_world:smoke's, so compiled programs come from the
    # persistent cache that run (and its test) filled.
    # Arm d's 10x is what generating costs: 400 questions (~160 images) per seed.
    e.train_questions = 40
    c.world.num_test_images = 30  # ~75 questions, of which eval scores the first 64
    e.bootstrap_resamples = 200
  c.lock()
  return c
