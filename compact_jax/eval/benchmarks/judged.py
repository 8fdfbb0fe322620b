"""MM-Vet and LLaVA-Bench-in-the-Wild: free-form answers graded by an LLM judge.

Judge prompts are lmms-eval 0.7.3's (``mmvet/utils.py::MM_VET_PROMPT``;
``llava-in-the-wild/rule.json`` + ``llava_process_results``), versioned by
``PROMPT_VERSIONS``; the judge's backend, model and prompt version are recorded
with every score. Calls go through the datagen engine (``judge.LLMClient``):
cached, rate-limited, retried, budgeted. The judge reads text only, as lmms-eval's
does (the question, reference and answer; LLaVA-W adds the image captions);
``config.bench.judge_sees_image`` also sends the image, recorded as
``judge_sees_image`` with every score since a judge that sees it may grade differently.

Deliberate differences from lmms-eval (shared/reference/
data_formats_benchmarks_metrics.md §3.1, §4 items 9-10): a failed call or a reply
that still does not parse after one re-ask is MISSING (``Scored.score is None``),
excluded from the means and counted; lmms-eval scores MM-Vet failures 0 and LLaVA-W
failures [-1, -1], which silently biases both.

- MM-Vet: score in [0, 1] per question; total = mean x 100; per capability means.
  Prompt: the question alone (LLaVA-1.5); lmms-eval adds a "think step by step"
  pre-prompt (``config.bench.mmvet_pre_prompt`` reproduces it).
- LLaVA-W: the judge scores the reference GPT-4 answer and the model's answer
  1-10 given the image captions; the headline is the relative score
  mean(model) / mean(reference) x 100, as LLaVA's ``summarize_gpt_review.py``
  prints first; per category (conv, detail, complex) too.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Sequence
from typing import Any

from compact_jax.eval.benchmarks import core
from compact_jax.eval.benchmarks import formats as fmt
from compact_jax.eval.benchmarks import judge as judge_lib

PROMPT_VERSIONS = {"mmvet": "mmvet-lmms-eval-0.7.3", "llava_wild": "llava-w-rule-lmms-eval-0.7.3"}

MM_VET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.
gpt_query_prompt | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""

# rule.json's "llava_bench_{conv,detail,complex}" prompts (identical text).
LLAVA_W_RULE = (
  "We would like to request your feedback on the performance of two AI assistants in response "
  "to the user question displayed above. The user asks the question on observing an image. For "
  "your reference, the visual content in the image is represented with a few sentences "
  "describing the image. \nPlease rate the helpfulness, relevance, accuracy, level of details of "
  "their responses. Each assistant receives an overall score on a scale of 1 to 10, where a "
  "higher score indicates better overall performance.\nPlease first output a single line "
  "containing only two values indicating the scores for Assistant 1 and 2, respectively. The two "
  "scores are separated by a space.\nIn the subsequent line, please provide a comprehensive "
  "explanation of your evaluation, avoiding any potential bias and ensuring that the order in "
  "which the responses were presented does not affect your judgment."
)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
MMVET_CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")


def mmvet_query(question: str, answer: str, prediction: str) -> str:
  gt = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
  return f"{MM_VET_PROMPT}\n{question} | {gt} | {prediction} |"


def parse_mmvet(text: str) -> float | None:
  """The grade in [0, 1]: lmms-eval reads the first space-separated token; if that is
  not a number we take the first number in the reply. None if neither is in range."""
  first = text.strip().split(" ")[0].strip() if text.strip() else ""
  try:
    value = float(first)
  except ValueError:
    m = _NUMBER.search(text)
    value = float(m.group()) if m else None
  return value if value is not None and 0.0 <= value <= 1.0 else None


def llavaw_query(question: str, captions: str, reference: str, prediction: str) -> str:
  role = "Assistant"
  return (
    f"[Context]\n{captions}\n\n[Question]\n{question}\n\n[{role} 1]\n{reference}\n\n"
    f"[End of {role} 1]\n\n[{role} 2]\n{prediction}\n\n[End of {role} 2]\n\n"
    f"[System]\n{LLAVA_W_RULE}\n\n"
  )


def parse_llavaw(text: str) -> tuple[float, float] | None:
  """(reference score, model score) from the first line, as lmms-eval's
  ``_parse_comparative_scores``; None instead of its [-1, -1] when absent."""
  lines = text.strip().split("\n")
  numbers = _NUMBER.findall(lines[0].replace(",", " ").replace(";", " ")) if lines else []
  if len(numbers) < 2:
    return None
  a, b = float(numbers[0]), float(numbers[1])
  return (a, b) if 0 <= a <= 10 and 0 <= b <= 10 else None


def _judge(
  examples: Sequence[core.Example],
  outputs: Sequence[str],
  client: judge_lib.LLMClient,
  *,
  name: str,
  query,
  parse,
  kind: str,
  reasks: int,
  sees_image: bool,
) -> list[core.Scored]:
  info = {"judge": client.describe(), "prompt_version": PROMPT_VERSIONS[name],
          "judge_sees_image": sees_image}  # fmt: skip
  texts = [query(ex, out) for ex, out in zip(examples, outputs)]
  parsed: list[Any] = [None] * len(examples)
  raw: list[str | None] = [None] * len(examples)
  errors = [""] * len(examples)
  todo = list(range(len(examples)))
  for attempt in range(reasks + 1):
    calls = [judge_lib.LLMCall(f"{name}/{examples[i].id}", examples[i].image if sees_image else None,
                               "", texts[i], kind=kind, attempt=attempt) for i in todo]  # fmt: skip
    replies = client.run(calls)
    retry = []
    for i, reply in zip(todo, replies):
      if reply.text is None:
        errors[i] = reply.error  # the engine already retried transport failures
        continue
      raw[i] = reply.text
      parsed[i] = parse(reply.text)
      if parsed[i] is None:
        errors[i] = f"unparseable judge reply: {reply.text[:200]!r}"
        retry.append(i)
      else:
        errors[i] = ""
    todo = retry
    if not todo:
      break
  out = []
  for i in range(len(examples)):
    extra = {**info, "judge_reply": raw[i], "judge_error": errors[i]}
    if parsed[i] is None:
      out.append(core.Scored(None, None, extra))
    elif name == "mmvet":
      out.append(core.Scored(parsed[i], parsed[i], extra))
    else:
      ref, model = parsed[i]
      out.append(core.Scored(list(parsed[i]), model / ref if ref else None,
                             {**extra, "reference_score": ref, "model_score": model}))  # fmt: skip
  return out


def judge_mmvet(
  examples: Sequence[core.Example], outputs: Sequence[str], client: judge_lib.LLMClient, *,
  reasks: int = 1, sees_image: bool = False,
) -> list[core.Scored]:  # fmt: skip
  """One Scored per example; ``sees_image`` sends the benchmark image with the grading
  prompt (lmms-eval's judge is text-only: False)."""
  return _judge(
    examples, outputs, client, name="mmvet", kind="verification", reasks=reasks,
    sees_image=sees_image,
    query=lambda ex, out: mmvet_query(ex.question, ex.answer, out), parse=parse_mmvet,
  )  # fmt: skip


def judge_llavaw(
  examples: Sequence[core.Example], outputs: Sequence[str], client: judge_lib.LLMClient, *,
  reasks: int = 1, sees_image: bool = False,
) -> list[core.Scored]:  # fmt: skip
  """As ``judge_mmvet``; the judge sees the captions (LLaVA's protocol), and the image
  only with ``sees_image``."""
  return _judge(
    examples, outputs, client, name="llava_wild", kind="generation", reasks=reasks,
    sees_image=sees_image,
    query=lambda ex, out: llavaw_query(ex.question, ex.meta["caption"], ex.answer, out),
    parse=parse_llavaw,
  )  # fmt: skip


def _judge_summary(scores: Sequence[core.Scored]) -> dict[str, Any]:
  first = next((s.extra for s in scores if s.extra), {})
  missing = [s for s in scores if s.score is None]
  return {
    "judge": first.get("judge"),
    "judge_prompt_version": first.get("prompt_version"),
    "judge_sees_image": first.get("judge_sees_image"),
    "judged": len(scores) - len(missing),
    "missing": len(missing),
    "missing_reasons": sorted({s.extra.get("judge_error", "")[:120] for s in missing}),
  }


# --- MM-Vet -------------------------------------------------------------------------------


def _read_mmvet_original(files: list[pathlib.Path], bench_dir: pathlib.Path) -> list[fmt.Row]:
  """mm-vet.json ({"v1_0": {"imagename", "capability": [...], "question", "answer"}, ...})
  with images/ next to it (mm-vet.zip unzips both into mm-vet/)."""
  if len(files) > 1:
    raise ValueError(f"MM-Vet: more than one mm-vet.json under {bench_dir}: {files}")
  rows = []
  for qid, r in fmt.read_json(files[0]).items():
    where = f"{files[0]} [{qid!r}]"
    rows.append({**r, "question_id": qid, "capability": list(r["capability"]),
                 "image": fmt.read_image_file(files[0].parent / "images", r["imagename"], where=where),
                 "_where": where})  # fmt: skip
  return rows


MMVET_LAYOUTS = (
  fmt.Layout("MMVet.tsv", "VLMEvalKit's MMVet.tsv",
             "https://opencompass.openxlab.space/utils/VLMEval/MMVet.tsv", fmt.read_tsv),
  fmt.Layout("**/*.parquet", "the parquet shards of lmms-lab/MMVet",
             "https://huggingface.co/datasets/lmms-lab-encoder/MMVet (was lmms-lab/MMVet)", fmt.read_parquet),
  fmt.Layout("**/mm-vet.json", "mm-vet.json plus the images/ folder next to it (unzipped mm-vet.zip)",
             "https://github.com/yuweihao/MM-Vet/releases (mm-vet.zip)", _read_mmvet_original),
)  # fmt: skip


def load_mmvet(bench_dir: pathlib.Path, options: core.Options) -> list[core.Example]:
  _, rows = fmt.load_rows("mmvet", bench_dir, MMVET_LAYOUTS)
  out = []
  for n, r in enumerate(rows):
    q = str(fmt.field(r, "question")).strip()
    caps = fmt.field(r, "capability", "category", default="")
    caps = (
      caps if isinstance(caps, list) else [c.strip() for c in str(caps).split(",") if c.strip()]
    )
    out.append(core.Example(
      id=str(fmt.field(r, "question_id", "index", default=n)), question=q,
      prompt=options.mmvet_pre_prompt + q, image=r["image"], answer=str(fmt.field(r, "answer")),
      meta={"capabilities": caps},
    ))  # fmt: skip
  return out


def aggregate_mmvet(
  examples: Sequence[core.Example], scores: Sequence[core.Scored]
) -> dict[str, Any]:
  total = core.mean(core.scored_values(scores))
  by_cap = {}
  for cap in MMVET_CAPABILITIES:
    vals = [s.score for e, s in zip(examples, scores) if cap in e.meta["capabilities"] and s.score is not None]  # fmt: skip
    if vals:
      by_cap[cap] = {"score": 100.0 * sum(vals) / len(vals), "n": len(vals)}
  return {
    "headline": None if total is None else 100.0 * total,
    "total": None if total is None else 100.0 * total,
    "by_capability": by_cap,
    **_judge_summary(scores),
    "n": len(examples),
  }


# --- LLaVA-Bench-in-the-Wild -------------------------------------------------------------------


def _read_llavaw_original(files: list[pathlib.Path], bench_dir: pathlib.Path) -> list[fmt.Row]:
  questions = fmt.read_jsonl(files[0])
  answers = {r["question_id"]: r["text"] for r in fmt.read_jsonl(bench_dir / "answers_gpt4.jsonl")}
  context = {r["image"]: r["caption"] for r in fmt.read_jsonl(bench_dir / "context.jsonl")}
  rows = []
  for n, r in enumerate(questions):
    where = f"{files[0]} line {n + 1}"
    if r["question_id"] not in answers or r["image"] not in context:
      raise ValueError(f"{where}: question {r['question_id']} has no GPT-4 answer or no context")
    rows.append({"question_id": r["question_id"], "question": r["text"], "category": r["category"],
                 "gpt_answer": answers[r["question_id"]], "caption": context[r["image"]],
                 "image": fmt.read_image_file(bench_dir / "images", r["image"], where=where),
                 "_where": where})  # fmt: skip
  return rows


LLAVAW_LAYOUTS = (
  fmt.Layout("LLaVABench.tsv", "VLMEvalKit's LLaVABench.tsv",
             "https://opencompass.openxlab.space/utils/VLMEval/LLaVABench.tsv", fmt.read_tsv),
  fmt.Layout("**/*.parquet", "the parquet shards of lmms-lab/llava-bench-in-the-wild",
             "https://huggingface.co/datasets/lmms-lab-encoder/llava-bench-in-the-wild (was lmms-lab/llava-bench-in-the-wild)", fmt.read_parquet),
  fmt.Layout("questions.jsonl", "questions.jsonl, answers_gpt4.jsonl, context.jsonl and images/",
             "https://huggingface.co/datasets/liuhaotian/llava-bench-in-the-wild",
             _read_llavaw_original),
)  # fmt: skip


def load_llavaw(bench_dir: pathlib.Path, options: core.Options) -> list[core.Example]:
  del options
  _, rows = fmt.load_rows("llava_wild", bench_dir, LLAVAW_LAYOUTS)
  out = []
  for n, r in enumerate(rows):
    q = str(fmt.field(r, "question")).strip()
    caption = fmt.field(r, "caption", default="")
    caption = "\n".join(caption) if isinstance(caption, list) else str(caption)
    out.append(core.Example(
      id=str(fmt.field(r, "question_id", "index", default=n)), question=q, prompt=q,
      image=r["image"], answer=str(fmt.field(r, "gpt_answer", "gpt4_ans")),
      meta={"caption": caption, "category": str(fmt.field(r, "category", default="all"))},
    ))  # fmt: skip
  return out


def _relative(pairs: list[tuple[float, float]]) -> dict[str, float]:
  ref = sum(p[0] for p in pairs) / len(pairs)
  model = sum(p[1] for p in pairs) / len(pairs)
  return {"relative": 100.0 * model / ref if ref else 0.0, "reference_x10": 10 * ref,
          "model_x10": 10 * model, "n": len(pairs)}  # fmt: skip


def aggregate_llavaw(
  examples: Sequence[core.Example], scores: Sequence[core.Scored]
) -> dict[str, Any]:
  pairs: dict[str, list[tuple[float, float]]] = {}
  for e, s in zip(examples, scores):
    if s.parsed is not None:
      pairs.setdefault(e.meta["category"], []).append(tuple(s.parsed))
  everything = [p for v in pairs.values() for p in v]
  overall = _relative(everything) if everything else None
  return {
    "headline": overall["relative"] if overall else None,
    "overall": overall,
    "by_category": {k: _relative(v) for k, v in sorted(pairs.items())},
    **_judge_summary(scores),
    "n": len(examples),
  }


MMVET = core.Benchmark("mmvet", "MM-Vet", load_mmvet, None, aggregate_mmvet, max_new_tokens=1024,
                       judged=True)  # fmt: skip
LLAVA_WILD = core.Benchmark("llava_wild", "LLaVA-W", load_llavaw, None, aggregate_llavaw,
                            max_new_tokens=4096, judged=True)  # fmt: skip
JUDGES = {"mmvet": judge_mmvet, "llava_wild": judge_llavaw}
