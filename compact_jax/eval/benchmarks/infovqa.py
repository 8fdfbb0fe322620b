"""InfographicVQA (val, 2,801 questions): ANLS with threshold 0.5.

ANLS as the RRC evaluation script computes it (Qwen-VL's
``infographicsvqa_eval.py``, copied into lmms-eval ``api/metrics.py::anls``):
lower-case and collapse whitespace for the Levenshtein distance, normalise by the
longer *raw* string, take the best reference, and zero scores below 0.5. A score
of exactly 0.5 is kept, as in that script; the paper's formula (zero when
NL >= 0.5) and big_vision's ``anls_metric`` would zero it
(shared/reference/data_formats_benchmarks_metrics.md §3.1).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from compact_jax.eval.benchmarks import core
from compact_jax.eval.benchmarks import formats as fmt

THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
  if len(a) > len(b):
    a, b = b, a
  prev = list(range(len(a) + 1))
  for j, cb in enumerate(b):
    cur = [j + 1]
    for i, ca in enumerate(a):
      cur.append(prev[i] if ca == cb else 1 + min(prev[i], prev[i + 1], cur[-1]))
    prev = cur
  return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = THRESHOLD) -> float:
  det = " ".join(prediction.strip().lower().split())
  values = []
  for answer in answers:
    gt = " ".join(answer.strip().lower().split())
    length = max(len(answer.upper()), len(prediction.upper()))
    values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
  result = 1.0 - min(values)
  return 0.0 if result < threshold else result


def _read_original(files: list[pathlib.Path], bench_dir: pathlib.Path) -> list[fmt.Row]:
  """The RRC release: {"data": [{"questionId", "question", "image_local_name", "answers",
  ...}]}; the images may sit in any folder next to the JSON (the archive's folder name
  varies between copies: infographicsvqa_images/, infographicVQA_val_v1.0_images/, ...)."""
  root = files[0].parent
  folders = sorted(d for d in root.iterdir() if d.is_dir())
  rows = []
  for n, r in enumerate(fmt.read_json(files[0])["data"]):
    where = f"{files[0]} data[{n}]"
    name = r["image_local_name"]
    folder = next((d for d in folders if (d / name).is_file()), None)
    if folder is None:
      raise FileNotFoundError(f"{where}: image {name!r} is in no folder under {root}")
    rows.append({**r, "image": (folder / name).read_bytes(), "_where": where})
  return rows


LAYOUTS = (
  fmt.Layout("InfoVQA_VAL.tsv", "VLMEvalKit's InfoVQA_VAL.tsv",
             "https://opencompass.openxlab.space/utils/VLMEval/InfoVQA_VAL.tsv", fmt.read_tsv),
  fmt.Layout("**/validation-*.parquet", "the InfographicVQA validation parquet of lmms-lab/DocVQA",
             "https://huggingface.co/datasets/lmms-lab-encoder/DocVQA (was lmms-lab/DocVQA) (config InfographicVQA)", fmt.read_parquet),
  fmt.Layout("infographicsVQA_val_v1.0_withQT.json",
             "infographicsVQA_val_v1.0_withQT.json plus its images in a folder next to it",
             "https://rrc.cvc.uab.es/?ch=17 (Infographics VQA, registration)", _read_original),
)  # fmt: skip


def load(bench_dir: pathlib.Path, options: core.Options) -> list[core.Example]:
  del options
  _, rows = fmt.load_rows("infovqa", bench_dir, LAYOUTS)
  out = []
  for n, r in enumerate(rows):
    where = r.get("_where", f"row {n}")
    q = str(fmt.field(r, "question")).strip()
    out.append(core.Example(
      id=str(fmt.field(r, "questionId", "question_id", "index", default=n)),
      question=q, prompt=q + core.SHORT_ANSWER, image=r["image"],
      answer=fmt.literal_list(fmt.field(r, "answers", "answer"), where=where),
    ))  # fmt: skip
  return out


def score(example: core.Example, output: str) -> core.Scored:
  return core.Scored(output.strip(), anls(output, example.answer))


def aggregate(examples: Sequence[core.Example], scores: Sequence[core.Scored]) -> dict[str, Any]:
  value = 100.0 * core.mean(core.scored_values(scores))
  return {"headline": value, "anls": value, "n": len(examples)}


BENCHMARK = core.Benchmark("infovqa", "InfoVQA", load, score, aggregate, max_new_tokens=32)
