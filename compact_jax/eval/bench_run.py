"""The ``benchmarks`` stage: a checkpoint on the benchmark suite, with reports.

Writes ``WORKDIR/<bench.output_dir>/``:
- ``predictions/<benchmark>.jsonl``: per question the prompt, raw output, parsed
  answer, score (null = missing, e.g. a failed judge call), reference, k;
- ``results.json``: every metric of every benchmark, accuracy by k with 95%
  intervals, the harness version, the config and the checkpoint id;
- ``table.md``: COMPACT's results table layout, with Rel. % against
  ``bench.baseline_results`` (another run's results.json), plus the other benchmarks;
- ``scores.png`` (per-benchmark bars) and ``accuracy_by_k.png`` (with error bars).

``run_benchmarks(config, workdir)`` loads the latest checkpoint of
``config.checkpoint`` (model architecture, template and image size from its
metadata); ``evaluate_model`` runs on params already in memory. The trainer's
periodic evaluation (``config.train.eval_benchmarks``, train/loop.py) uses
``PeriodicBenchmarks``: the same loading, prompts, decoders and scoring, reduced to
scalar metrics. Generation is greedy by default with left-padded, length-bucketed
batches, so results do not depend on ``bench.batch_size``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from compact_jax.data import image as image_lib
from compact_jax.data import template as template_lib
from compact_jax.data.tokenizer import Tokenizer
from compact_jax.datagen import backends as backends_lib
from compact_jax.eval import benchmarks as benchmarks_lib
from compact_jax.eval import decode as decode_lib
from compact_jax.eval import kstrat
from compact_jax.eval.benchmarks import core, judged
from compact_jax.eval.benchmarks import judge as judge_lib
from compact_jax.models import anyres

HARNESS_VERSION = "compact_jax-bench-1"
RESULTS_FILE = "results.json"


@dataclasses.dataclass
class LoadedModel:
  """What generation needs: the model (graphdef + params), its tokenizer and template."""

  graphdef: Any
  params: Any
  tokenizer: Tokenizer
  template: template_lib.ChatTemplate
  image_size: int
  mesh: Any = None
  tiling: anyres.Tiling | None = None  # the model's dynamic resolution, if any
  pad_fill: tuple[int, int, int] = image_lib.PAD_FILL  # the train pipeline's padding colour


def _bucket(n: int, buckets: Sequence[int], *, where: str) -> int:
  for b in sorted(buckets):
    if n <= b:
      return b
  raise ValueError(f"{where}: a prompt of {n} tokens exceeds the largest bucket "
                   f"{max(buckets)} (config.bench.prompt_buckets)")  # fmt: skip


_DECODERS: dict[tuple, decode_lib.Decoder] = {}


class Generator:
  """Answers for examples, in fixed-shape batches: batch padded, prompts bucketed and
  left-padded. One compiled decoder per (max_new_tokens, bucket) pair."""

  def __init__(self, model: LoadedModel, bench_cfg: ml_collections.ConfigDict):
    self.m = model
    self.cfg = bench_cfg
    self.stop_id = template_lib.stop_id(model.tokenizer, model.template)
    self.sampling = decode_lib.Sampling(
      temperature=float(bench_cfg.temperature), top_k=int(bench_cfg.top_k),
      top_p=float(bench_cfg.top_p), seed=int(bench_cfg.sampling_seed),
    )  # fmt: skip

  def decoder(self, max_new: int) -> decode_lib.Decoder:
    key = (self.m.graphdef, max_new, self.stop_id, self.m.tokenizer.pad_id,
           self.m.tokenizer.eos_id, self.sampling)  # fmt: skip
    if key not in _DECODERS:
      # Shared across Generators: the trainer's periodic evaluation compiles once.
      _DECODERS[key] = decode_lib.make_decoder(
        self.m.graphdef, max_new_tokens=max_new, eos_id=self.stop_id,
        pad_id=self.m.tokenizer.pad_id, stop_ids=(self.m.tokenizer.eos_id,), sampling=self.sampling,
      )  # fmt: skip
    return _DECODERS[key]

  def __call__(self, examples: Sequence[core.Example], max_new: int, *, desc: str) -> list[str]:
    tok, b = self.m.tokenizer, int(self.cfg.batch_size)
    # The train pipeline's preprocessing: a model trained on tiles is asked with tiles.
    prep = image_lib.ImagePreprocessor(self.m.image_size, self.m.tiling, self.m.pad_fill)
    decoder = self.decoder(max_new)
    outputs: list[str] = []
    bar = None
    if self.cfg.progress:
      from tqdm import tqdm

      bar = tqdm(total=len(examples), desc=desc, unit="ex", file=sys.stderr, mininterval=1.0)
    start = time.time()
    for lo in range(0, len(examples), b):
      chunk = examples[lo : lo + b]
      enc = [template_lib.encode_prompt(e.prompt, tok, self.m.template) for e in chunk]
      length = max(_bucket(len(t), self.cfg.prompt_buckets, where=f"{desc} {e.id}")
                   for t, e in zip(enc, chunk))  # fmt: skip
      tokens = np.full((b, length), tok.pad_id, np.int32)
      mask = np.zeros((b, length), bool)
      for i, t in enumerate(enc):
        tokens[i, length - len(t) :] = t  # left padding
        mask[i, length - len(t) :] = True
      tokens[len(chunk) :, -1] = tok.bos_id  # padding rows: a one-token prompt
      mask[len(chunk) :, -1] = True
      images = np.zeros((b, *prep.image_shape), np.float32)
      has_image = np.zeros((b,), bool)
      kw = {} if prep.tiling is None else {"tile_layout": np.ones((b, 4), np.int32)}
      for i, e in enumerate(chunk):
        if e.image is not None:
          images[i], layout = prep(e.image, where=f"{desc} {e.id}")
          has_image[i] = True
          if layout is not None:
            kw["tile_layout"][i] = layout
      row_ids = np.arange(
        lo, lo + b, dtype=np.uint32
      )  # stable per example: sampling is batch-invariant
      out = np.asarray(
        jax.device_get(decoder(self.m.params, images, tokens, mask, has_image, row_ids, **kw))
      )
      for row in out[: len(chunk)]:
        ids = decode_lib.trim_generated(row, stop_ids=decoder.stop_ids, pad_id=tok.pad_id)
        text = decode_lib.cut_at_stop_strings(tok.decode(ids), self.cfg.stop_strings)
        outputs.append(text.strip())
      rate = len(outputs) / max(time.time() - start, 1e-9)
      if bar is not None:
        bar.update(len(chunk))
        bar.set_postfix_str(f"{rate:.2f} ex/s", refresh=False)
    if bar is not None:
      bar.close()
    logging.info("%s: %d examples in %.1fs (%.2f ex/s)", desc, len(examples), time.time() - start,
                 len(examples) / max(time.time() - start, 1e-9))  # fmt: skip
    return outputs


def parse_names(value: str | Sequence[str]) -> tuple[str, ...]:
  """Benchmark names from "mme,pope" or ("mme", "pope"); unknown names raise."""
  items = value.split(",") if isinstance(value, str) else list(value)
  names = tuple(n.strip() for n in items if str(n).strip())
  for name in names:
    benchmarks_lib.get(name)
  if len(set(names)) != len(names):
    raise ValueError(f"Benchmark names repeat: {list(names)}")
  return names


def max_new_tokens(bench: core.Benchmark, bench_cfg: ml_collections.ConfigDict) -> int:
  """The benchmark's own budget, capped by ``bench.max_new_tokens`` when that is >= 0."""
  cap = int(bench_cfg.max_new_tokens)
  return bench.max_new_tokens if cap < 0 else min(bench.max_new_tokens, cap)


def score_outputs(
  bench: core.Benchmark,
  examples: Sequence[core.Example],
  outputs: Sequence[str],
  bench_cfg: ml_collections.ConfigDict,
  judge_client: Callable[[], judge_lib.LLMClient],
) -> list[core.Scored]:
  """One Scored per output: the benchmark's metric, or its LLM judge (``judge_client``
  is called only for judged benchmarks, so the client is built only when needed)."""
  if bench.judged:
    return judged.JUDGES[bench.name](
      examples, outputs, judge_client(), reasks=int(bench_cfg.judge_reasks),
      sees_image=bool(bench_cfg.judge_sees_image),
    )  # fmt: skip
  return [bench.score(e, o) for e, o in zip(examples, outputs)]


def options_from_config(config: ml_collections.ConfigDict) -> core.Options:
  b = config.bench
  return core.Options(textvqa_ocr=bool(b.textvqa_ocr), mmvet_pre_prompt=str(b.mmvet_pre_prompt),
                      world_split=str(b.world_split), world_dataset_name=config.build.dataset_name,
                      world_suffix=config.eval.prompt_suffix)  # fmt: skip


def load_examples(
  config: ml_collections.ConfigDict, names: Sequence[str], *, checkpoint_workdir: str | os.PathLike
) -> dict[str, list[core.Example]]:
  """Every benchmark's examples, loaded before any model work so missing data fails fast."""
  options = options_from_config(config)
  data_dir = pathlib.Path(config.bench.data_dir).expanduser()
  out = {}
  for name in names:
    bench = benchmarks_lib.get(name)
    where = pathlib.Path(checkpoint_workdir) if name == "tinyworld" else data_dir / name
    examples = bench.load(where, options)
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
      dup = next(i for i in ids if ids.count(i) > 1)
      raise ValueError(f"Benchmark {name!r}: question id {dup!r} appears more than once")
    if config.bench.max_examples > 0:
      examples = examples[: config.bench.max_examples]
    out[name] = examples
  return out


def write_predictions(
  path: pathlib.Path,
  examples: Sequence[core.Example],
  outputs: Sequence[str],
  scores: Sequence[core.Scored],
  ks: Sequence[int | None] = (),
) -> None:
  """One JSON line per question: prompt, raw output, parsed answer, score (null =
  missing), reference, k, meta and the scorer's extras (judge reply, ...)."""
  with open(path, "w", encoding="utf-8") as f:
    for i, (e, o, s) in enumerate(zip(examples, outputs, scores)):
      row = {"id": e.id, "prompt": e.prompt, "output": o, "parsed": s.parsed, "score": s.score,
             "answer": e.answer, "k": ks[i] if ks else None,
             "meta": {k: v for k, v in e.meta.items() if k != "caption"}, **dict(s.extra)}  # fmt: skip
      f.write(json.dumps(_jsonable(row), ensure_ascii=False) + "\n")


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


def _write_json(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, default=str))
  os.replace(tmp, path)


def evaluate_model(
  config: ml_collections.ConfigDict,
  model: LoadedModel,
  out_dir: str | os.PathLike,
  *,
  checkpoint: dict[str, Any],
  checkpoint_workdir: str | os.PathLike,
) -> dict[str, Any]:
  """Runs ``config.bench.benchmarks`` on ``model`` and writes every report to ``out_dir``."""
  out = pathlib.Path(out_dir)
  (out / "predictions").mkdir(parents=True, exist_ok=True)
  b = config.bench
  names = list(b.benchmarks)
  all_examples = load_examples(config, names, checkpoint_workdir=checkpoint_workdir)
  generate = Generator(model, b)
  cache = out / b.cache_file
  judge_client = tagger = None

  def get_judge() -> judge_lib.LLMClient:
    nonlocal judge_client
    judge_client = judge_client or judge_lib.LLMClient(b.judge, cache)
    return judge_client

  results: dict[str, Any] = {
    "harness_version": HARNESS_VERSION,
    "checkpoint": checkpoint,
    "decoding": {"temperature": float(b.temperature), "top_k": int(b.top_k), "top_p": float(b.top_p),
                 "seed": int(b.sampling_seed), "stop_strings": list(b.stop_strings),
                 "batch_size": int(b.batch_size)},
    "benchmarks": {},
  }  # fmt: skip
  for name in names:
    bench = benchmarks_lib.get(name)
    examples = all_examples[name]
    max_new = max_new_tokens(bench, b)
    t0 = time.time()
    with jax.set_mesh(model.mesh) if model.mesh is not None else contextlib.nullcontext():
      outputs = generate(examples, max_new, desc=name)
    gen_s = time.time() - t0
    scores = score_outputs(bench, examples, outputs, b, get_judge)
    metrics = bench.aggregate(examples, scores)
    entry: dict[str, Any] = {"title": bench.title, "headline": metrics["headline"],
                             "n": len(examples), "max_new_tokens": max_new,
                             "generation_seconds": round(gen_s, 2), "metrics": metrics}  # fmt: skip
    if bench.judged:
      entry["judge_sees_image"] = bool(b.judge_sees_image)
    ks: list[int | None]
    if name == "tinyworld":
      ks = [e.meta["k"] for e in examples]
      entry["k_source"] = "exact (tiny world composer)"
    elif b.tag_k:
      tagger = tagger or judge_lib.LLMClient(b.tagger, cache)
      tags = kstrat.tag_examples(examples, tagger, benchmark=name)
      ks = [tags[e.id].k for e in examples]
      entry["k_source"] = kstrat.tagger_info(tagger)
    else:
      ks = []
    if ks:
      entry["by_k"] = kstrat.accuracy_by_k(ks, [s.score for s in scores], top=int(b.k_top_bucket))
    write_predictions(out / "predictions" / f"{name}.jsonl", examples, outputs, scores, ks)
    results["benchmarks"][name] = _jsonable(entry)
    logging.info(
      "benchmark %s: %s = %s (n=%d)", name, bench.title, metrics["headline"], len(examples)
    )
  results["config"] = _jsonable(config.to_dict())
  baseline = _load_baseline(b.baseline_results)
  table = markdown_table(results, baseline, run_name=b.run_name or checkpoint.get("path", "model"),
                         baseline_name=b.baseline_name)  # fmt: skip
  results["rel_percent"] = relative_percent(results, baseline) if baseline else None
  (out / "table.md").write_text(table + "\n")
  plot_scores(results, out / "scores.png")
  plot_by_k(results, out / "accuracy_by_k.png")
  _write_json(out / RESULTS_FILE, results)
  print(table, flush=True)
  return results


# --- the table ---------------------------------------------------------------------------------


def _load_baseline(path: str) -> dict[str, Any] | None:
  if not path:
    return None
  p = pathlib.Path(path).expanduser()
  if not p.is_file():
    raise FileNotFoundError(f"config.bench.baseline_results: {str(p)!r} does not exist")
  return json.loads(p.read_text())


def headlines(results: dict[str, Any]) -> dict[str, float | None]:
  return {k: v["headline"] for k, v in results["benchmarks"].items()}


def relative_percent(results: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
  """COMPACT's Rel. %: 100 x mean over the table's benchmarks of score / baseline score
  (MME perception raw), over the benchmarks both runs have."""
  mine, base = headlines(results), headlines(baseline)
  cols = [c for c in benchmarks_lib.COMPACT_TABLE
          if mine.get(c) is not None and base.get(c) not in (None, 0)]  # fmt: skip
  if not cols:
    return {"value": None, "benchmarks": []}
  return {"value": 100.0 * sum(mine[c] / base[c] for c in cols) / len(cols), "benchmarks": cols}


def _cell(value: float | None) -> str:
  return "-" if value is None else f"{value:.2f}"


def markdown_table(
  results: dict[str, Any], baseline: dict[str, Any] | None, *, run_name: str, baseline_name: str
) -> str:
  """COMPACT's table (InfoVQA ... LLaVA-W, Rel. %), then the other benchmarks and k tables."""
  cols = list(benchmarks_lib.COMPACT_TABLE)
  titles = [benchmarks_lib.BENCHMARKS[c].title for c in cols]
  lines = ["| Model | " + " | ".join(titles) + " | Rel. % |", "|---|" + "---:|" * (len(cols) + 1)]
  rows = [(baseline_name, baseline, "100.00" if baseline else "-")] if baseline else []
  rel = relative_percent(results, baseline) if baseline else None
  rel_text = "-" if not rel or rel["value"] is None else f"{rel['value']:.2f}"
  if rel and rel["value"] is not None and len(rel["benchmarks"]) < len(cols):
    rel_text += f" ({len(rel['benchmarks'])}/{len(cols)})"
  rows.append((run_name, results, rel_text))
  for label, res, r in rows:
    h = headlines(res)
    lines.append(f"| {label} | " + " | ".join(_cell(h.get(c)) for c in cols) + f" | {r} |")
  parts = ["\n".join(lines)]
  others = [n for n in results["benchmarks"] if n not in cols]
  if others:
    head = "| Benchmark | score | n |\n|---|---:|---:|"
    body = [f"| {results['benchmarks'][n]['title']} | {_cell(results['benchmarks'][n]['headline'])}"
            f" | {results['benchmarks'][n]['n']} |" for n in others]  # fmt: skip
    parts.append("\n".join([head, *body]))
  for entry in results["benchmarks"].values():
    by_k = entry.get("by_k")
    if not by_k:
      continue
    head = (f"Accuracy by k, {entry['title']} ({by_k['ci_method']} 95% CI; untagged "
            f"{by_k['untagged']}, unscored {by_k['unscored']})\n\n| k | n | score | 95% CI |\n|---|---:|---:|---|")  # fmt: skip
    body = [f"| {k} | {v['n']} | {100 * v['accuracy']:.1f} | [{100 * v['lo']:.1f}, {100 * v['hi']:.1f}] |"
            for k, v in by_k["by_k"].items()]  # fmt: skip
    parts.append("\n".join([head, *body]))
  return "\n\n".join(parts)


# --- plots -----------------------------------------------------------------------------------


def plot_scores(results: dict[str, Any], path: pathlib.Path) -> None:
  """One bar per benchmark headline; MME perception as % of its maximum (2000)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = [n for n, v in results["benchmarks"].items() if v["headline"] is not None]
  values = [results["benchmarks"][n]["headline"] / (20.0 if n == "mme" else 1.0) for n in names]
  labels = [results["benchmarks"][n]["title"] + (" (/20)" if n == "mme" else "") for n in names]
  fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1), 3.8))
  ax.bar(np.arange(len(names)), values, color="#4c72b0")
  for i, v in enumerate(values):
    ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
  ax.set_xticks(np.arange(len(names)), labels, rotation=30, ha="right")
  ax.set_ylabel("headline score (%)")
  ax.set_title(f"Benchmarks ({results['checkpoint'].get('id', '')})"[:90], fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_by_k(results: dict[str, Any], path: pathlib.Path) -> None:
  """Accuracy by k with 95% error bars, one series per benchmark that has k."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  series = {n: v["by_k"] for n, v in results["benchmarks"].items() if v.get("by_k", {}).get("by_k")}
  fig, ax = plt.subplots(figsize=(6.5, 3.8))
  for i, (name, by_k) in enumerate(series.items()):
    keys = list(by_k["by_k"])
    x = np.arange(len(keys)) + 0.08 * (i - (len(series) - 1) / 2)
    acc = np.array([by_k["by_k"][k]["accuracy"] for k in keys])
    lo = np.array([by_k["by_k"][k]["lo"] for k in keys])
    hi = np.array([by_k["by_k"][k]["hi"] for k in keys])
    # Rounding can put a bound a hair inside the estimate (p = 0 or 1): no negative bars.
    yerr = 100 * np.clip(np.stack([acc - lo, hi - acc]), 0.0, None)
    ax.errorbar(x, 100 * acc, yerr=yerr, marker="o", capsize=3,
                label=results["benchmarks"][name]["title"])  # fmt: skip
    for xi, k in zip(x, keys):
      ax.annotate(f"n={by_k['by_k'][k]['n']}", (xi, 100 * by_k["by_k"][k]["accuracy"]), fontsize=6,
                  textcoords="offset points", xytext=(4, 4))  # fmt: skip
    ax.set_xticks(np.arange(len(keys)), [f"k={k}" for k in keys])
  if not series:
    ax.text(0.5, 0.5, "no k labels (set config.bench.tag_k or run tinyworld)", ha="center",
            va="center", transform=ax.transAxes)  # fmt: skip
  ax.set_ylabel("score (%) with 95% CI")
  ax.set_ylim(0, 100)
  ax.set_title("Accuracy by number of capabilities k")
  ax.grid(axis="y", alpha=0.3)
  if series:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --- the stage ---------------------------------------------------------------------------------


def checkpoint_workdir(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> pathlib.Path:
  """The workdir holding the checkpoint: ``config.checkpoint`` (a workdir or its
  ``train/checkpoints`` dir) or the run's own workdir."""
  p = pathlib.Path(config.checkpoint or workdir).expanduser().resolve()
  if p.name == "checkpoints" and p.parent.name == "train":
    p = p.parent.parent
  return p


def load_model(
  config: ml_collections.ConfigDict, ckpt_workdir: pathlib.Path
) -> tuple[LoadedModel, dict]:
  """The latest checkpoint under ``ckpt_workdir`` with the model its metadata describes."""
  from compact_jax.data import build as build_lib
  from compact_jax.train import checkpoint as checkpoint_lib
  from compact_jax.train import loop as train_loop
  from compact_jax.train import mesh as mesh_lib

  step = train_loop.latest_checkpoint_step(config, ckpt_workdir)
  if step is None:
    raise FileNotFoundError(f"No checkpoint under {train_loop.checkpoint_dir(ckpt_workdir)} "
                            "(config.checkpoint names a workdir whose train stage has run)")  # fmt: skip
  ckpt = checkpoint_lib.Checkpointer(train_loop.checkpoint_dir(ckpt_workdir))
  meta = ckpt.restore_meta(step)
  ckpt.close()
  cfg = ml_collections.ConfigDict(config.to_dict())  # unlocked copy; the model is the checkpoint's
  if "model" in meta:
    cfg.model = ml_collections.ConfigDict(meta["model"])
  cfg.data.template = meta.get("template", cfg.data.template)
  cfg.data.image_size = int(meta.get("image_size", cfg.data.image_size))
  # As trained (checkpoints from before data.pad_fill: the config's).
  fill = image_lib.check_fill(meta.get("pad_fill", cfg.data.pad_fill), key="checkpoint pad_fill")
  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, params, meta = train_loop.load_params(cfg, ckpt_workdir, mesh)
  tok_path = meta.get("tokenizer", "")
  tokenizer = Tokenizer.load(tok_path) if tok_path and os.path.exists(tok_path) else build_lib.load_tokenizer(ckpt_workdir)  # fmt: skip
  # Checkpoints written before dynamic_res existed have a model config without it.
  tiling = anyres.tiling_from_config(cfg.model.get("dynamic_res"), image_size=cfg.data.image_size)
  model = LoadedModel(graphdef, params, tokenizer, template_lib.TEMPLATES[cfg.data.template],
                      cfg.data.image_size, mesh, tiling, fill)  # fmt: skip
  return model, {"path": str(ckpt_workdir), "step": step, "id": f"{ckpt_workdir}@{step}"}


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
  """The top-level numbers of a benchmark's metrics dict (``headline`` and its
  siblings; nested tables and missing values are left out)."""
  return {k: float(v) for k, v in metrics.items()
          if isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip


class PeriodicBenchmarks:
  """Benchmarks on params in memory, every N training steps (train/loop.py's eval hook).

  The stage's code path throughout: ``load_examples`` (prompts, ``config.bench.data_dir``,
  the tinyworld split of ``checkpoint_workdir``), ``Generator`` (bucketed, left-padded
  batches; one decoder per (max_new_tokens, bucket), compiled on the first call and
  shared by every later one), ``score_outputs`` (judges included) and each benchmark's
  ``aggregate``. Data is loaded here, so missing benchmark files raise ``MissingData``
  before training starts.

  Args:
    config: a config with a ``bench`` section (configs/eval.py ``bench_config``).
    names: the benchmarks to run.
    checkpoint_workdir: the training workdir (its built split is ``tinyworld``'s).
    tokenizer, template, image_size, mesh: how the trainer feeds the model.
    max_examples: the first this many questions of each benchmark (<= 0: all that
      ``config.bench.max_examples`` leaves).
    out_dir: each call writes ``<out_dir>/<step>/<benchmark>.jsonl`` predictions and
      keeps the judge cache here; None writes nothing.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    names: Sequence[str],
    *,
    checkpoint_workdir: str | os.PathLike,
    tokenizer: Tokenizer,
    template: template_lib.ChatTemplate,
    image_size: int,
    mesh: Any,
    max_examples: int,
    out_dir: str | os.PathLike | None,
  ):
    self.bench_cfg = ml_collections.ConfigDict(config.bench.to_dict())
    self.bench_cfg.progress = False  # the training log reports the eval instead
    self.names = list(names)
    self.examples = load_examples(config, self.names, checkpoint_workdir=checkpoint_workdir)
    if max_examples > 0:
      self.examples = {n: v[:max_examples] for n, v in self.examples.items()}
    for name, examples in self.examples.items():
      if not examples:
        raise ValueError(f"Benchmark {name!r} has no questions under {config.bench.data_dir}")
    tiling = anyres.tiling_from_config(config.model.dynamic_res, image_size=image_size)
    fill = image_lib.check_fill(config.data.pad_fill, key="data.pad_fill")
    self._model_parts = (tokenizer, template, image_size, mesh, tiling, fill)
    self.out_dir = pathlib.Path(out_dir) if out_dir is not None else None
    self._judge: judge_lib.LLMClient | None = None
    self._decoders: set[decode_lib.Decoder] = set()
    if any(benchmarks_lib.get(n).judged for n in self.names):
      # A judge that cannot work (the world oracle, no API key) fails before training.
      self._judge_client()
      backends_lib.api_key(self.bench_cfg.judge)

  def _judge_client(self) -> judge_lib.LLMClient:
    if self._judge is None:
      cache = self.out_dir / self.bench_cfg.cache_file if self.out_dir is not None else None
      if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
      self._judge = judge_lib.LLMClient(self.bench_cfg.judge, cache)
    return self._judge

  @property
  def num_traces(self) -> int:
    """Traces of every decoder these benchmarks used: constant after the first call."""
    return sum(d.num_traces for d in self._decoders)

  def __call__(self, graphdef: Any, params: Any, *, step: int) -> dict[str, float]:
    """``<benchmark>/<metric>`` for every scalar metric of every benchmark."""
    model = LoadedModel(graphdef, params, *self._model_parts)
    generate = Generator(model, self.bench_cfg)
    out: dict[str, float] = {}
    for name in self.names:
      bench = benchmarks_lib.get(name)
      examples = self.examples[name]
      max_new = max_new_tokens(bench, self.bench_cfg)
      self._decoders.add(generate.decoder(max_new))
      outputs = generate(examples, max_new, desc=f"{name}@{step}")
      scores = score_outputs(bench, examples, outputs, self.bench_cfg, self._judge_client)
      metrics = bench.aggregate(examples, scores)
      out.update({f"{name}/{k}": v for k, v in scalar_metrics(metrics).items()})
      if self.out_dir is not None and jax.process_index() == 0:
        step_dir = self.out_dir / str(step)
        step_dir.mkdir(parents=True, exist_ok=True)
        ks = [e.meta["k"] for e in examples] if name == "tinyworld" else []
        write_predictions(step_dir / f"{name}.jsonl", examples, outputs, scores, ks)
    return out


def run_benchmarks(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Evaluates the latest checkpoint of ``config.checkpoint`` (or ``workdir``) on
  ``config.bench.benchmarks``; returns results.json's content. A finished run for the
  same checkpoint and benchmarks is reused unless ``config.overwrite``."""
  out = pathlib.Path(workdir) / config.bench.output_dir
  ckpt_dir = checkpoint_workdir(config, workdir)
  for name in config.bench.benchmarks:
    benchmarks_lib.get(name)  # unknown names fail before anything loads
  from compact_jax.train import loop as train_loop

  step = train_loop.latest_checkpoint_step(config, ckpt_dir)
  results_path = out / RESULTS_FILE
  if results_path.exists() and not config.overwrite:
    saved = json.loads(results_path.read_text())
    if (saved.get("checkpoint", {}).get("id") == f"{ckpt_dir}@{step}"
        and list(saved.get("benchmarks", {})) == list(config.bench.benchmarks)):  # fmt: skip
      logging.info(
        "benchmarks: finished already for %s (%s)", saved["checkpoint"]["id"], results_path
      )
      return saved
  # Missing benchmark data fails here, before the checkpoint is read.
  load_examples(config, config.bench.benchmarks, checkpoint_workdir=ckpt_dir)
  model, checkpoint = load_model(config, ckpt_dir)
  return evaluate_model(config, model, out, checkpoint=checkpoint, checkpoint_workdir=ckpt_dir)
