"""MME: yes/no questions, two per image, 14 subtasks.

Metric (MME's ``eval_tool/calculation.py``; lmms-eval ``mme/utils.py``): per
subtask, acc = % of questions right and acc+ = % of images with both questions
right; the subtask score is acc + acc+ (max 200). Perception is the sum over its
10 subtasks (max 2000) and is the headline (COMPACT reports perception only);
cognition sums the other 4 (max 800).

Prompt: lmms-eval replaces MME's " Please answer yes or no." with LLaVA's short
answer instruction (`mme.yaml`), as LLaVA-1.5's numbers were made.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from compact_jax.eval.benchmarks import core, yesno
from compact_jax.eval.benchmarks import formats as fmt

PERCEPTION = (
  "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
  "artwork", "OCR",
)  # fmt: skip
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_ORIGINAL_PROMPT = " Please answer yes or no."
_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def _subtask_dirs(root: pathlib.Path) -> list[pathlib.Path]:
  """The subtask folders of an unzipped release: directly under ``root`` or under its one
  wrapper folder (some copies of the zip hold ``MME_Benchmark/<subtask>/``)."""
  dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
  known = PERCEPTION + COGNITION
  if not any(d.name in known for d in dirs) and len(dirs) == 1:
    return _subtask_dirs(dirs[0])
  unknown = [d.name for d in dirs if d.name not in known]
  if unknown:
    raise ValueError(f"{root}: folders {unknown} are not MME subtasks {list(known)}")
  return dirs


def _read_original(files: list[pathlib.Path], bench_dir: pathlib.Path) -> list[fmt.Row]:
  """MME_Benchmark_release_version/<subtask>/: ``<img>.txt`` files of "question\tanswer"
  lines, next to the images or in ``questions_answers_YN/`` with images in ``images/``
  (the layout LLaVA's ``convert_answer_to_mme.py`` reads)."""
  rows = []
  for sub in _subtask_dirs(files[0]):
    qa_dir = sub / "questions_answers_YN"
    img_dir = sub / "images" if qa_dir.is_dir() else sub
    qa_dir = qa_dir if qa_dir.is_dir() else sub
    for txt in sorted(qa_dir.glob("*.txt")):
      img = next((img_dir / (txt.stem + s) for s in _IMAGE_SUFFIXES if (img_dir / (txt.stem + s)).exists()), None)  # fmt: skip
      if img is None:
        raise FileNotFoundError(f"{txt}: no image {txt.stem}.jpg/.png in {img_dir}")
      data = img.read_bytes()
      for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
          continue
        parts = line.split("\t")
        if len(parts) < 2:
          raise ValueError(f"{txt} line {n + 1}: expected 'question<TAB>answer', got {line!r}")
        rows.append({
          "question_id": f"{sub.name}/{img.name}", "question": parts[0], "answer": parts[1],
          "category": sub.name, "image": data, "_where": f"{txt} line {n + 1}",
        })  # fmt: skip
  return rows


LAYOUTS = (
  fmt.Layout("MME.tsv", "VLMEvalKit's MME.tsv (base64 images)",
             "https://opencompass.openxlab.space/utils/VLMEval/MME.tsv", fmt.read_tsv),
  fmt.Layout("**/*.parquet", "the parquet shards of lmms-lab/MME (data/test-*.parquet)",
             "https://huggingface.co/datasets/lmms-lab-encoder/MME (was lmms-lab/MME)", fmt.read_parquet),
  fmt.Layout("MME_Benchmark_release_version", "the unzipped MME release (one folder per subtask)",
             "the MME authors (https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation)",
             _read_original),
)  # fmt: skip


def load(bench_dir: pathlib.Path, options: core.Options) -> list[core.Example]:
  del options
  _, rows = fmt.load_rows("mme", bench_dir, LAYOUTS)
  out = []
  for n, r in enumerate(rows):
    where = r.get("_where", f"row {n}")
    q = str(fmt.field(r, "question")).strip()
    category = str(fmt.field(r, "category"))
    if category not in PERCEPTION and category not in COGNITION:
      raise ValueError(f"{where}: unknown MME subtask {category!r}")
    image = r["image"]
    # An image's two questions share a key: its path where the format has one, else
    # its bytes (VLMEvalKit's TSV has no path column in every version).
    pair = fmt.field(r, "question_id", "image_path", default=None)
    if pair is None:
      pair = hashlib.sha256(image or b"").hexdigest()[:16]
    index = fmt.field(r, "index", default=None)
    out.append(core.Example(
      id=str(index) if index is not None else f"{pair}#{n}",
      question=q.replace(_ORIGINAL_PROMPT, ""),
      prompt=q.replace(_ORIGINAL_PROMPT, "") + core.SHORT_ANSWER,
      image=image,
      answer=yesno.reference_yes_no(str(fmt.field(r, "answer")), where=where),
      meta={"category": category, "pair": f"{category}/{pair}"},
    ))  # fmt: skip
  return out


def score(example: core.Example, output: str) -> core.Scored:
  parsed = yesno.parse_yes_no(output)
  return core.Scored(parsed, float(parsed == example.answer))


def aggregate(examples: Sequence[core.Example], scores: Sequence[core.Scored]) -> dict[str, Any]:
  pairs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
  for ex, s in zip(examples, scores):
    pairs[ex.meta["category"]][ex.meta["pair"]].append(s.score)
  subtasks = {}
  incomplete = 0
  for cat, by_image in sorted(pairs.items()):
    flat = [v for vs in by_image.values() for v in vs]
    incomplete += sum(len(vs) != 2 for vs in by_image.values())
    acc = 100.0 * sum(flat) / len(flat)
    acc_plus = 100.0 * sum(all(v == 1.0 for v in vs) for vs in by_image.values()) / len(by_image)
    subtasks[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n": len(flat)}
  perception = sum(v["score"] for k, v in subtasks.items() if k in PERCEPTION)
  cognition = sum(v["score"] for k, v in subtasks.items() if k in COGNITION)
  return {
    "headline": perception,
    "perception": perception,
    "cognition": cognition,
    "total": perception + cognition,
    "subtasks": subtasks,
    "missing_perception_subtasks": [c for c in PERCEPTION if c not in subtasks],
    # Images with other than 2 questions (a subset run); acc+ then needs all of them right.
    "images_without_two_questions": incomplete,
    "n": len(examples),
  }


BENCHMARK = core.Benchmark("mme", "MME", load, score, aggregate, max_new_tokens=16)
