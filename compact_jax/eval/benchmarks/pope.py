"""POPE: object-hallucination yes/no questions on COCO val2014 (random, popular, adversarial).

Metrics per split and pooled: accuracy, precision, recall, F1 ("yes" is the
positive class) and the yes-ratio of the *predictions*. The headline is F1 averaged
over the splits present, as LLaVA-1.5 reports POPE.

Deliberate differences from lmms-eval ``pope/utils.py`` (noted in
shared/reference/data_formats_benchmarks_metrics.md §3):
- answers are parsed with ``yesno.parse_yes_no`` ("Yes." is yes), not exact match;
- an unparseable answer to a "yes" question counts as a false negative (lmms-eval
  drops it from recall's denominator, so rambling raises recall);
- ``yes_ratio`` counts predicted yes; lmms-eval counts ground-truth yes (a bug:
  it is always 0.5 on POPE).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from compact_jax.eval.benchmarks import core, yesno
from compact_jax.eval.benchmarks import formats as fmt

SPLITS = ("random", "popular", "adversarial")


def _read_original(files: list[pathlib.Path], bench_dir: pathlib.Path) -> list[fmt.Row]:
  rows = []
  for path in files:
    split = next((s for s in SPLITS if s in path.name), path.stem)
    for n, r in enumerate(fmt.read_jsonl(path)):
      where = f"{path} line {n + 1}"
      rows.append({
        "question_id": r["question_id"], "question": r["text"], "answer": r["label"],
        "category": split, "image": fmt.read_image_file(bench_dir / "val2014", r["image"], where=where),
        "_where": where,
      })  # fmt: skip
  return rows


LAYOUTS = (
  fmt.Layout("POPE.tsv", "VLMEvalKit's POPE.tsv",
             "https://opencompass.openxlab.space/utils/VLMEval/POPE.tsv", fmt.read_tsv),
  fmt.Layout("**/*.parquet", "the parquet shards of lmms-lab/POPE (default or Full config)",
             "https://huggingface.co/datasets/lmms-lab-encoder/POPE (was lmms-lab/POPE)", fmt.read_parquet),
  fmt.Layout("coco_pope_*.json", "coco_pope_{random,popular,adversarial}.json plus COCO's val2014/ folder",
             "https://github.com/AoiDragon/POPE (output/coco) and https://cocodataset.org (val2014)",
             _read_original),
)  # fmt: skip


def load(bench_dir: pathlib.Path, options: core.Options) -> list[core.Example]:
  del options
  _, rows = fmt.load_rows("pope", bench_dir, LAYOUTS)
  out = []
  for n, r in enumerate(rows):
    where = r.get("_where", f"row {n}")
    q = str(fmt.field(r, "question")).strip()
    split = fmt.field(r, "category", default=None)
    if split is None:  # lmms-lab/POPE's "Full" config: one file per split
      split = next((s for s in SPLITS if s in str(r.get("_file", ""))), "all")
    # POPE numbers questions per split (1..3000 in each): the split makes them unique.
    # VLMEvalKit's TSV has a unique index of its own.
    index = fmt.field(r, "index", default=None)
    qid = index if index is not None else f"{split}/{fmt.field(r, 'question_id', default=n)}"
    out.append(core.Example(
      id=str(qid), question=q, prompt=q + core.SHORT_ANSWER, image=r["image"],
      answer=yesno.reference_yes_no(str(fmt.field(r, "answer")), where=where),
      meta={"split": str(split)},
    ))  # fmt: skip
  return out


def score(example: core.Example, output: str) -> core.Scored:
  parsed = yesno.parse_yes_no(output)
  return core.Scored(parsed, float(parsed == example.answer))


def binary_metrics(preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
  """Accuracy, precision, recall, F1 with "yes" positive, and the predicted yes-ratio."""
  tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, golds))
  fp = sum(p == "yes" and g == "no" for p, g in zip(preds, golds))
  fn = sum(p != "yes" and g == "yes" for p, g in zip(preds, golds))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {
    "accuracy": 100.0 * sum(p == g for p, g in zip(preds, golds)) / len(golds),
    "precision": 100.0 * precision,
    "recall": 100.0 * recall,
    "f1": 100.0 * f1,
    "yes_ratio": 100.0 * sum(p == "yes" for p in preds) / len(preds),
    "unparsed": sum(p == "other" for p in preds),
    "n": len(golds),
  }


def aggregate(examples: Sequence[core.Example], scores: Sequence[core.Scored]) -> dict[str, Any]:
  splits: dict[str, tuple[list[str], list[str]]] = {}
  for ex, s in zip(examples, scores):
    p, g = splits.setdefault(ex.meta["split"], ([], []))
    p.append(s.parsed)
    g.append(ex.answer)
  per_split = {k: binary_metrics(*v) for k, v in sorted(splits.items())}
  pooled = binary_metrics([s.parsed for s in scores], [ex.answer for ex in examples])
  f1_mean = sum(v["f1"] for v in per_split.values()) / len(per_split)
  return {"headline": f1_mean, "f1_mean_over_splits": f1_mean, "pooled": pooled,
          "splits": per_split, "n": len(examples)}  # fmt: skip


BENCHMARK = core.Benchmark("pope", "POPE", load, score, aggregate, max_new_tokens=128)
