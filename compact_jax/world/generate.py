"""The ``generate`` stage: tiny-world images, LLaVA/COMPACT records, scene graphs.

Writes under ``WORKDIR/generate/``:

- ``images/{split}/{id}.png``: RGB, ``world.image_size`` square;
- ``{split}.jsonl``: one LLaVA/COMPACT record per image (2-3 question turns, all
  with the image's k; human turns carry ``capability``, ``k``, ``qtype`` and
  ``heldout``; only the first carries ``<image>\\n`` and the answer suffix);
- ``captions.jsonl``: one dense-caption record per train image
  (``world/caption.py``), the data of the caption phase ``config.pretrain``;
- ``scenes/{split}.jsonl``: the scene graph, the question programs and the
  sampling statistics of each image, under the same id;
- ``summary.json``: counts per split, k, capability, qtype and answer, held-out
  counts, rejections and the test/train overlap;
- ``settings.json``: the settings the files were made with (a resumed run must
  match them).

Image i of a split depends only on ``np.random.default_rng([seed, split_code, i])``
(and, for test, on the set of train scenes it must not repeat: this run's and those
of ``world.test_avoids_scenes``), so a run can stop anywhere and resume: complete
lines are kept, a torn last line is dropped, and generation continues at the next
index, giving the same bytes as a run that never stopped. Train is generated before
test.

Equal-budget comparisons (``configs/experiments/compact_repro.py``) set
``world.train_k_weights`` (how train images' k is drawn; () keeps the uniform draw
and its exact bytes) and ``world.num_train_questions`` (exactly that many train
questions: images are added until the count is reached and the last one keeps only
the questions still needed).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from compact_jax import capabilities as caps_lib
from compact_jax.world import caption as caption_lib
from compact_jax.world import compose as compose_lib
from compact_jax.world import questions as q_lib
from compact_jax.world import render as render_lib
from compact_jax.world import scene as scene_lib
from compact_jax.world.rand import Rand

SPLITS = ("train", "test")
SPLIT_CODES = {"train": 0, "test": 1}
SOURCE = "tiny_world"
# Retry budgets. A capability set with no valid question in a scene is redrawn
# (a "rejection"); a scene that cannot carry the minimum number of questions,
# or that repeats a train scene in test, is redrawn too.
MAX_COMBINATION_TRIES = 40
MAX_SCENE_DRAWS = 50
MAX_FAILURES_PER_SET = 2  # per image: retrying a set that failed twice rarely pays
# k=1 images draw scenes of at most this many objects: the atomic question about
# an object's colour, shape or region can only ask about an object that is alone.
K1_MAX_OBJECTS = 3
PROGRESS_EVERY_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class WorldSettings:
  """The ``config.world`` keys (plus the seed) the stage reads, validated."""

  seed: int
  image_size: int
  grid_size: int
  min_objects: int
  max_objects: int
  max_distractors: int
  num_images: dict[str, int]
  train_k: tuple[int, ...]
  # Probabilities of train_k's values (normalised); () = uniform.
  train_k_weights: tuple[float, ...]
  # Exact number of train questions (0: num_images["train"] images instead).
  num_train_questions: int
  test_k: tuple[int, ...]
  questions_per_image: tuple[int, int]
  capability_weights: dict[str, float]
  heldout_combinations: tuple[tuple[str, ...], ...]
  heldout_test_rate: float
  answer_suffix: str
  max_attempts_per_question: int
  # Scene files (relative to the workdir) whose scenes test must not repeat either.
  test_avoids_scenes: tuple[str, ...]
  num_workers: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> WorldSettings:
    w = config.world
    weights = dict(w.capability_weights)
    caps_lib.canonical(weights, where="config.world.capability_weights")
    if any(v <= 0 for v in weights.values()):
      raise ValueError(f"config.world.capability_weights must be positive, got {weights}")
    heldout = tuple(
      caps_lib.canonical(s.split("+"), where=f"config.world.heldout_combinations {s!r}")
      for s in w.heldout_combinations
    )
    lo, hi = (int(v) for v in w.questions_per_image)
    if not 1 <= lo <= hi:
      raise ValueError(
        f"config.world.questions_per_image must be (lo, hi), 1 <= lo <= hi: {lo, hi}"
      )
    for key in ("train_k", "test_k"):
      ks = tuple(getattr(w, key))
      if not ks or any(not 1 <= k <= len(caps_lib.CAPABILITIES) for k in ks):
        raise ValueError(f"config.world.{key} must hold values in 1..10, got {ks}")
    train_k_weights = tuple(float(v) for v in w.train_k_weights)
    if train_k_weights and (
      len(train_k_weights) != len(w.train_k)
      or any(not v >= 0 for v in train_k_weights)
      or sum(train_k_weights) <= 0
    ):
      raise ValueError(
        "config.world.train_k_weights must be () or one non-negative weight per "
        f"config.world.train_k value {tuple(w.train_k)}, not all zero; got {train_k_weights}"
      )
    if w.num_train_questions < 0:
      raise ValueError(
        f"config.world.num_train_questions must be >= 0 (0 = off), got {w.num_train_questions}"
      )
    render_lib.cell_geometry(w.image_size, w.grid_size)  # fails on undrawable sizes
    cells = (3 * w.grid_size * w.grid_size) // 4
    if not 1 <= w.min_objects <= w.max_objects <= cells or w.max_distractors < 0:
      raise ValueError(
        f"config.world: need 1 <= min_objects <= max_objects <= {cells} (3/4 of the cells) "
        f"and max_distractors >= 0, got {w.min_objects}, {w.max_objects}, {w.max_distractors}"
      )
    return cls(
      seed=int(config.seed),
      image_size=int(w.image_size),
      grid_size=int(w.grid_size),
      min_objects=int(w.min_objects),
      max_objects=int(w.max_objects),
      max_distractors=int(w.max_distractors),
      # With num_train_questions the image count follows from it (0 here: not a setting).
      num_images={
        "train": 0 if w.num_train_questions else int(w.num_train_images),
        "test": int(w.num_test_images),
      },
      train_k=tuple(int(k) for k in w.train_k),
      train_k_weights=tuple(v / sum(train_k_weights) for v in train_k_weights),
      num_train_questions=int(w.num_train_questions),
      test_k=tuple(int(k) for k in w.test_k),
      questions_per_image=(lo, hi),
      capability_weights=weights,
      heldout_combinations=heldout,
      heldout_test_rate=float(w.heldout_test_rate),
      answer_suffix=str(w.answer_suffix),
      max_attempts_per_question=int(w.max_attempts_per_question),
      test_avoids_scenes=tuple(str(p) for p in w.test_avoids_scenes),
      num_workers=int(w.num_workers),
    )

  def to_json(self) -> dict[str, Any]:
    """The settings that determine the output (not how many processes made it)."""
    d = json.loads(json.dumps(dataclasses.asdict(self)))
    del d["num_workers"]
    # Keys added later are left out at their defaults, so that settings.json (and
    # resuming a partial run) stays as it was for configs that do not use them.
    for key, off in (("train_k_weights", []), ("num_train_questions", 0),
                     ("test_avoids_scenes", [])):  # fmt: skip
      if d[key] == off:
        del d[key]
    return d


@dataclasses.dataclass
class Example:
  """One generated image: its record, scene record and pixels."""

  record: dict[str, Any]
  scene_record: dict[str, Any]
  image: np.ndarray  # uint8[S, S, 3]

  def png(self) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(self.image, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def example_id(split: str, index: int) -> str:
  return f"tw_{split}_{index:06d}"


def _ask_questions(
  scene: scene_lib.Scene,
  k: int,
  split: str,
  s: WorldSettings,
  rng: Rand,
  stats: collections.Counter,
) -> tuple[scene_lib.Scene, list[q_lib.Question]]:
  """COMPACT's per-image loop: 2-3 questions, each on a fresh capability set."""
  lo, hi = s.questions_per_image
  n_questions = rng.integers(lo, hi + 1)
  heldout = set(s.heldout_combinations)
  heldout_k = sorted(c for c in heldout if len(c) == k)
  force_heldout = split == "test" and heldout_k and rng.random() < s.heldout_test_rate
  used_caps: set[str] = set()
  used_combos: set[tuple[str, ...]] = set()
  failed: collections.Counter = collections.Counter()  # sets that found no question here
  questions: list[q_lib.Question] = []
  # The scene each question was last fully verified on (None: only screened since).
  verified_on: list[scene_lib.Scene | None] = []
  # Leave a quarter of the cells empty: ropes need clear paths between objects.
  max_objects = (3 * s.grid_size * s.grid_size) // 4
  for slot in range(n_questions):
    # A question beyond the minimum is optional: give up on it sooner.
    tries = MAX_COMBINATION_TRIES if slot < lo else MAX_COMBINATION_TRIES // 4
    for attempt in range(tries):
      if force_heldout and slot == 0 and attempt < len(heldout_k) * 4:
        combo = rng.choice(heldout_k)
      else:
        # COMPACT prefers capabilities the image has not used; after half the tries
        # (e.g. k=5, where the second question is forced onto the complement) any.
        used = used_caps if attempt < tries // 2 else ()
        combo = compose_lib.sample_capability_set(rng, k, used=used, weights=s.capability_weights)
      if combo in used_combos or failed[combo] >= MAX_FAILURES_PER_SET:
        continue
      if split == "train" and combo in heldout:
        stats["heldout_skipped"] += 1
        continue
      got = compose_lib.compose_with_distractors(
        scene,
        combo,
        rng,
        max_new_objects=s.max_distractors,
        max_objects=max_objects,
        keep=questions,
        max_attempts=s.max_attempts_per_question,
      )
      if got is None:
        stats["rejections"] += 1
        failed[combo] += 1
        continue
      if got.scene is not scene:
        verified_on = [None] * len(questions)
      scene, questions = got.scene, [*got.earlier, got.question]
      verified_on.append(scene)
      used_combos.add(combo)
      used_caps.update(combo)
      break
  # Planting for later questions may have changed the scene under earlier ones,
  # which were only screened then: verify those fully on the final scene.
  final = [
    q if on is scene else compose_lib.reverified(scene, q, rng)
    for q, on in zip(questions, verified_on)
  ]
  stats["dropped_at_final_check"] += sum(q is None for q in final)
  return scene, [q for q in final if q is not None]


def generate_example(
  s: WorldSettings, split: str, index: int, train_hashes: frozenset[str] = frozenset()
) -> Example:
  """Image ``index`` of ``split``: a deterministic function of its arguments."""
  root = np.random.default_rng([s.seed, SPLIT_CODES[split], index])
  if split == "train" and s.train_k_weights:
    k = int(root.choice(s.train_k, p=s.train_k_weights))
  else:  # the uniform draw stays a separate call: its stream is what old runs made
    k = int(root.choice(s.train_k if split == "train" else s.test_k))
  rng = Rand.spawn(root)
  stats: collections.Counter = collections.Counter()
  lo, _ = s.questions_per_image
  heldout = set(s.heldout_combinations)
  for _ in range(MAX_SCENE_DRAWS):
    hi = min(s.max_objects, max(s.min_objects, K1_MAX_OBJECTS)) if k == 1 else s.max_objects
    scene = scene_lib.sample_scene(
      rng, grid_size=s.grid_size, min_objects=s.min_objects, max_objects=hi
    )
    scene, questions = _ask_questions(scene, k, split, s, rng, stats)
    if len(questions) < lo:
      stats["scene_redraws"] += 1
      continue
    if split != "train" and scene_lib.scene_hash(scene) in train_hashes:
      stats["train_overlap_redraws"] += 1
      continue
    break
  else:
    raise RuntimeError(
      f"{split} image {index}: no scene carried {lo} questions with k={k} "
      f"in {MAX_SCENE_DRAWS} draws (stats {dict(stats)})"
    )
  ex_id = example_id(split, index)
  conversations = []
  for i, q in enumerate(questions):
    text = f"<image>\n{q.text}{s.answer_suffix}" if i == 0 else q.text
    conversations.append(
      {
        "from": "human",
        "value": text,
        "capability": list(q.capabilities),
        "k": q.k,
        "qtype": q.qtype,
        "heldout": q.capabilities in heldout,
      }
    )
    conversations.append({"from": "gpt", "value": q.answer})
  record = {
    "id": ex_id,
    "image": f"images/{split}/{ex_id}.png",
    "k": k,
    "source": SOURCE,
    "conversations": conversations,
  }
  scene_record = {
    "id": ex_id,
    "scene": scene.to_json(),
    "hash": scene_lib.scene_hash(scene),
    "questions": [
      {"program": q.program.to_json(), "answer": q.answer, "capability": list(q.capabilities)}
      for q in questions
    ],
    "stats": dict(sorted(stats.items())),
  }
  return Example(record, scene_record, render_lib.render_scene(scene, s.image_size))


# --- files ----------------------------------------------------------------------


def _complete_lines(path: Path) -> list[bytes]:
  """The file's lines that end in a newline and parse as JSON (a torn tail is dropped)."""
  if not path.exists():
    return []
  data = path.read_bytes()
  lines = data.split(b"\n")[:-1]  # the piece after the last newline is torn or empty
  out = []
  for n, line in enumerate(lines):
    try:
      json.loads(line)
    except json.JSONDecodeError as e:
      if n == len(lines) - 1:
        break  # a torn last line that happens to end in a newline
      raise ValueError(f"{path}: line {n + 1} is not valid JSON ({e})") from None
    out.append(line)
  return out


def _rewrite(path: Path, lines: list[bytes]) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_bytes(b"".join(line + b"\n" for line in lines))
  os.replace(tmp, path)


def _resume_point(out: Path, split: str) -> int:
  """How many images of a split are complete; trims both JSONL files to that."""
  rec_path, scene_path = out / f"{split}.jsonl", out / "scenes" / f"{split}.jsonl"
  recs, scenes = _complete_lines(rec_path), _complete_lines(scene_path)
  n = min(len(recs), len(scenes))
  for i in range(n):
    want = example_id(split, i)
    for path, line in ((rec_path, recs[i]), (scene_path, scenes[i])):
      got = json.loads(line).get("id")
      if got != want:
        raise ValueError(f"{path}: line {i + 1} has id {got!r}, expected {want!r}")
  for path, lines in ((rec_path, recs), (scene_path, scenes)):
    keep = lines[:n]
    if path.exists() and path.read_bytes() != b"".join(line + b"\n" for line in keep):
      _rewrite(path, keep)
  return n


def _scene_hashes(path: Path) -> set[str]:
  hashes = set()
  for n, line in enumerate(_complete_lines(path)):
    d = json.loads(line)
    scene = scene_lib.Scene.from_json(d["scene"], where=f"{path}:{n + 1} ({d.get('id')})")
    hashes.add(scene_lib.scene_hash(scene))
  return hashes


def _train_hashes(out: Path, s: WorldSettings) -> frozenset[str]:
  """Scenes test must not repeat: this run's train scenes and ``test_avoids_scenes``'."""
  hashes = _scene_hashes(out / "scenes" / "train.jsonl")
  for rel in s.test_avoids_scenes:
    path = out.parent / rel  # out is WORKDIR/generate
    if not path.is_file():
      raise FileNotFoundError(
        f"config.world.test_avoids_scenes names {rel!r}, but {path} does not exist: generate "
        "those train scenes first"
      )
    hashes |= _scene_hashes(path)
  return frozenset(hashes)


def _save_bytes(path: Path, data: bytes) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


# Worker processes get the settings once, then return finished lines and PNG bytes.
_WORKER_ARGS: tuple[WorldSettings, str, frozenset[str]] | None = None


def _init_worker(s: WorldSettings, split: str, train_hashes: frozenset[str]) -> None:
  global _WORKER_ARGS
  _WORKER_ARGS = (s, split, train_hashes)


def _encoded_example(index: int) -> tuple[str, str, str, bytes]:
  s, split, train_hashes = _WORKER_ARGS
  ex = generate_example(s, split, index, train_hashes)
  return (
    ex.record["image"],
    json.dumps(ex.scene_record, separators=(",", ":")),
    json.dumps(ex.record, separators=(",", ":")),
    ex.png(),
  )


def _encoded_examples(
  s: WorldSettings, split: str, indices: range, train_hashes: frozenset[str]
) -> Iterator[tuple[str, str, str, bytes]]:
  """(image path, scene line, record line, PNG) per index, in order."""
  workers = s.num_workers if s.num_workers >= 0 else (os.cpu_count() or 1)
  workers = min(workers, len(indices) // 8)  # not worth a process for a handful
  if workers <= 1:
    _init_worker(s, split, train_hashes)
    yield from map(_encoded_example, indices)
    return
  # spawn, not fork: the parent may hold JAX's threads, which fork does not copy.
  # An executor, not a Pool: a worker that dies raises BrokenProcessPool instead of
  # being replaced forever (as when a script without a __main__ guard is re-run).
  with concurrent.futures.ProcessPoolExecutor(
    workers, multiprocessing.get_context("spawn"), _init_worker, (s, split, train_hashes)
  ) as pool:
    yield from pool.map(_encoded_example, indices, chunksize=4)


def _question_count(line: bytes) -> int:
  return len(json.loads(line)["conversations"]) // 2


def _trimmed(scene_line: str, record_line: str, n_questions: int) -> tuple[str, str]:
  """The lines of an image keeping only its first ``n_questions`` questions.

  The scene keeps any distractors planted for the dropped ones: every kept question
  was verified on the final scene, so it stays exact.
  """
  scene, record = json.loads(scene_line), json.loads(record_line)
  scene["questions"] = scene["questions"][:n_questions]
  record["conversations"] = record["conversations"][: 2 * n_questions]
  dump = functools.partial(json.dumps, separators=(",", ":"))
  return dump(scene), dump(record)


def _generate_split(out: Path, split: str, s: WorldSettings) -> None:
  """Appends images of ``split`` until it has its images (or, with
  ``num_train_questions``, its train questions: the last image keeps only as many
  questions as are still needed)."""
  by_questions = split == "train" and s.num_train_questions > 0
  start = _resume_point(out, split)
  want = s.num_train_questions if by_questions else s.num_images[split]
  have = start
  if by_questions:
    have = sum(map(_question_count, _complete_lines(out / f"{split}.jsonl")))
    if have > want:
      raise ValueError(
        f"{out / split}.jsonl holds {have} questions, more than num_train_questions={want}"
      )
  if have >= want:
    return
  train_hashes = _train_hashes(out, s) if split != "train" else frozenset()
  (out / "images" / split).mkdir(parents=True, exist_ok=True)
  if start:
    logging.info("generate %s: resuming at image %d (%d of %d)", split, start, have, want)
  unit = "questions" if by_questions else "images"
  t0 = last = time.monotonic()
  have0 = have
  index = start
  with (
    open(out / f"{split}.jsonl", "a", encoding="utf-8") as rec_f,
    open(out / "scenes" / f"{split}.jsonl", "a", encoding="utf-8") as scene_f,
  ):
    while have < want:
      # Each image holds at most questions_per_image[1] questions, so a batch this
      # size cannot overshoot by more than one image (whose questions are trimmed).
      batch = -(-(want - have) // s.questions_per_image[1]) if by_questions else want - have
      examples = _encoded_examples(s, split, range(index, index + batch), train_hashes)
      for image, scene_line, record_line, png in examples:
        n = _question_count(record_line) if by_questions else 1
        if have + n > want:
          scene_line, record_line = _trimmed(scene_line, record_line, want - have)
          n = want - have
        # Image first, then scene, then record: a record line implies both exist.
        _save_bytes(out / image, png)
        scene_f.write(scene_line + "\n")
        scene_f.flush()
        rec_f.write(record_line + "\n")
        rec_f.flush()
        have += n
        index += 1
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_SECONDS or have >= want:
          rate = (have - have0) / max(now - t0, 1e-9)
          print(
            f"generate {split}: {have}/{want} {unit} ({index} images), {rate:.0f} {unit}/s, "
            f"ETA {(want - have) / max(rate, 1e-9):.0f}s",
            flush=True,
          )
          last = now
        if have >= want:
          break


# --- summary ----------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
  return [json.loads(line) for line in _complete_lines(path)]


def _answer_stats(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
  by_query: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for query, answer in pairs:
    by_query[query][answer] += 1
  out = {}
  for query, counts in sorted(by_query.items()):
    n = sum(counts.values())
    top, top_n = counts.most_common(1)[0]
    out[query] = {
      "questions": n,
      "distinct_answers": len(counts),
      "top_answer": top,
      "top_answer_fraction": round(top_n / n, 4),
    }
  return out


def summarize_split(out: Path, split: str) -> dict[str, Any]:
  """Counts for one split, read back from its files."""
  records = _read_jsonl(out / f"{split}.jsonl")
  scenes = _read_jsonl(out / "scenes" / f"{split}.jsonl")
  per_k: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  per_cap: collections.Counter = collections.Counter()
  per_cap_k: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  per_qtype: collections.Counter = collections.Counter()
  per_combo: collections.Counter = collections.Counter()
  qpi: collections.Counter = collections.Counter()
  heldout = 0
  answers = []
  n_objects: collections.Counter = collections.Counter()
  for rec, sc in zip(records, scenes):
    turns = rec["conversations"]
    per_k[str(rec["k"])]["images"] += 1
    qpi[str(len(turns) // 2)] += 1
    n_objects[str(len(sc["scene"]["objects"]))] += 1
    for human, gpt, prog in zip(turns[0::2], turns[1::2], sc["questions"]):
      per_k[str(human["k"])]["questions"] += 1
      per_qtype[human["qtype"]] += 1
      per_combo["+".join(human["capability"])] += 1
      heldout += bool(human["heldout"])
      answers.append((prog["program"]["query"], gpt["value"]))
      for c in human["capability"]:
        per_cap[c] += 1
        per_cap_k[c][str(human["k"])] += 1
  stats: collections.Counter = collections.Counter()
  for sc in scenes:
    stats.update(sc["stats"])
  return {
    "images": len(records),
    "questions": sum(v["questions"] for v in per_k.values()),
    "per_k": {k: dict(v) for k, v in sorted(per_k.items())},
    "per_capability": {c: per_cap[c] for c in caps_lib.CAPABILITIES},
    "per_capability_and_k": {c: dict(sorted(per_cap_k[c].items())) for c in caps_lib.CAPABILITIES},
    "per_qtype": dict(per_qtype.most_common()),
    "distinct_combinations": len(per_combo),
    "heldout_questions": heldout,
    "questions_per_image": dict(sorted(qpi.items())),
    "objects_per_image": dict(sorted(n_objects.items(), key=lambda kv: int(kv[0]))),
    "answers_by_query": _answer_stats(answers),
    "rejections": {
      "capability_sets_without_question": stats["rejections"],
      "scene_redraws": stats["scene_redraws"],
      "train_overlap_redraws": stats["train_overlap_redraws"],
      "heldout_sets_skipped_in_train": stats["heldout_skipped"],
    },
    "_hashes": [sc["hash"] for sc in scenes],
  }


_SHORT_NAMES = {
  "color": "color",
  "shape": "shape",
  "object_recognition": "object",
  "action_recognition": "action",
  "text_recognition": "text",
  "spatial_recognition": "sp_rec",
  "counting": "counting",
  "spatial_relationship": "sp_rel",
  "object_interaction": "interact",
  "scene_understanding": "scene",
}


def format_table(summary: Mapping[str, Any]) -> str:
  """Questions per k and capability, one block per split."""
  short = _SHORT_NAMES
  lines = []
  for split, sp in summary["splits"].items():
    ks = sorted(sp["per_k"], key=int)
    lines.append(
      f"[{split}] {sp['images']} images, {sp['questions']} questions, "
      f"{sp['heldout_questions']} held-out, rejections {sp['rejections']}"
    )
    head = f"{'capability':<10}" + "".join(f"{'k=' + k:>7}" for k in ks) + f"{'all':>7}"
    lines.append(head)
    for c in caps_lib.CAPABILITIES:
      row = sp["per_capability_and_k"][c]
      lines.append(
        f"{short[c]:<10}"
        + "".join(f"{row.get(k, 0):>7}" for k in ks)
        + f"{sp['per_capability'][c]:>7}"
      )
    lines.append(
      f"{'questions':<10}"
      + "".join(f"{sp['per_k'][k].get('questions', 0):>7}" for k in ks)
      + f"{sp['questions']:>7}"
    )
  if "test_train_overlap" in summary:
    lines.append(f"test scenes identical to a train scene: {summary['test_train_overlap']}")
  return "\n".join(lines)


# --- the stage ---------------------------------------------------------------------


def run_generate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Runs (or resumes, or skips) the generate stage; returns the summary.

  With ``config.world.num_workers != 0`` images are made in spawned processes, so
  a script calling this directly needs the usual ``if __name__ == "__main__":``
  guard (``python -m compact_jax.main`` has it).
  """
  out = Path(workdir) / "generate"
  summary_path = out / "summary.json"
  settings = WorldSettings.from_config(config)
  if config.overwrite and out.exists():
    shutil.rmtree(out)
  if summary_path.exists():
    logging.info("generate: %s exists, skipping (set overwrite to redo)", summary_path)
    return json.loads(summary_path.read_text())
  (out / "scenes").mkdir(parents=True, exist_ok=True)
  settings_path = out / "settings.json"
  if settings_path.exists():
    saved = json.loads(settings_path.read_text())
    if saved != settings.to_json():
      now = settings.to_json()
      changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
      raise ValueError(
        f"{out} holds a partial run made with other world settings (keys {changed}); "
        "rerun with overwrite to start over"
      )
  else:
    settings_path.write_text(json.dumps(settings.to_json(), indent=1))
  t0 = time.monotonic()
  for split in SPLITS:
    _generate_split(out, split, settings)
  captions = caption_lib.write_captions(out, "train")
  splits = {split: summarize_split(out, split) for split in SPLITS}
  train_hashes = set(splits["train"].pop("_hashes"))
  test_hashes = splits["test"].pop("_hashes")
  summary = {
    "splits": splits,
    "test_train_overlap": sum(h in train_hashes for h in test_hashes),
    "captions": str(captions.relative_to(out)),
    "seconds": round(time.monotonic() - t0, 2),
    "settings": settings.to_json(),
  }
  print(format_table(summary), flush=True)
  tmp = summary_path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(summary, indent=1))
  os.replace(tmp, summary_path)
  return summary
