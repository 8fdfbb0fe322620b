"""GQA (testdev-balanced, 12,578 questions): exact match after normalisation.

Normalisation: lower case, ``string.punctuation`` removed, whitespace collapsed
and stripped. lmms-eval's ``exact_match_hf_evaluate`` (``ignore_case``,
``ignore_punctuation``) does the first two only; we also ignore whitespace
(deliberately: a trailing newline or double space from the model should not decide
a match). LLaVA's ``convert_gqa_for_eval.py`` lower-cases and strips a trailing
period before GQA's official ``eval.py``; all agree on clean one-word answers.
"""

from __future__ import annotations

import pathlib
import string
from collections.abc import Sequence
from typing import Any

from compact_jax.eval.benchmarks import core
from compact_jax.eval.benchmarks import formats as fmt

_NO_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_gqa(text: str) -> str:
  return " ".join(text.lower().translate(_NO_PUNCT).split())


def _read_original(files: list[pathlib.Path], bench_dir: pathlib.Path) -> list[fmt.Row]:
  rows = []
  for qid, r in sorted(fmt.read_json(files[0]).items()):
    where = f"{files[0]} [{qid!r}]"
    image = fmt.read_image_file(bench_dir / "images", f"{r['imageId']}.jpg", where=where)
    rows.append({**r, "question_id": qid, "image": image, "_where": where})
  return rows


def _read_hf(files: list[pathlib.Path], bench_dir: pathlib.Path) -> list[fmt.Row]:
  """lmms-lab/GQA: questions and images are two configs, joined on imageId."""
  questions = fmt.read_parquet(files)
  image_files = sorted(bench_dir.glob("testdev_balanced_images/*.parquet"))
  if not image_files:
    raise FileNotFoundError(f"{bench_dir}/testdev_balanced_images/*.parquet: lmms-lab/GQA's "
                            "images config is needed next to testdev_balanced_instructions/")  # fmt: skip
  images = {str(r["id"]): r["image"] for r in fmt.read_parquet(image_files)}
  for r in questions:
    if str(r["imageId"]) not in images:
      raise ValueError(f"{r['_where']}: image {r['imageId']!r} is not in {image_files[0].parent}")
    r["image"] = images[str(r["imageId"])]
  return questions


LAYOUTS = (
  fmt.Layout("GQA_TestDev_Balanced.tsv", "VLMEvalKit's GQA_TestDev_Balanced.tsv",
             "https://opencompass.openxlab.space/utils/VLMEval/GQA_TestDev_Balanced.tsv", fmt.read_tsv),
  fmt.Layout("testdev_balanced_instructions/*.parquet",
             "lmms-lab/GQA's testdev_balanced_instructions/ and testdev_balanced_images/ parquet",
             "https://huggingface.co/datasets/lmms-lab-encoder/GQA (was lmms-lab/GQA)", _read_hf),
  fmt.Layout("testdev_balanced_questions.json", "testdev_balanced_questions.json plus images/",
             "https://cs.stanford.edu/people/dorarad/gqa/download.html", _read_original),
)  # fmt: skip


def load(bench_dir: pathlib.Path, options: core.Options) -> list[core.Example]:
  del options
  _, rows = fmt.load_rows("gqa", bench_dir, LAYOUTS)
  return [
    core.Example(
      id=str(fmt.field(r, "question_id", "id", "index", default=n)),
      question=str(fmt.field(r, "question")).strip(),
      prompt=str(fmt.field(r, "question")).strip() + core.SHORT_ANSWER,
      image=r["image"],
      answer=str(fmt.field(r, "answer")),
    )
    for n, r in enumerate(rows)
  ]


def score(example: core.Example, output: str) -> core.Scored:
  parsed = normalize_gqa(output)
  return core.Scored(parsed, float(parsed == normalize_gqa(example.answer)))


def aggregate(examples: Sequence[core.Example], scores: Sequence[core.Scored]) -> dict[str, Any]:
  acc = 100.0 * core.mean(core.scored_values(scores))
  return {"headline": acc, "accuracy": acc, "n": len(examples)}


BENCHMARK = core.Benchmark("gqa", "GQA", load, score, aggregate, max_new_tokens=16)
