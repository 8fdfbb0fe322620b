"""Multiple choice: MMStar, SEED-Bench-2-Plus, CV-Bench (2D and 3D).

Prompt: the question, ``A. option`` lines, then LLaVA-1.5's "Answer with the
option's letter from the given choices directly." (lmms-eval's MMStar task drops
the final period and keeps the options embedded in the question as the HF
release has them; we follow it for MMStar since COMPACT's numbers look
lmms-style, shared/reference/data_formats_benchmarks_metrics.md §0 item 4).

The answer is read by ``extract_option`` (a letter, "(A)", "A.", "A) text", the
option's text, or a sentence containing one). Deliberate differences from the
references: lmms-eval's SEED-2-Plus keeps only the first character of the output
(so "The answer is B" reads "T"), its CV-Bench takes a leading letter only, and its
MMStar ``extract_mcq_answer`` never matches option text ("Paris" for "B. Paris").

Metrics: accuracy (%) overall and per category; MMStar adds lmms-eval's headline,
the mean of its 18 sub-category (``l2_category``) means; CV-Bench adds Cambrian's
official overall = ((ADE20K + COCO) / 2 + Omni3D) / 2, its headline.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from compact_jax.eval import metrics as metrics_lib
from compact_jax.eval.benchmarks import core
from compact_jax.eval.benchmarks import formats as fmt

LETTERS = "ABCDEFGH"
MMSTAR_SUFFIX = "\nAnswer with the option's letter from the given choices directly"
_ONLY_LETTER = re.compile(r"^\W*\(?([A-H])\)?\W*$")
_LEADING = re.compile(r"^\s*\(?([A-H])(?:[.):]|\s|$)")
_PHRASE = re.compile(
  r"(?:answer|option|choice)\s*(?:is|would be|:)?\s*(?:option\s*)?\(?([A-H])\)?(?![A-Za-z])",
  re.IGNORECASE,
)
_PAREN = re.compile(r"\(([A-H])\)")


def extract_option(text: str, options: Mapping[str, str]) -> str:
  """The chosen option letter, or "" when the output names none (scored wrong).

  In order: a bare letter ("B", "(B)", "B."); a leading letter ("B. red", "(B) red");
  the text of exactly one option, as the whole answer or inside it (normalised:
  case, punctuation, articles); "answer is B" / "option B"; a lone "(B)".
  """
  letters = [k for k in options if k in LETTERS]
  if m := _ONLY_LETTER.match(text):
    return m.group(1) if m.group(1) in letters else ""
  norm = metrics_lib.normalize_answer(text)
  texts = {k: metrics_lib.normalize_answer(str(v)) for k, v in options.items() if k in letters}
  exact = [k for k, v in texts.items() if v and v == norm]
  if len(exact) == 1:
    return exact[0]
  if (m := _LEADING.match(text)) and m.group(1) in letters:
    # "A dog" answers with option text starting with the article, not with letter A.
    rest = text.strip()[1:]
    if not (m.group(1) == "A" and rest[:1] == " " and rest[1:2].islower()):
      return m.group(1)
  padded = f" {norm} "
  inside = [k for k, v in texts.items() if v and f" {v} " in padded]
  # Several options inside ("not red but blue"): keep only those no other one contains.
  inside = [k for k in inside if not any(k != o and texts[k] in texts[o] for o in inside)]
  if len(inside) == 1:
    return inside[0]
  found = {m.group(1) for m in _PHRASE.finditer(text)} & set(letters)
  if len(found) == 1:
    return found.pop()
  found = {m.group(1) for m in _PAREN.finditer(text)} & set(letters)
  if len(found) == 1:
    return found.pop()
  return ""


def score(example: core.Example, output: str) -> core.Scored:
  parsed = extract_option(output, example.meta["options"])
  return core.Scored(parsed, float(parsed == example.answer))


def _options_from_columns(row: fmt.Row) -> dict[str, str]:
  out = {}
  for k in LETTERS:
    v = fmt.field(row, k, f"choice_{k}", default=None)
    if v is not None and str(v).strip() and str(v).lower() != "nan":
      out[k] = str(v)
  return out


def _options_in_text(question: str) -> dict[str, str]:
  """MMStar's HF questions embed "Options: A: x, B: y, C: z, D: w"."""
  _, sep, tail = question.rpartition("Options:")
  if not sep:
    return {}
  starts = []
  pos = 0
  for k in LETTERS:
    m = re.compile(rf"(?:^|,\s*|\s){k}[:.]\s*").search(tail, pos)
    if m is None:
      break
    starts.append((k, m.start(), m.end()))
    pos = m.end()
  out = {}
  for i, (k, _, end) in enumerate(starts):
    stop = starts[i + 1][1] if i + 1 < len(starts) else len(tail)
    out[k] = tail[end:stop].strip().rstrip(",").strip()
  return out


def _answer_letter(value: Any, *, where: str) -> str:
  a = str(value).strip().strip("()").strip().upper()
  if a not in LETTERS or len(a) != 1:
    raise ValueError(f"{where}: the answer must be an option letter, got {value!r}")
  return a


def _example(r: fmt.Row, n: int, *, question: str, options: dict[str, str], prompt: str,
             meta: dict[str, Any]) -> core.Example:  # fmt: skip
  where = r.get("_where", f"row {n}")
  if not options:
    raise ValueError(f"{where}: no answer options found")
  answer = _answer_letter(fmt.field(r, "answer"), where=where)
  if answer not in options:
    raise ValueError(f"{where}: answer {answer} is not among the options {sorted(options)}")
  return core.Example(
    id=str(fmt.field(r, "index", "question_id", "idx", default=n)),
    question=question, prompt=prompt, image=r.get("image"), answer=answer,
    meta={"options": options, **meta},
  )  # fmt: skip


# --- MMStar -------------------------------------------------------------------------------

MMSTAR_LAYOUTS = (
  fmt.Layout("MMStar.tsv", "VLMEvalKit's MMStar.tsv",
             "https://opencompass.openxlab.space/utils/VLMEval/MMStar.tsv", fmt.read_tsv),
  fmt.Layout("**/*.parquet", "the parquet file(s) of Lin-Chen/MMStar (mmstar.parquet)",
             "https://huggingface.co/datasets/Lin-Chen/MMStar", fmt.read_parquet),
)  # fmt: skip


def load_mmstar(bench_dir: pathlib.Path, options: core.Options) -> list[core.Example]:
  del options
  _, rows = fmt.load_rows("mmstar", bench_dir, MMSTAR_LAYOUTS)
  out = []
  for n, r in enumerate(rows):
    q = str(fmt.field(r, "question")).strip()
    opts = _options_from_columns(r)
    if opts and "Options:" not in q:
      prompt = core.mcq_prompt(q, opts, MMSTAR_SUFFIX)
    else:
      opts = opts or _options_in_text(q)
      prompt = q + MMSTAR_SUFFIX
    meta = {"category": str(fmt.field(r, "category")),
            "l2_category": str(fmt.field(r, "l2_category", "l2-category"))}  # fmt: skip
    out.append(_example(r, n, question=q, options=opts, prompt=prompt, meta=meta))
  return out


def aggregate_mmstar(
  examples: Sequence[core.Example], scores: Sequence[core.Scored]
) -> dict[str, Any]:
  l2 = core.group_means([e.meta["l2_category"] for e in examples], scores)
  overall = core.mean(core.scored_values(scores)) * 100.0
  l2_mean = sum(v["score"] for v in l2.values()) / len(l2)
  return {
    "headline": l2_mean,
    "mean_of_l2_categories": l2_mean,
    "accuracy": overall,
    "by_category": core.group_means([e.meta["category"] for e in examples], scores),
    "by_l2_category": l2,
    "unparsed": sum(s.parsed == "" for s in scores),
    "n": len(examples),
  }


# --- SEED-Bench-2-Plus ----------------------------------------------------------------------

SEED_LAYOUTS = (
  fmt.Layout("SEEDBench2_Plus.tsv", "VLMEvalKit's SEEDBench2_Plus.tsv",
             "https://opencompass.openxlab.space/utils/VLMEval/SEEDBench2_Plus.tsv", fmt.read_tsv),
  fmt.Layout("**/*.parquet", "the parquet shards of doolayer/SEED-Bench-2-Plus",
             "https://huggingface.co/datasets/doolayer/SEED-Bench-2-Plus", fmt.read_parquet),
)  # fmt: skip


def load_seed(bench_dir: pathlib.Path, options: core.Options) -> list[core.Example]:
  del options
  _, rows = fmt.load_rows("seedbench2plus", bench_dir, SEED_LAYOUTS)
  out = []
  for n, r in enumerate(rows):
    q = str(fmt.field(r, "question")).strip()
    opts = _options_from_columns(r)
    category = str(fmt.field(r, "question_image_type", "category", default="all")).capitalize()
    out.append(_example(r, n, question=q, options=opts, prompt=core.mcq_prompt(q, opts),
                        meta={"category": category}))  # fmt: skip
  return out


def aggregate_by_category(
  examples: Sequence[core.Example], scores: Sequence[core.Scored]
) -> dict[str, Any]:
  overall = core.mean(core.scored_values(scores)) * 100.0
  return {
    "headline": overall,
    "accuracy": overall,
    "by_category": core.group_means([e.meta["category"] for e in examples], scores),
    "unparsed": sum(s.parsed == "" for s in scores),
    "n": len(examples),
  }


# --- CV-Bench -------------------------------------------------------------------------------


def _read_cv_jsonl(files: list[pathlib.Path], bench_dir: pathlib.Path) -> list[fmt.Row]:
  rows = []
  for path in files:
    for n, r in enumerate(fmt.read_jsonl(path)):
      where = f"{path} line {n + 1}"
      rows.append({**r, "image": fmt.read_image_file(bench_dir, r["filename"], where=where),
                   "_where": where})  # fmt: skip
  return rows


def _read_cv_parquet(files: list[pathlib.Path], bench_dir: pathlib.Path) -> list[fmt.Row]:
  """nyu-visionx/CV-Bench's parquet; where the per-type files test_2d / test_3d are present
  any other shard (the default config's file holding both) is skipped, not read twice."""
  split = [f for f in files if f.stem in ("test_2d", "test_3d")]
  return fmt.read_parquet(split or files, bench_dir)


CV_LAYOUTS = (
  fmt.Layout("CV-Bench-[23]D.tsv", "VLMEvalKit's CV-Bench-2D.tsv and CV-Bench-3D.tsv",
             "https://opencompass.openxlab.space/utils/VLMEval/CV-Bench-2D.tsv (and -3D)", fmt.read_tsv),
  fmt.Layout("**/*.parquet", "the parquet files of nyu-visionx/CV-Bench (test_2d / test_3d)",
             "https://huggingface.co/datasets/nyu-visionx/CV-Bench", _read_cv_parquet),
  fmt.Layout("test_[23]d.jsonl", "test_2d.jsonl / test_3d.jsonl plus the img/ folder they name",
             "https://huggingface.co/datasets/nyu-visionx/CV-Bench (repository files)", _read_cv_jsonl),
)  # fmt: skip


def load_cvbench(bench_dir: pathlib.Path, options: core.Options) -> list[core.Example]:
  del options
  _, rows = fmt.load_rows("cvbench", bench_dir, CV_LAYOUTS)
  out = []
  for n, r in enumerate(rows):
    if "choices" in r:  # HF / original: "(A) x\n(B) y" already in `prompt`
      opts = {LETTERS[i]: str(c) for i, c in enumerate(r["choices"])}
      q = str(fmt.field(r, "prompt", "question")).strip()
      prompt = q + core.MCQ_SUFFIX
    else:
      opts = _options_from_columns(r)
      q = str(fmt.field(r, "question")).strip()
      prompt = core.mcq_prompt(q, opts)
    kind = str(fmt.field(r, "type", default="")) or (
      "3D" if "3D" in str(r.get("_file", "")) else "2D"
    )
    meta = {"type": kind, "task": str(fmt.field(r, "task", "category", default="")),
            "source": str(fmt.field(r, "source", default=""))}  # fmt: skip
    ex = _example(r, n, question=q, options=opts, prompt=prompt, meta=meta)
    # The 2D and 3D files may number their questions independently: the type keeps ids unique.
    out.append(dataclasses.replace(ex, id=f"{kind}/{ex.id}"))
  return out


def aggregate_cvbench(
  examples: Sequence[core.Example], scores: Sequence[core.Scored]
) -> dict[str, Any]:
  by_source = core.group_means([e.meta["source"] for e in examples], scores)
  by_type = core.group_means([e.meta["type"] for e in examples], scores)
  plain = core.mean(core.scored_values(scores)) * 100.0
  src = {k: v["score"] for k, v in by_source.items()}
  if {"ADE20K", "COCO", "Omni3D"} <= src.keys():
    official = ((src["ADE20K"] + src["COCO"]) / 2 + src["Omni3D"]) / 2
  elif {"2D", "3D"} <= by_type.keys():  # no source column (some TSVs): the 2D/3D mean
    official = (by_type["2D"]["score"] + by_type["3D"]["score"]) / 2
  else:
    official = plain
  return {
    "headline": official,
    "official_overall": official,
    "accuracy": plain,  # lmms-eval's cv_bench_acc (a plain mean)
    "by_type": by_type,
    "by_source": by_source,
    "by_task": core.group_means([f"{e.meta['type']}/{e.meta['task']}" for e in examples], scores),
    "unparsed": sum(s.parsed == "" for s in scores),
    "n": len(examples),
  }


MMSTAR = core.Benchmark("mmstar", "MMStar", load_mmstar, score, aggregate_mmstar, max_new_tokens=16)
SEED = core.Benchmark("seedbench2plus", "SeedBench2+", load_seed, score, aggregate_by_category,
                      max_new_tokens=16)  # fmt: skip
CVBENCH = core.Benchmark("cvbench", "CV-Bench", load_cvbench, score, aggregate_cvbench,
                         max_new_tokens=16)  # fmt: skip
