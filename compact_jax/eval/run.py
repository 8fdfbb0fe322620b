"""The ``eval`` stage: greedy answers on a split, scored by k and capability.

Reads the latest checkpoint (``WORKDIR/train/checkpoints``) and a built split;
writes ``WORKDIR/eval/``:
- ``results.json``: ``by_k``, ``by_capability`` (and ``by_capability_k1``,
  ``by_qtype``, ``heldout``, ``overall``) for the model, and the same tables
  under ``baselines.majority`` (the most frequent train answer of the
  question's type) and ``baselines.text_only`` (the model with a blank image);
- ``predictions.jsonl``: one line per question with all three answers;
- ``report.md``: the markdown table also printed to the console;
- ``accuracy_by_k.png``: a bar chart of accuracy by k.

Every question of a record is asked on its own, as a first turn carrying the
short-answer instruction, so each one is scored independently of the others.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from compact_jax.data import build as build_lib
from compact_jax.data import image as image_lib
from compact_jax.data import template as template_lib
from compact_jax.eval import decode as decode_lib
from compact_jax.eval import metrics as metrics_lib
from compact_jax.eval import report as report_lib
from compact_jax.models import anyres
from compact_jax.train import loop as train_loop
from compact_jax.train import mesh as mesh_lib

RESULTS_FILE = "results.json"


def eval_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(os.fspath(workdir), "eval")


def collect_questions(
  source, *, max_examples: int = -1
) -> tuple[list[metrics_lib.Question], list[int]]:
  """Every (question, answer) turn pair of a split, with the index of its record."""
  questions, rec_index = [], []
  for i in range(len(source)):
    rec = source[i]
    conv = rec["conversations"]
    for t in range(0, len(conv) - 1, 2):
      human, gpt = conv[t], conv[t + 1]
      caps = tuple(sorted(human.get("capability", [])))
      questions.append(
        metrics_lib.Question(
          record_id=str(rec["id"]),
          turn=t // 2,
          question=template_lib.strip_placeholder(human["value"]),
          answer=gpt["value"],
          capabilities=caps,
          k=int(human.get("k", len(caps) if caps else rec.get("k", -1))),
          qtype=metrics_lib.question_type(human),
          heldout=bool(human.get("heldout", False)),
        )
      )
      rec_index.append(i)
      if 0 < max_examples <= len(questions):
        return questions, rec_index
  return questions, rec_index


def with_suffix(question: str, suffix: str) -> str:
  """The question ending in exactly one copy of the short-answer instruction."""
  q = question.strip()
  s = suffix.strip()
  if s and q.endswith(s):
    q = q[: -len(s)].strip()
  return f"{q}{suffix}" if suffix else q


def image_preprocessor(config: ml_collections.ConfigDict) -> image_lib.ImagePreprocessor:
  """How ``config``'s model takes images (one image, or tiles with
  ``config.model.dynamic_res``): the data pipeline's preprocessing, for evaluation."""
  tiling = anyres.tiling_from_config(config.model.dynamic_res, image_size=config.data.image_size)
  fill = image_lib.check_fill(config.data.get("pad_fill", image_lib.PAD_FILL), key="data.pad_fill")
  return image_lib.ImagePreprocessor(config.data.image_size, tiling, fill)


def _bucket(n: int, buckets: Sequence[int]) -> int:
  for b in sorted(buckets):
    if n <= b:
      return b
  raise ValueError(f"A prompt of {n} tokens exceeds the largest eval prompt bucket {max(buckets)}")


class Predictor:
  """Batched greedy answers with fixed shapes: batch padded, prompts bucketed."""

  def __init__(self, graphdef, params, tokenizer, template, config, mesh):
    self.params = params
    self.tokenizer = tokenizer
    self.template = template
    self.cfg = config.eval
    self.image_shape = image_preprocessor(config).image_shape
    self.mesh = mesh
    self.stop_id = template_lib.stop_id(tokenizer, template)
    self.decode = decode_lib.make_greedy_decoder(
      graphdef,
      max_new_tokens=self.cfg.max_new_tokens,
      eos_id=self.stop_id,
      pad_id=tokenizer.pad_id,
    )

  def __call__(
    self,
    prompts: Sequence[str],
    images: np.ndarray,
    has_image: np.ndarray,
    tile_layout: np.ndarray | None = None,
  ) -> list[str]:
    """Answers for up to ``eval.batch_size`` prompts; images float32[n, S, S, 3]
    (with ``model.dynamic_res``: float32[n, V, S, S, 3] and tile_layout int32[n, 4],
    from :func:`image_preprocessor`)."""
    b = self.cfg.batch_size
    n = len(prompts)
    enc = [template_lib.encode_prompt(p, self.tokenizer, self.template) for p in prompts]
    length = _bucket(max(len(e) for e in enc), self.cfg.prompt_buckets)
    tokens = np.full((b, length), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((b, length), bool)
    for i, e in enumerate(enc):
      tokens[i, length - len(e) :] = e  # left padding: answers start at one column
      mask[i, length - len(e) :] = True
    img = np.zeros((b, *self.image_shape), np.float32)
    img[:n] = images
    hi = np.zeros((b,), bool)
    hi[:n] = has_image
    # Padding rows get a one-token prompt so no row is empty.
    tokens[n:, -1] = self.tokenizer.bos_id
    mask[n:, -1] = True
    kw = {}
    if tile_layout is not None:
      kw["tile_layout"] = np.ones((b, 4), np.int32)  # padding rows: any valid layout
      kw["tile_layout"][:n] = tile_layout
    out = np.asarray(jax.device_get(self.decode(self.params, img, tokens, mask, hi, **kw)))
    answers = []
    for row in out[:n]:
      ids = [int(t) for t in row]
      if self.stop_id in ids:
        ids = ids[: ids.index(self.stop_id)]
      answers.append(self.tokenizer.decode([t for t in ids if t != self.tokenizer.pad_id]).strip())
    return answers


def run_eval(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Scores the latest checkpoint on ``config.eval.split``."""
  workdir = os.fspath(workdir)
  out_dir = eval_dir(workdir)
  results_path = os.path.join(out_dir, RESULTS_FILE)
  ckpt_step = train_loop.latest_checkpoint_step(config, workdir)
  if os.path.exists(results_path) and not config.overwrite:
    with open(results_path) as f:
      saved = json.load(f)
    if saved.get("checkpoint_step") == ckpt_step:
      logging.info("eval: finished already for step %s (%s)", ckpt_step, results_path)
      print(report_lib.markdown_report(saved))
      return saved
  os.makedirs(out_dir, exist_ok=True)

  tokenizer = build_lib.load_tokenizer(workdir)
  template = template_lib.TEMPLATES[config.data.template]
  mesh = mesh_lib.make_mesh(config.mesh)
  graphdef, params, _meta = train_loop.load_params(config, workdir, mesh)

  source = build_lib.load_split(config, workdir, config.eval.split)
  questions, rec_index = collect_questions(source, max_examples=config.eval.max_examples)
  if not questions:
    raise ValueError(f"Split {config.eval.split!r} has no question/answer pairs")
  train_source = build_lib.load_split(config, workdir, "train")
  train_qs, _ = collect_questions(train_source)
  majority = metrics_lib.MajorityBaseline.fit((q.qtype, q.answer) for q in train_qs)

  predict = Predictor(graphdef, params, tokenizer, template, config, mesh)
  suffix = config.eval.prompt_suffix
  b = config.eval.batch_size
  preds, blind = [], []
  prep = image_preprocessor(config)
  image_cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
  start = time.time()
  n_batches = math.ceil(len(questions) / b)
  with jax.set_mesh(mesh):
    for bi in range(n_batches):
      chunk = range(bi * b, min((bi + 1) * b, len(questions)))
      prompts = [with_suffix(questions[i].question, suffix) for i in chunk]
      images, layouts, has_image = [], [], []
      for i in chunk:
        r = rec_index[i]
        if r not in image_cache:
          rec = source[r]
          image_cache[r] = prep(
            rec["image"] if rec["has_image"] else None, where=f"record {rec['id']!r}"
          )
        images.append(image_cache[r][0])
        layouts.append(image_cache[r][1])
        has_image.append(bool(source[r]["has_image"]))
      images = np.stack(images)
      layouts = None if prep.tiling is None else np.stack(layouts)
      has_image = np.asarray(has_image)
      preds += predict(prompts, images, has_image, layouts)
      # The text-only baseline: the same model and prompts, a blank image.
      blind += predict(prompts, np.zeros_like(images), has_image, layouts)
      done = len(preds)
      rate = done / max(time.time() - start, 1e-9)
      if bi % 5 == 0 or bi == n_batches - 1:
        logging.info(
          "eval %d/%d questions  %.1f q/s  ETA %.0fs",
          done,
          len(questions),
          rate,
          (len(questions) - done) / max(rate, 1e-9),
        )

  correct = [metrics_lib.exact_match(p, q.answer) for p, q in zip(preds, questions)]
  correct_blind = [metrics_lib.exact_match(p, q.answer) for p, q in zip(blind, questions)]
  maj = [majority.predict(q.qtype) for q in questions]
  correct_maj = [metrics_lib.exact_match(m, q.answer) for m, q in zip(maj, questions)]

  model_table = metrics_lib.accuracy_table(questions, correct)
  results = {
    "split": config.eval.split,
    "checkpoint_step": ckpt_step,
    "num_questions": len(questions),
    **model_table,
    "baselines": {
      "majority": metrics_lib.accuracy_table(questions, correct_maj),
      "text_only": metrics_lib.accuracy_table(questions, correct_blind),
    },
  }
  with open(os.path.join(out_dir, "predictions.jsonl.tmp"), "w") as f:
    for q, p, bl, m, ok in zip(questions, preds, blind, maj, correct):
      row = {
        "id": q.record_id,
        "turn": q.turn,
        "question": q.question,
        "answer": q.answer,
        "prediction": p,
        "correct": ok,
        "text_only_prediction": bl,
        "majority_prediction": m,
        "k": q.k,
        "capability": list(q.capabilities),
        "qtype": q.qtype,
        "heldout": q.heldout,
      }
      f.write(json.dumps(row) + "\n")
  os.replace(
    os.path.join(out_dir, "predictions.jsonl.tmp"), os.path.join(out_dir, "predictions.jsonl")
  )
  report = report_lib.markdown_report(results)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(report + "\n")
  report_lib.plot_by_k(results, os.path.join(out_dir, "accuracy_by_k.png"))
  with open(results_path + ".tmp", "w") as f:
    json.dump(results, f, indent=2)
  os.replace(results_path + ".tmp", results_path)
  print(report)
  return results
