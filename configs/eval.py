"""The benchmark suite on a checkpoint (stage ``benchmarks``, compact_jax/eval/bench_run.py).

  python -m compact_jax.main --config=configs/eval.py:benchmarks=mme,mmstar \
      --config.checkpoint=/tmp/tw --config.bench.data_dir=/data/bench --workdir=/tmp/tw_bench
  # the tiny world's own test split, plus any benchmark with data:
  python -m compact_jax.main --config=configs/eval.py:benchmarks=tinyworld,pope \
      --config.checkpoint=/tmp/tw --workdir=/tmp/tw

Arguments (after the colon, comma-separated):
  benchmarks=a,b,...: names from compact_jax/eval/benchmarks BENCHMARKS (default: the
    eight of COMPACT's table); bare names after it continue the list.
  judge=openai|gemini: the MM-Vet / LLaVA-W judge's backend (default openai).
  smoke: a few examples per benchmark and short generations (tests, CI).

The model architecture, chat template and image size come from the checkpoint's
metadata, so only ``checkpoint`` must be given. Benchmark files live under
``bench.data_dir/<name>/``; a missing benchmark fails with the files to place
there and where they come from (nothing is downloaded).

A training config runs benchmarks every N steps with the same ``bench`` section:
``c.bench = bench_config()`` plus ``c.train.eval_benchmarks`` and ``eval_every_steps``
(configs/base.py).
"""

from __future__ import annotations

import ml_collections

from compact_jax import configlib
from configs import base
from configs import datagen as datagen_config

COMPACT_TABLE = (
  "infovqa", "seedbench2plus", "mme", "textvqa", "mmvet", "cvbench", "mmstar", "llava_wild",
)  # fmt: skip
_FLAGS = {"judge": "openai", "smoke": False}


def _split_arg(arg: str | None) -> tuple[tuple[str, ...] | None, str]:
  """Pulls ``benchmarks=a,b,c`` out of the arg (its commas would split it); the rest
  goes to configlib.parse_arg."""
  names: list[str] | None = None
  rest = []
  in_list = False
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if sep and key.strip() == "benchmarks":
      names, in_list = [v for v in value.replace("+", " ").split() if v], True
    elif not sep and in_list and item not in _FLAGS:
      names.append(item)
    else:
      in_list = False
      rest.append(item)
  return (tuple(names) if names is not None else None), ",".join(rest)


def llm_config(backend: str, *, model: str, structured_output: bool) -> ml_collections.ConfigDict:
  """``backend`` + ``datagen`` sections shaped like configs/datagen.py's, for the engine."""
  dg = datagen_config.get_config(f"backend={backend}")
  c = ml_collections.ConfigDict({"backend": dg.backend.to_dict(), "datagen": dg.datagen.to_dict()})
  c.backend.model = model
  c.backend.temperature = 0.0  # lmms-eval's judges run at temperature 0
  c.backend.top_p = 1.0
  c.backend.structured_output = structured_output
  c.backend.verification_max_output_tokens = 128  # MM-Vet grades and k-tags are short
  c.backend.generation_max_output_tokens = 1024  # LLaVA-W reviews explain their scores
  c.datagen.progress = False
  c.datagen.max_concurrency = 8
  c.datagen.max_retries_per_request = 6
  c.datagen.max_retries_per_image = 8
  return c


def bench_config(judge: str = "openai") -> ml_collections.ConfigDict:
  """The ``bench`` section: the benchmarks stage's settings, and those of the trainer's
  periodic benchmarks (``config.train.eval_benchmarks``): a training config that runs
  benchmarks adds ``c.bench = eval_config.bench_config()``."""
  b = ml_collections.ConfigDict()
  b.benchmarks = COMPACT_TABLE
  b.data_dir = "~/compact_jax_data/benchmarks"  # <data_dir>/<benchmark>/...
  b.output_dir = "benchmarks"  # under the workdir
  b.max_examples = -1  # per benchmark; -1 = all
  b.batch_size = 16
  b.max_new_tokens = -1  # -1 = each benchmark's own budget (lmms-eval's); else a cap
  b.prompt_buckets = (64, 128, 256, 512, 1024, 2048)
  # Decoding: temperature 0 = greedy (LLaVA-1.5 and lmms-eval evaluate greedily).
  b.temperature = 0.0
  b.top_k = 0
  b.top_p = 1.0
  b.sampling_seed = 0
  b.stop_strings = ()  # generation text is cut at the first of these
  b.progress = True
  # TextVQA: give OCR tokens in the prompt (LLaVA's script) or not (lmms-eval, COMPACT).
  b.textvqa_ocr = False
  # MM-Vet: "" = LLaVA-1.5; lmms-eval >= 2024-08 uses "First please perform reasoning, and
  # think step by step to provide best answer to the following question: \n\n".
  b.mmvet_pre_prompt = ""
  b.world_split = "test"  # the tinyworld benchmark's split of the checkpoint's workdir
  # The judge of MM-Vet and LLaVA-W (lmms-eval's default model) and the k-tagger
  # (COMPACT annotated k with Gemini-2.0-Flash); keys as in configs/datagen.py.
  b.judge = llm_config(judge, model="gpt-4o-2024-11-20" if judge == "openai"
                       else "gemini-2.5-flash", structured_output=False)  # fmt: skip
  b.judge_reasks = 1  # re-asks of an unparseable judge reply before it counts as missing
  # Send the benchmark image to the judge too. lmms-eval's MM-Vet and LLaVA-W judges read
  # text only (LLaVA-W: the captions); a judge that sees the image may grade differently.
  b.judge_sees_image = False
  b.tag_k = False  # tag benchmark questions with k (costs one tagger call per question)
  b.tagger = llm_config("gemini", model="gemini-2.0-flash", structured_output=True)
  b.k_top_bucket = 5  # k >= this is pooled into one bucket
  b.cache_file = "llm_cache.sqlite"  # judge + tagger replies, under output_dir
  # Rel. % in the table: another run's results.json (e.g. the LLaVA-665K checkpoint's).
  b.baseline_results = ""
  b.baseline_name = "baseline"
  b.run_name = ""  # the table's row label; "" = the checkpoint path
  return b


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  names, rest = _split_arg(arg)
  a = configlib.parse_arg(rest, **_FLAGS)
  c = base.get_config()
  c.stages = ("benchmarks",)
  # The workdir (or its train/checkpoints dir) whose latest checkpoint is evaluated;
  # "" = --workdir itself.
  c.checkpoint = ""
  b = c.bench = bench_config(a.judge)
  if names:
    b.benchmarks = names
  if a.smoke:
    b.max_examples = 8
    b.batch_size = 4
    b.max_new_tokens = 8
    b.progress = False
  c.lock()
  return c
