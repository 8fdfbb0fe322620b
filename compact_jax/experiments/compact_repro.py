r"""Issue 8: does compositional tuning generalise to higher k? Arms x seeds, one report.

  python -m compact_jax.main --config=configs/experiments/compact_repro.py --workdir=DIR
  python -m compact_jax.main --config=configs/experiments/compact_repro.py:smoke --workdir=DIR

The recipe (world, model, vision tower, caption phase, question phase, eval) is
``configs/tiny_world.get_config()``; the experiment changes only what each arm's
training questions are. Arms (``config.experiment.arms``, named so they sort as
the paper lists them):

- ``a_compact``: k in {1, 2, 3}, balanced (COMPACT's k_gen);
- ``b_atomic``: k = 1 only;
- ``c_natural``: k over 1..3 weighted like LLaVA-665K as COMPACT annotated it;
- ``d_large``: 10x the questions (and images) with the natural weights, the same
  number of optimisation steps: the stand-in for "full LLaVA-665K".

Every arm gets exactly ``budget_factor * experiment.train_questions`` training
questions (``world.num_train_questions``), and every arm trains for
``train.total_steps`` steps. With one world seed, arms c and d draw image i from the
same random stream, so c's training set is a prefix of d's, as a subset of 665K is.

Per seed ``s`` the layout under the workdir is::

  seed{s}/stage1/  the recipe's stages but train and eval: generate (a_compact's
                   train split + THE test split), build (+ captions, the
                   tokenizer), vision, pretrain
  seed{s}/<arm>/   generate (train only; not for the arm whose images stage1 made),
                   build (train = the arm's, test = stage1's, tokenizer = stage1's),
                   vision, pretrain -> ../stage1/... (symlinks), train, eval

So the arm-independent work (the vision tower and the caption phase, "stage 1" as
LLaVA's arms share it) runs once per seed, and every arm's question phase starts
from it as the recipe says (``train.init_from = "pretrain"``). The test split is made once per seed,
after every arm's train split, and repeats none of their scenes
(``world.test_avoids_scenes``); the report checks that every arm answered the same
test questions (by hash) and counts exact train/test overlaps per arm.

Each sub-run goes through the launcher's ``run`` with its own config, so finished
stages are skipped and interrupted ones resume: rerunning the command continues
where it stopped. ``DIR/report.json``, ``report.md`` and ``by_k.png`` come last.

Budget (2-core CPU, measured per stage for the default recipe on an idle machine:
generate ~115 images/s, vision 75 s, caption phase 573 s, question phase 524 s,
eval 20 s): stage 1 ~12 min per seed; arms a-c ~10 min each; arm d ~17 min
(~40,000 images to generate and build, then the same 600 steps). About 60 min per
seed, **about 3 h for the default 3 seeds**; each arm-seed stays under 30 min.
These are estimates from those stage timings, not a measured full run. The smoke
variant (2 seeds, tiny everything; ~20 sub-runs, compile-bound) took 6.5 min with a
cold compile cache on this machine while other jobs loaded it ~5x; the 3-min
target assumes an idle machine and a warm cache (unmeasured).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from compact_jax.eval import kstrat
from compact_jax.eval import metrics as metrics_lib
from compact_jax.eval import run as eval_run
from compact_jax.train import loop as train_loop

STAGE1 = "stage1"
# What each arm-seed runs on top of stage 1; stage 1 is every other recipe stage.
ARM_STAGES = ("build", "train", "eval")
# Stage-1 outputs an arm's train phase may start from (train.init_from = "pretrain",
# or model_init.path = "vision/img.npz"): linked into every arm's workdir.
SHARED_OUTPUTS = ("vision", "pretrain")
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT = "by_k.png"
REQUIRED_PREDICTION_KEYS = (
  "id",
  "turn",
  "question",
  "answer",
  "correct",
  "k",
  "capability",
  "heldout",
  "majority_prediction",
  "text_only_prediction",
)

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond:
# the Cornish-Fisher expansion, within 1e-4 there).
_T975 = (
  12.7062,
  4.3027,
  3.1824,
  2.7764,
  2.5706,
  2.4469,
  2.3646,
  2.3060,
  2.2622,
  2.2281,
  2.2010,
  2.1788,
  2.1604,
  2.1448,
  2.1314,
  2.1199,
  2.1098,
  2.1009,
  2.0930,
  2.0860,
  2.0796,
  2.0739,
  2.0687,
  2.0639,
  2.0595,
  2.0555,
  2.0518,
  2.0484,
  2.0452,
  2.0423,
)


def t_quantile_975(df: int) -> float:
  """The 97.5th percentile of Student's t with ``df`` degrees of freedom."""
  if df < 1:
    raise ValueError(f"t quantile needs df >= 1, got {df}")
  if df <= len(_T975):
    return _T975[df - 1]
  z = kstrat.Z95
  return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df * df)


# --- arms and sub-run configs ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arm:
  """One training-data arm: which k its questions have and how many there are."""

  name: str
  train_k: tuple[int, ...]
  train_k_weights: tuple[float, ...]  # () = uniform over train_k
  num_train_questions: int

  @property
  def mean_k(self) -> float:
    w = np.asarray(self.train_k_weights or [1.0] * len(self.train_k), np.float64)
    return float(np.dot(w / w.sum(), self.train_k))


def base_train_questions(config: ml_collections.ConfigDict) -> int:
  """``experiment.train_questions``, or (0) what the recipe's train images carry on average."""
  if config.experiment.train_questions > 0:
    return int(config.experiment.train_questions)
  lo, hi = config.world.questions_per_image
  return round(config.world.num_train_images * (lo + hi) / 2)


def arms_from_config(config: ml_collections.ConfigDict) -> list[Arm]:
  """The arms, sorted by name, validated against the rest of ``config.experiment``."""
  e = config.experiment
  base = base_train_questions(config)
  arms = []
  for name, a in e.arms.items():
    if not name.replace("_", "").isalnum() or name == STAGE1:
      raise ValueError(f"config.experiment.arms: bad arm name {name!r} (letters, digits, _)")
    if a.budget_factor < 1:
      raise ValueError(f"config.experiment.arms.{name}.budget_factor must be >= 1")
    arms.append(Arm(name, tuple(a.train_k), tuple(a.train_k_weights), int(a.budget_factor * base)))
  names = [a.name for a in arms]
  for key in ("stage1_arm", "reference_arm"):
    if e[key] not in names:
      raise ValueError(f"config.experiment.{key}={e[key]!r} is not an arm ({names})")
  for pair in e.comparisons:
    if len(pair) != 2 or any(p not in names for p in pair):
      raise ValueError(f"config.experiment.comparisons: {pair!r} must name two arms of {names}")
  if not e.seeds or len(set(e.seeds)) != len(e.seeds):
    raise ValueError(f"config.experiment.seeds must be distinct and non-empty: {e.seeds}")
  return arms


def _sub_config(
  config: ml_collections.ConfigDict, seed: int, stages: Sequence[str]
) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.seed = int(seed)
  c.stages = tuple(stages)
  return c


def _set_arm_world(c: ml_collections.ConfigDict, arm: Arm) -> None:
  c.world.train_k = arm.train_k
  c.world.train_k_weights = arm.train_k_weights
  c.world.num_train_questions = arm.num_train_questions


def stage1_config(
  config: ml_collections.ConfigDict, seed: int, arms: Sequence[Arm]
) -> ml_collections.ConfigDict:
  """Stage 1 of a seed: the stage-1 arm's train images, the test split, tower, captions."""
  first = {a.name: a for a in arms}[config.experiment.stage1_arm]
  c = _sub_config(config, seed, stage1_stages(config))
  _set_arm_world(c, first)
  c.world.test_avoids_scenes = tuple(
    f"../{a.name}/generate/scenes/train.jsonl" for a in arms if a.name != first.name
  )
  c.lock()
  return c


def arm_config(
  config: ml_collections.ConfigDict, workdir: str, seed: int, arm: Arm, stages: Sequence[str]
) -> ml_collections.ConfigDict:
  """An arm-seed sub-run: its own train split on top of stage 1's test split and weights."""
  c = _sub_config(config, seed, stages)
  _set_arm_world(c, arm)
  c.world.num_test_images = 0  # the seed's one test split is stage 1's
  s1 = f"../{STAGE1}/generate"
  own = arm.name != config.experiment.stage1_arm
  c.build.records = ml_collections.ConfigDict(
    {
      "train": ("generate/train.jsonl",) if own else (f"{s1}/train.jsonl",),
      "test": (f"{s1}/test.jsonl",),
    }
  )
  # The arm's images first: train ids repeat across arms (tw_train_000000 ...).
  c.build.image_roots = ("generate", s1) if own else (s1,)
  # The caption phase's vocabulary, so stage 1's embeddings mean the same tokens.
  c.build.tokenizer_file = os.path.abspath(
    os.path.join(workdir, f"seed{seed}", STAGE1, "build", "tokenizer.model")
  )
  c.lock()
  return c


def stage1_stages(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The recipe's stages but the question phase and eval, in order."""
  recipe = tuple(config.experiment.recipe_stages)
  missing = [s for s in ("generate", "build", *ARM_STAGES) if s not in recipe]
  if missing:
    raise ValueError(f"config.experiment.recipe_stages {recipe} lacks {missing}")
  return tuple(s for s in recipe if s not in ARM_STAGES[1:])


def _link_stage1_outputs(arm_dir: Path) -> None:
  """``arm_dir/{vision,pretrain}`` -> ``../stage1/...``: where the arm's train phase
  looks for the weights it starts from."""
  arm_dir.mkdir(parents=True, exist_ok=True)
  for name in SHARED_OUTPUTS:
    link = arm_dir / name
    target = os.path.join("..", STAGE1, name)
    if link.is_symlink():
      if os.readlink(link) == target:
        continue
      link.unlink()
    elif link.exists():
      raise FileExistsError(f"{link} is a real directory; the experiment links it to {target}")
    link.symlink_to(target, target_is_directory=True)


# --- running -----------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
  """One sub-run: a config, a workdir, and how to tell it has finished."""

  seed: int
  name: str
  kind: str  # "generate" | "stage1" | "arm": tasks of a kind take similar time
  workdir: Path
  config: ml_collections.ConfigDict
  finished: Callable[[], bool]
  prepare: Callable[[], None] = lambda: None


def _phase_finished(config, workdir: Path, phase: str) -> bool:
  step = train_loop.latest_checkpoint_step(config, workdir, phase)
  return step is not None and step >= config[phase].total_steps


def _stage1_finished(config, workdir: Path) -> bool:
  last = stage1_stages(config)[-1]
  if last in train_loop.TRAIN_PHASES:
    return _phase_finished(config, workdir, last)
  marker = {"vision": "vision/report.json", "build": "build/build_report.json"}
  return (workdir / marker.get(last, "generate/summary.json")).exists()


def _eval_finished(config, workdir: Path) -> bool:
  path = workdir / "eval" / eval_run.RESULTS_FILE
  if not path.exists():
    return False
  return json.loads(path.read_text()).get("checkpoint_step") == config.train.total_steps


def plan(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[Task]:
  """Every sub-run in order: per seed, the arms' train splits, stage 1, the arms."""
  workdir = os.fspath(workdir)
  arms = arms_from_config(config)
  first = config.experiment.stage1_arm
  tasks = []
  for seed in config.experiment.seeds:
    root = Path(workdir) / f"seed{seed}"
    for arm in arms:
      if arm.name != first:
        c = arm_config(config, workdir, seed, arm, ("generate",))
        d = root / arm.name
        tasks.append(
          Task(
            seed,
            f"{arm.name}/generate",
            "generate",
            d,
            c,
            lambda d=d: (d / "generate" / "summary.json").exists(),
          )
        )
    c1, d1 = stage1_config(config, seed, arms), root / STAGE1
    tasks.append(Task(seed, STAGE1, "stage1", d1, c1, lambda c=c1, d=d1: _stage1_finished(c, d)))
    for arm in arms:
      c, d = arm_config(config, workdir, seed, arm, ARM_STAGES), root / arm.name
      tasks.append(
        Task(
          seed,
          arm.name,
          "arm",
          d,
          c,
          lambda c=c, d=d: _eval_finished(c, d),
          prepare=lambda d=d: _link_stage1_outputs(d),
        )
      )
  return tasks


def _eta(tasks: Sequence[Task], durations: Mapping[str, list[float]]) -> float | None:
  """Seconds the unfinished ``tasks`` should take, from this process's timings by kind."""
  measured = [t for ts in durations.values() for t in ts]
  if not measured:
    return None
  fallback = sum(measured) / len(measured)
  return sum(
    (sum(durations[t.kind]) / len(durations[t.kind])) if durations.get(t.kind) else fallback
    for t in tasks
  )


def _fmt(seconds: float | None) -> str:
  if seconds is None:
    return "?"
  return str(datetime.timedelta(seconds=round(seconds)))


def run_experiment(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  run_stages: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
) -> dict[str, Any]:
  """Runs (or resumes) every sub-run of ``plan``, then writes the report; returns it.

  Args:
    run_stages: runs a sub-config's stages in a workdir; the launcher passes its
      own ``run`` (default: ``compact_jax.main.run``).
  """
  if run_stages is None:
    from compact_jax import main as launcher

    run_stages = launcher.run
  tasks = plan(config, workdir)
  durations: dict[str, list[float]] = collections.defaultdict(list)
  t_start = time.monotonic()
  for i, task in enumerate(tasks):
    # A finished sub-run is not even reloaded (its train stage would rebuild the
    # state only to find the last step done), unless --overwrite asks to redo it.
    done = task.finished() and not config.overwrite
    todo = [t for t in tasks[i:] if not t.finished()]
    print(
      f"[experiment] {i + 1}/{len(tasks)} seed {task.seed} {task.name}"
      f"{' finished, skipped' if done else ''}; elapsed "
      f"{_fmt(time.monotonic() - t_start)}, ETA {_fmt(_eta(todo, durations))} "
      f"for {len(todo)} unfinished sub-run(s)",
      flush=True,
    )
    if done:
      continue
    task.prepare()
    t0 = time.monotonic()
    run_stages(task.config, os.fspath(task.workdir))
    durations[task.kind].append(time.monotonic() - t0)
  report = build_report(config, workdir)
  print(report["markdown"], flush=True)
  return report


# --- the report --------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}: line {n + 1} is not JSON ({e})") from None
  return rows


def read_predictions(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
  """(record id, turn) -> the eval stage's predictions row."""
  if not path.exists():
    raise FileNotFoundError(f"{path} is missing: that arm-seed has not been evaluated")
  out = {}
  for row in _read_jsonl(path):
    for key in REQUIRED_PREDICTION_KEYS:
      if key not in row:
        raise ValueError(f"{path}: a row lacks {key!r}: {row}")
    out[(str(row["id"]), int(row["turn"]))] = row
  return out


def scored_questions_hash(preds: Mapping[tuple[str, int], Mapping[str, Any]]) -> str:
  """sha256 of the questions an arm was scored on (ids, texts, answers, k, capabilities)."""
  h = hashlib.sha256()
  for key in sorted(preds):
    r = preds[key]
    h.update(
      json.dumps([*key, r["question"], r["answer"], r["k"], r["capability"], r["heldout"]]).encode()
    )
  return h.hexdigest()


def question_text(human_value: str, suffix: str) -> str:
  """A question as asked, without the image placeholder and the short-answer instruction."""
  q = human_value.replace("<image>", "").strip()
  s = suffix.strip()
  if s and q.endswith(s):
    q = q[: -len(s)].strip()
  return q


def _questions_with_scenes(gen_dir: Path, split: str, suffix: str) -> list[tuple[str, str, int]]:
  """(scene hash, question text, k) of every question of a generated split."""
  records = _read_jsonl(gen_dir / f"{split}.jsonl")
  scenes = _read_jsonl(gen_dir / "scenes" / f"{split}.jsonl")
  if [r["id"] for r in records] != [s["id"] for s in scenes]:
    raise ValueError(f"{gen_dir}: {split}.jsonl and scenes/{split}.jsonl list different ids")
  out = []
  for rec, sc in zip(records, scenes):
    for turn in rec["conversations"][0::2]:
      out.append((sc["hash"], question_text(turn["value"], suffix), int(turn["k"])))
  return out


def overlap_report(train_dir: Path, test_dir: Path, suffix: str) -> dict[str, Any]:
  """Exact test/train overlaps: same scene and question; same scene; same question text."""
  train = _questions_with_scenes(train_dir, "train", suffix)
  test = _questions_with_scenes(test_dir, "test", suffix)
  pairs = {(h, q) for h, q, _ in train}
  scenes = {h for h, _, _ in train}
  texts = {q for _, q, _ in train}
  by_k: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
  for _, q, k in test:
    by_k[str(k)][0] += q in texts
    by_k[str(k)][1] += 1
  return {
    "train_questions": len(train),
    "test_questions": len(test),
    "scene_and_question": sum((h, q) in pairs for h, q, _ in test),
    "test_scenes_in_train": len({h for h, _, _ in test} & scenes),
    "question_text": sum(q in texts for _, q, _ in test),
    "question_text_by_k": {
      k: {"overlap": v[0], "n": v[1], "fraction": v[0] / v[1]}
      for k, v in sorted(by_k.items(), key=lambda kv: int(kv[0]))
    },
  }


def _groups(row: Mapping[str, Any], top_k: int) -> Iterable[tuple[str, str]]:
  """The (section, key) tables a question counts in."""
  k = int(row["k"])
  yield "overall", "all"
  yield "by_k", str(k)
  if k >= top_k:
    yield "by_k", f"{top_k}+"
  for cap in row["capability"]:
    yield "by_capability", cap
    if k == 1:
      yield "by_capability_k1", cap
  yield "heldout", "heldout" if row["heldout"] else "seen"


def seed_summary(per_seed: Sequence[Sequence[float]], *, binary: bool = True) -> dict[str, Any]:
  """Mean over seeds of per-seed means, a 95% t-interval over seeds, and (for 0/1
  scores) the pooled Wilson interval of all questions.

  Args:
    per_seed: for each seed, the scores (0/1, or differences) of one group's
      questions; a seed with none gets ``None`` in ``per_seed`` and is left out.
  """
  accs = [float(np.mean(v)) if len(v) else None for v in per_seed]
  valid = np.asarray([a for a in accs if a is not None], np.float64)
  mean = float(valid.mean())
  half = None
  if len(valid) >= 2:
    half = t_quantile_975(len(valid) - 1) * float(valid.std(ddof=1)) / math.sqrt(len(valid))
  successes = float(sum(sum(v) for v in per_seed))
  n = sum(len(v) for v in per_seed)
  pooled = {"accuracy": successes / n, "n": n}
  if binary:
    pooled["lo"], pooled["hi"] = kstrat.wilson_interval(successes, n)
  return {
    "mean": mean,
    "half_width": half,  # None with fewer than two seeds
    "lo": None if half is None else mean - half,
    "hi": None if half is None else mean + half,
    "per_seed": accs,
    "n_per_seed": [len(v) for v in per_seed],
    "pooled": pooled,
  }


def _sort_key(key: str):
  return (0, int(key.rstrip("+")), key) if key.rstrip("+").isdigit() else (1, 0, key)


def arm_tables(
  preds_by_seed: Sequence[Mapping[tuple[str, int], Mapping[str, Any]]], top_k: int
) -> dict[str, dict[str, dict[str, Any]]]:
  """section -> key -> ``seed_summary`` of one arm's per-seed predictions."""
  scores: dict[tuple[str, str], list[list[float]]] = collections.defaultdict(
    lambda: [[] for _ in preds_by_seed]
  )
  for s, preds in enumerate(preds_by_seed):
    for row in preds.values():
      for group in _groups(row, top_k):
        scores[group][s].append(float(bool(row["correct"])))
  out: dict[str, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
  for (section, key), per_seed in sorted(
    scores.items(), key=lambda kv: (kv[0][0], _sort_key(kv[0][1]))
  ):
    out[section][key] = seed_summary(per_seed)
  return dict(out)


def paired_comparison(
  a_by_seed: Sequence[Mapping[tuple[str, int], Mapping[str, Any]]],
  b_by_seed: Sequence[Mapping[tuple[str, int], Mapping[str, Any]]],
  top_k: int,
  *,
  resamples: int,
) -> dict[str, dict[str, dict[str, Any]]]:
  """A minus B per group, paired on the same test questions of each seed.

  Two intervals: a 95% t-interval over the per-seed differences (the seed is the
  unit that replicates training; this is the one verdicts use), and a paired
  percentile bootstrap over the questions pooled across seeds
  (``kstrat.bootstrap_interval`` of per-question differences), which sees only
  question sampling and is narrower.
  """
  diffs: dict[tuple[str, str], list[list[float]]] = collections.defaultdict(
    lambda: [[] for _ in a_by_seed]
  )
  for s, (a, b) in enumerate(zip(a_by_seed, b_by_seed)):
    if set(a) != set(b):
      raise ValueError(f"seed index {s}: the two arms were scored on different questions")
    for key, ra in a.items():
      d = float(bool(ra["correct"])) - float(bool(b[key]["correct"]))
      for group in _groups(ra, top_k):
        if group[0] in ("by_k", "heldout", "overall"):
          diffs[group][s].append(d)
  out: dict[str, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
  for (section, key), per_seed in sorted(
    diffs.items(), key=lambda kv: (kv[0][0], _sort_key(kv[0][1]))
  ):
    summary = seed_summary(per_seed, binary=False)
    pooled = [d for v in per_seed for d in v]
    lo, hi = kstrat.bootstrap_interval(pooled, seed=0, resamples=resamples)
    out[section][key] = {
      "difference": summary["mean"],
      "half_width": summary["half_width"],
      "lo": summary["lo"],
      "hi": summary["hi"],
      "per_seed": summary["per_seed"],
      "n_per_seed": summary["n_per_seed"],
      "bootstrap": {"difference": float(np.mean(pooled)), "lo": lo, "hi": hi, "n": len(pooled)},
    }
  return dict(out)


def verdict(a: str, b: str, comparison: Mapping[str, Any], key: str, n_seeds: int) -> str:
  """One honest sentence: a significant difference with its size, or none."""
  c = comparison.get("by_k", {}).get(key)
  if c is None:
    return f"{a} vs {b} at k={key}: no test questions with that k."
  boot = c["bootstrap"]
  if c["half_width"] is not None:
    d, half, lo, hi = c["difference"], c["half_width"], c["lo"], c["hi"]
    how = f"95% t-interval over {n_seeds} seeds"
  else:  # one seed: only question sampling can be assessed
    d, lo, hi = boot["difference"], boot["lo"], boot["hi"]
    half = max(d - lo, hi - d)
    how = "95% paired bootstrap over questions, 1 seed: training variance unassessed"
  extra = f"; paired bootstrap over {boot['n']} questions [{boot['lo']:+.3f}, {boot['hi']:+.3f}]"
  if lo > 0:
    return f"{a} beats {b} at k={key} by {d:+.3f} ± {half:.3f} ({how}{extra})."
  if hi < 0:
    return f"{a} is worse than {b} at k={key} by {d:+.3f} ± {half:.3f} ({how}{extra})."
  return f"No significant effect of {a} vs {b} at k={key}: {d:+.3f} ± {half:.3f} ({how}{extra})."


def relative_scores(
  tables: Mapping[str, Mapping[str, Any]], reference: str, ks: Sequence[str]
) -> dict[str, Any]:
  """The paper's Rel. %: 100 x the mean over k buckets of score / the reference arm's score.

  From the mean-over-seeds accuracy of each bucket (``rel``) and per seed
  (``per_seed``, with its mean and t-interval). Buckets where the reference scores
  0 are left out (listed).
  """
  ref = tables[reference]["by_k"]
  usable = [k for k in ks if k in ref and ref[k]["mean"] > 0]
  out = {"buckets": usable, "skipped_buckets": [k for k in ks if k not in usable], "arms": {}}
  for arm, t in tables.items():
    rel = None
    if usable:
      rel = 100 * float(np.mean([t["by_k"][k]["mean"] / ref[k]["mean"] for k in usable]))
    n_seeds = len(ref[usable[0]]["per_seed"]) if usable else 0
    per_seed = []
    for s in range(n_seeds):
      ratios = [
        t["by_k"][k]["per_seed"][s] / ref[k]["per_seed"][s]
        for k in usable
        if ref[k]["per_seed"][s] and t["by_k"][k]["per_seed"][s] is not None
      ]
      per_seed.append(100 * float(np.mean(ratios)) if ratios else None)
    summary = None
    if any(v is not None for v in per_seed):
      summary = seed_summary([[] if v is None else [v] for v in per_seed], binary=False)
    out["arms"][arm] = {
      "rel": rel,
      "per_seed": per_seed,
      "per_seed_mean": summary and summary["mean"],
      "half_width": summary and summary["half_width"],
    }
  return out


def baseline_rows(
  preds: Mapping[tuple[str, int], Mapping[str, Any]], baseline: str
) -> dict[tuple[str, int], dict[str, Any]]:
  """Predictions rows re-scored with a baseline's answer (``majority`` or ``text_only``)."""
  field = f"{baseline}_prediction"
  return {
    key: {**row, "correct": metrics_lib.exact_match(row[field], row["answer"])}
    for key, row in preds.items()
  }


def build_report(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Reads every arm-seed's predictions and writes ``report.json``, ``report.md``, ``by_k.png``."""
  e = config.experiment
  root = Path(workdir)
  arms = arms_from_config(config)
  names = [a.name for a in arms]
  seeds = list(e.seeds)
  top_k = int(e.verdict_k)
  preds = {
    a: [read_predictions(root / f"seed{s}" / a / "eval" / "predictions.jsonl") for s in seeds]
    for a in names
  }
  # Paired comparisons need every arm scored on the same questions of a seed.
  test_hashes = {}
  for i, s in enumerate(seeds):
    hashes = {a: scored_questions_hash(preds[a][i]) for a in names}
    if len(set(hashes.values())) != 1:
      raise ValueError(f"seed {s}: arms were scored on different test questions: {hashes}")
    test_hashes[str(s)] = next(iter(hashes.values()))
  suffix = config.world.answer_suffix
  overlap = {
    str(s): {
      a.name: overlap_report(
        root / f"seed{s}" / (STAGE1 if a.name == e.stage1_arm else a.name) / "generate",
        root / f"seed{s}" / STAGE1 / "generate",
        suffix,
      )
      for a in arms
    }
    for s in seeds
  }
  tables = {a: arm_tables(preds[a], top_k) for a in names}
  ks = sorted({k for t in tables.values() for k in t["by_k"] if k.isdigit()}, key=int)
  comparisons = {
    f"{a}-{b}": paired_comparison(preds[a], preds[b], top_k, resamples=e.bootstrap_resamples)
    for a, b in e.comparisons
  }
  verdict_key = f"{top_k}+"
  verdicts = {
    f"{a}-{b}": verdict(a, b, comparisons[f"{a}-{b}"], verdict_key, len(seeds))
    for a, b in e.comparisons
  }
  baselines = {
    a: {
      name: {
        k: v["mean"]
        for k, v in arm_tables([baseline_rows(p, name) for p in preds[a]], top_k)["by_k"].items()
      }
      for name in ("majority", "text_only")
    }
    for a in names
  }
  report = {
    "date": datetime.date.today().isoformat(),
    "seeds": seeds,
    "arms": {
      a.name: {
        "train_k": list(a.train_k),
        "train_k_weights": list(a.train_k_weights),
        "mean_k": a.mean_k,
        "train_questions": a.num_train_questions,
      }
      for a in arms
    },
    "train_steps": int(config.train.total_steps),
    "pretrain_steps": int(config.pretrain.total_steps),
    "verdict_k": top_k,
    "test_split_sha256": test_hashes,
    "test_questions_per_seed": [len(p) for p in preds[names[0]]],
    "overlap": overlap,
    "tables": tables,
    "baselines": baselines,
    "relative_to": e.reference_arm,
    "relative": relative_scores(tables, e.reference_arm, ks),
    "comparisons": comparisons,
    "verdicts": verdicts,
  }
  report["markdown"] = markdown_report(report, ks)
  root.mkdir(parents=True, exist_ok=True)
  (root / REPORT_MD).write_text(report["markdown"] + "\n")
  plot_by_k(report, ks, str(root / PLOT))
  tmp = root / (REPORT_JSON + ".tmp")
  tmp.write_text(json.dumps(report, indent=1))
  os.replace(tmp, root / REPORT_JSON)
  logging.info("experiment report: %s", root / REPORT_JSON)
  return report


def _cell(entry: Mapping[str, Any] | None, digits: int = 3) -> str:
  if entry is None:
    return "-"
  m = entry.get("mean", entry.get("difference"))
  if entry.get("half_width") is None:
    return f"{m:.{digits}f}"
  return f"{m:.{digits}f} ± {entry['half_width']:.{digits}f}"


def markdown_report(report: Mapping[str, Any], ks: Sequence[str]) -> str:
  """The report's tables as markdown (means over seeds ± 95% t half-widths)."""
  names = list(report["arms"])
  top = f"{report['verdict_k']}+"
  cols = [*ks, top]
  n = len(report["seeds"])
  lines = [
    f"# COMPACT tiny-world experiment ({report['date']})",
    "",
    f"Seeds {report['seeds']}; question phase {report['train_steps']} steps from a shared "
    f"caption phase of {report['pretrain_steps']} steps per seed; "
    f"{report['test_questions_per_seed']} test questions per seed (the same for every arm). "
    f"Cells: mean over {n} seeds ± the 95% t-interval half-width.",
    "",
    "**Verdicts (k ≥ {}):**".format(report["verdict_k"]),
    "",
    *[f"- {v}" for v in report["verdicts"].values()],
    "",
    "| arm | train k | weights | mean k | train questions |",
    "|---|---|---|---:|---:|",
  ]
  for a, info in report["arms"].items():
    w = ", ".join(f"{v:.2f}" for v in info["train_k_weights"]) or "uniform"
    lines.append(
      f"| {a} | {info['train_k']} | {w} | {info['mean_k']:.2f} | {info['train_questions']} |"
    )
  lines += [
    "",
    "## Accuracy by k",
    "",
    "| arm | " + " | ".join(f"k={k}" for k in cols) + " |",
    "|---|" + "---:|" * len(cols),
  ]
  for a in names:
    row = report["tables"][a]["by_k"]
    lines.append(f"| {a} | " + " | ".join(_cell(row.get(k)) for k in cols) + " |")
  for base in ("majority", "text_only"):
    b = report["baselines"][names[0]][base]
    lines.append(
      f"| {base} ({names[0]}) | "
      + " | ".join(f"{b[k]:.3f}" if k in b else "-" for k in cols)
      + " |"
    )
  rel = report["relative"]
  lines += [
    "",
    f"## Rel. % vs {report['relative_to']} (mean over k = {rel['buckets']})",
    "",
    "| arm | Rel. % (of seed means) | per seed |",
    "|---|---:|---|",
  ]
  for a, r in rel["arms"].items():
    value = "-" if r["rel"] is None else f"{r['rel']:.1f}"
    per_seed = ", ".join("-" if v is None else f"{v:.1f}" for v in r["per_seed"])
    lines.append(f"| {a} | {value} | {per_seed} |")
  caps = sorted({c for a in names for c in report["tables"][a].get("by_capability", {})})
  for section, title in (("by_capability", "any k"), ("by_capability_k1", "k = 1")):
    lines += [
      "",
      f"## Accuracy by capability ({title})",
      "",
      "| capability | " + " | ".join(names) + " |",
      "|---|" + "---:|" * len(names),
    ]
    for c in caps:
      lines.append(
        f"| {c} | "
        + " | ".join(_cell(report["tables"][a].get(section, {}).get(c)) for a in names)
        + " |"
      )
  lines += [
    "",
    "## Held-out capability combinations",
    "",
    "| arm | seen | held-out |",
    "|---|---:|---:|",
  ]
  for a in names:
    h = report["tables"][a].get("heldout", {})
    lines.append(f"| {a} | {_cell(h.get('seen'))} | {_cell(h.get('heldout'))} |")
  lines += [
    "",
    "## Paired differences (A − B, same test questions)",
    "",
    "| A − B | " + " | ".join(f"k={k}" for k in cols) + " | held-out |",
    "|---|" + "---:|" * (len(cols) + 1),
  ]
  for pair, comp in report["comparisons"].items():
    cells = [_cell(comp["by_k"].get(k)) for k in cols]
    cells.append(_cell(comp.get("heldout", {}).get("heldout")))
    lines.append(f"| {pair} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "## Exact test/train overlap",
    "",
    "| seed | arm | same scene + question | test scenes in train | same question text "
    "(all k) | same text, k ≥ 4 |",
    "|---|---|---:|---:|---:|---:|",
  ]
  for s, per_arm in report["overlap"].items():
    for a, o in per_arm.items():
      hi = [v for k, v in o["question_text_by_k"].items() if int(k) >= report["verdict_k"]]
      hi_txt = f"{sum(v['overlap'] for v in hi)}/{sum(v['n'] for v in hi)}"
      lines.append(
        f"| {s} | {a} | {o['scene_and_question']} | {o['test_scenes_in_train']} | "
        f"{o['question_text']}/{o['test_questions']} | {hi_txt} |"
      )
  lines += [
    "",
    "Test split sha256 per seed: "
    + ", ".join(f"{s}: {h[:12]}" for s, h in report["test_split_sha256"].items()),
  ]
  return "\n".join(lines)


def plot_by_k(report: Mapping[str, Any], ks: Sequence[str], path: str) -> None:
  """Accuracy by k per arm, error bars = 95% t-intervals over seeds (Wilson with one seed)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(report["arms"])
  x = np.arange(len(ks), dtype=np.float64)
  fig, ax = plt.subplots(figsize=(7, 4))
  for i, a in enumerate(names):
    rows = [report["tables"][a]["by_k"][k] for k in ks]
    means = np.asarray([r["mean"] for r in rows])
    if rows[0]["half_width"] is not None:
      err = np.asarray([r["half_width"] for r in rows])
      err = np.stack([err, err])
    else:
      err = np.stack(
        [means - [r["pooled"]["lo"] for r in rows], [r["pooled"]["hi"] for r in rows] - means]
      )
    offset = (i - (len(names) - 1) / 2) * 0.08
    ax.errorbar(x + offset, means, yerr=err, marker="o", capsize=3, label=a)
  maj = report["baselines"][names[0]]["majority"]
  ax.plot(x, [maj[k] for k in ks], "k--", alpha=0.5, label=f"majority ({names[0]})")
  ax.set_xticks(x, [f"k={k}" for k in ks])
  ax.set_ylabel("exact-match accuracy")
  ax.set_ylim(0, 1)
  ax.set_title(f"Accuracy by k, mean over {len(report['seeds'])} seeds (95% CI)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
