"""Issue 8's experiment: the world settings it relies on, its statistics, and the smoke run."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import configs.experiments.compact_repro as exp_config
from compact_jax.eval import metrics as metrics_lib
from compact_jax.experiments import compact_repro as exp
from compact_jax.world import generate
from configs import base

# Every file (settings.json included) that world_config() generates, hashed: equal to
# what commit 6dec9e2's generate.py (before train_k_weights / num_train_questions /
# test_avoids_scenes) wrote, checked by running both side by side on 2026-11-22. Pinned
# as a digest so the test needs no git history. The images were re-pinned when ropes
# became brown and 4 px wide (world/render.py, 2026-11-22); every other file
# (scenes, records, captions, settings) is still 6dec9e2's, NON_IMAGE_DIGEST.
BEFORE_BUDGET_KEYS_DIGEST = "02beb67d3fd97a12966ff74bd0479a923f51b7a36ae614db93d09706501f501f"
NON_IMAGE_DIGEST = "356781323640b9665ecf6017b92a4711d89dbe46dedd7ca90c513b6783f55e5b"


def world_config(train=24, test=12, seed=5, **world):
  c = base.get_config()
  c.seed = seed
  c.world.num_train_images = train
  c.world.num_test_images = test
  c.world.num_workers = 0
  for key, value in world.items():
    c.world[key] = value
  return c


def files(root: Path) -> dict[str, bytes]:
  return {
    str(p.relative_to(root)): p.read_bytes()
    for p in sorted((root / "generate").rglob("*"))
    if p.is_file() and p.name != "summary.json"
  }


def read_jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


# --- the world keys the experiment added -----------------------------------------------------


def test_default_world_output_is_bit_identical_to_before_the_new_keys(tmp_path):
  generate.run_generate(world_config(), tmp_path)
  got = files(tmp_path)
  digest, non_image = hashlib.sha256(), hashlib.sha256()
  for name in sorted(got):
    for d in (digest, non_image) if not name.endswith(".png") else (digest,):
      d.update(name.encode())
      d.update(hashlib.sha256(got[name]).digest())
  assert len(got) == 42
  assert non_image.hexdigest() == NON_IMAGE_DIGEST
  assert digest.hexdigest() == BEFORE_BUDGET_KEYS_DIGEST


def test_train_k_weights_draw_each_images_k_from_its_own_stream(tmp_path):
  weights = (1.0, 0.0, 3.0)
  summary = generate.run_generate(world_config(train=60, test=4, train_k_weights=weights), tmp_path)
  ks = [r["k"] for r in read_jsonl(tmp_path / "generate" / "train.jsonl")]
  p = np.asarray(weights) / sum(weights)
  want = [int(np.random.default_rng([5, 0, i]).choice((1, 2, 3), p=p)) for i in range(60)]
  assert ks == want
  assert 2 not in ks and ks.count(3) > ks.count(1)
  assert summary["settings"]["train_k_weights"] == [0.25, 0.0, 0.75]
  # Test images keep the uniform draw over test_k.
  test_ks = [r["k"] for r in read_jsonl(tmp_path / "generate" / "test.jsonl")]
  assert test_ks == [
    int(np.random.default_rng([5, 1, i]).choice((1, 2, 3, 4, 5))) for i in range(4)
  ]


def test_num_train_questions_is_exact_and_resumes_to_the_same_bytes(tmp_path):
  c = world_config(train=999, test=4, num_train_questions=37)
  summary = generate.run_generate(c, tmp_path / "a")
  out = tmp_path / "a" / "generate"
  records = read_jsonl(out / "train.jsonl")
  scenes = read_jsonl(out / "scenes" / "train.jsonl")
  assert sum(len(r["conversations"]) // 2 for r in records) == 37
  assert summary["splits"]["train"]["questions"] == 37
  assert [len(s["questions"]) for s in scenes] == [len(r["conversations"]) // 2 for r in records]
  assert 37 / 3 <= len(records) <= 37 / 2 + 1
  # The untrimmed images are those the image-count mode makes.
  generate.run_generate(world_config(train=len(records) - 1, test=0), tmp_path / "b")
  by_count = read_jsonl(tmp_path / "b" / "generate" / "train.jsonl")
  assert records[:-1] == by_count
  # Interrupted after 5 images: the rerun continues to the same files.
  work = tmp_path / "c"
  shutil.copytree(tmp_path / "a", work)
  (work / "generate" / "summary.json").unlink()
  for rel in ("train.jsonl", "scenes/train.jsonl"):
    p = work / "generate" / rel
    p.write_text("".join(line + "\n" for line in p.read_text().splitlines()[:5]))
  for rel in ("test.jsonl", "scenes/test.jsonl"):
    (work / "generate" / rel).unlink()
  generate.run_generate(c, work)
  assert files(work) == files(tmp_path / "a")


def test_test_split_avoids_the_named_scene_files(tmp_path):
  generate.run_generate(world_config(train=6, test=10), tmp_path / "free")
  first = read_jsonl(tmp_path / "free" / "generate" / "scenes" / "test.jsonl")
  # Forbid exactly the scenes test would otherwise draw: every image must redraw.
  avoid = tmp_path / "w" / "avoid.jsonl"
  avoid.parent.mkdir()
  shutil.copy(tmp_path / "free" / "generate" / "scenes" / "test.jsonl", avoid)
  summary = generate.run_generate(
    world_config(train=6, test=10, test_avoids_scenes=("avoid.jsonl",)), tmp_path / "w"
  )
  second = read_jsonl(tmp_path / "w" / "generate" / "scenes" / "test.jsonl")
  assert not {s["hash"] for s in first} & {s["hash"] for s in second}
  assert summary["splits"]["test"]["rejections"]["train_overlap_redraws"] >= 10
  with pytest.raises(FileNotFoundError, match=r"test_avoids_scenes names 'nope\.jsonl'"):
    generate.run_generate(
      world_config(train=2, test=2, test_avoids_scenes=("nope.jsonl",)), tmp_path / "x"
    )


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("train_k_weights", (1.0, 2.0), "one non-negative weight per"),
    ("train_k_weights", (1.0, -1.0, 1.0), "train_k_weights"),
    ("train_k_weights", (0.0, 0.0, 0.0), "not all zero"),
    ("num_train_questions", -1, "num_train_questions must be >= 0"),
  ],
)
def test_bad_budget_settings_are_rejected(key, value, message):
  c = world_config()
  c.world[key] = value
  with pytest.raises(ValueError, match=message):
    generate.WorldSettings.from_config(c)


# --- statistics ------------------------------------------------------------------------------


def test_t_quantiles_match_scipy():
  # scipy comes with the test requirements (scikit-image needs it).
  from scipy import stats

  for df in [*range(1, 41), 60, 100, 1000]:
    assert exp.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4), df


def test_seed_summary_by_hand():
  s = exp.seed_summary([[1, 0, 1, 1], [0, 0, 1, 1], []])
  assert s["per_seed"] == [0.75, 0.5, None]
  assert s["mean"] == pytest.approx(0.625)
  # sd of (0.75, 0.5) = 0.17678; t(1) = 12.706; half = 12.706 * 0.17678 / sqrt(2)
  assert s["half_width"] == pytest.approx(12.7062 * 0.1767767 / math.sqrt(2), rel=1e-4)
  assert s["pooled"]["accuracy"] == 5 / 8 and s["pooled"]["n"] == 8
  assert s["pooled"]["lo"] < 5 / 8 < s["pooled"]["hi"]
  assert exp.seed_summary([[1, 1, 0]])["half_width"] is None


def _rows(correct_by_k: dict[int, list[bool]]) -> dict:
  rows = {}
  for k, cs in correct_by_k.items():
    for i, ok in enumerate(cs):
      rows[(f"r{k}_{i}", 0)] = {
        "k": k,
        "correct": ok,
        "capability": ["color"] * k,
        "heldout": False,
      }
  return rows


def test_paired_comparison_and_verdicts():
  # Seeds: A right on 8/10 k=4 questions, B on 2/10, in both seeds; k=1 equal.
  a = [_rows({1: [True] * 5 + [False] * 5, 4: [True] * 8 + [False] * 2})] * 2
  b = [_rows({1: [True] * 5 + [False] * 5, 4: [True] * 2 + [False] * 8})] * 2
  comp = exp.paired_comparison(a, b, 4, resamples=300)
  assert comp["by_k"]["4+"]["difference"] == pytest.approx(0.6)
  assert comp["by_k"]["4+"]["half_width"] == pytest.approx(0.0)  # identical seeds
  assert comp["by_k"]["1"]["difference"] == 0.0
  v = exp.verdict("A", "B", comp, "4+", 2)
  assert v.startswith("A beats B at k=4+ by +0.600 ± 0.000")
  # Seeds that disagree in sign: no significant effect.
  b2 = [b[0], _rows({1: [True] * 5 + [False] * 5, 4: [True] * 10})]
  v2 = exp.verdict("A", "B", exp.paired_comparison(a, b2, 4, resamples=300), "4+", 2)
  assert v2.startswith("No significant effect of A vs B at k=4+: +0.200 ± ")
  with pytest.raises(ValueError, match="different questions"):
    exp.paired_comparison(a, [_rows({1: [True]})] * 2, 4, resamples=10)


def test_relative_scores_by_hand():
  def arm(means):  # k -> per-seed accuracies
    return {"by_k": {k: {"mean": float(np.mean(v)), "per_seed": v} for k, v in means.items()}}

  tables = {
    "x": arm({"1": [0.4, 0.6], "2": [0.3, 0.3]}),
    "ref": arm({"1": [0.5, 0.5], "2": [0.6, 0.6]}),
  }
  rel = exp.relative_scores(tables, "ref", ["1", "2"])
  assert rel["arms"]["x"]["rel"] == pytest.approx(100 * (0.5 / 0.5 + 0.3 / 0.6) / 2)
  assert rel["arms"]["x"]["per_seed"] == pytest.approx(
    [100 * (0.8 + 0.5) / 2, 100 * (1.2 + 0.5) / 2]
  )
  assert rel["arms"]["ref"]["rel"] == pytest.approx(100)


def test_config_arms_and_natural_weights():
  c = exp_config.get_config()
  arms = {a.name: a for a in exp.arms_from_config(c)}
  assert list(arms) == ["a_compact", "b_atomic", "c_natural", "d_large"]
  base_q = exp.base_train_questions(c)
  assert base_q == round(c.world.num_train_images * 2.5)
  assert arms["d_large"].num_train_questions == 10 * base_q
  assert {a.num_train_questions for n, a in arms.items() if n != "d_large"} == {base_q}
  w = np.asarray(exp_config.NATURAL_K_WEIGHTS)
  assert w.sum() == pytest.approx(1) and w[:2].sum() == pytest.approx(0.77)
  assert arms["c_natural"].mean_k == pytest.approx(1.95)
  assert arms["a_compact"].mean_k == pytest.approx(2.0)
  assert len(c.experiment.seeds) >= 3
  with c.unlocked():
    c.experiment.reference_arm = "z"
  with pytest.raises(ValueError, match="reference_arm='z' is not an arm"):
    exp.arms_from_config(c)


# --- the smoke experiment, end to end ----------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("exp")
  config = exp_config.get_config("smoke")
  with config.unlocked():
    config.compilation_cache_dir = ""  # the test session's cache is already on
  from compact_jax import main as launcher

  report = launcher.run(config, str(workdir))["experiment"]
  return workdir, config, report


def test_smoke_writes_the_report_with_every_arm_seed_and_k(smoke):
  workdir, config, report = smoke
  for name in (exp.REPORT_JSON, exp.REPORT_MD, exp.PLOT):
    assert (workdir / name).stat().st_size > 0, name
  saved = json.loads((workdir / exp.REPORT_JSON).read_text())
  assert saved["verdicts"] == report["verdicts"]
  arms = list(config.experiment.arms)
  assert list(saved["tables"]) == arms and len(saved["seeds"]) == 2
  for a in arms:
    by_k = saved["tables"][a]["by_k"]
    assert {"1", "2", "3", "4+"} <= set(by_k)
    for entry in by_k.values():
      assert len(entry["per_seed"]) == 2 and entry["lo"] <= entry["mean"] <= entry["hi"]
  assert set(saved["comparisons"]) == {"a_compact-c_natural", "a_compact-b_atomic"}
  for v in saved["verdicts"].values():
    assert v.startswith(("No significant effect", "a_compact beats", "a_compact is worse"))
  assert "## Accuracy by k" in saved["markdown"] and "Rel. %" in saved["markdown"]
  rel = saved["relative"]
  # A 30-step smoke model may score 0 on every bucket: then there is no ratio.
  assert rel["arms"]["d_large"]["rel"] == (pytest.approx(100) if rel["buckets"] else None)


def test_smoke_budgets_and_shared_test_split(smoke):
  workdir, config, report = smoke
  arms = {a.name: a for a in exp.arms_from_config(config)}
  for s in config.experiment.seeds:
    root = workdir / f"seed{s}"
    for name, arm in arms.items():
      gen = root / ("stage1" if name == config.experiment.stage1_arm else name) / "generate"
      records = read_jsonl(gen / "train.jsonl")
      assert sum(len(r["conversations"]) // 2 for r in records) == arm.num_train_questions
      assert {r["k"] for r in records} <= set(arm.train_k)
      assert (root / name / "pretrain").resolve() == (root / "stage1" / "pretrain").resolve()
      o = report["overlap"][str(s)][name]
      assert o["scene_and_question"] == 0 and o["test_scenes_in_train"] == 0
    # Every arm was scored on the same questions: one hash per seed, recomputed here.
    digests = set()
    for name in arms:
      h = hashlib.sha256()
      for line in sorted((root / name / "eval" / "predictions.jsonl").read_text().splitlines()):
        row = json.loads(line)
        h.update(f"{row['id']}|{row['turn']}|{row['question']}|{row['answer']}".encode())
      digests.add(h.hexdigest())
    assert len(digests) == 1
  # The resume check: every sub-run counts as finished now.
  assert all(t.finished() for t in exp.plan(config, workdir))


def test_smoke_numbers_match_a_recomputation_from_the_predictions(smoke):
  workdir, config, report = smoke
  seeds = config.experiment.seeds

  def acc(arm, seed, keep):
    rows = [json.loads(x) for x in (workdir / f"seed{seed}" / arm / "eval" / "predictions.jsonl")
            .read_text().splitlines()]  # fmt: skip
    rows = [r for r in rows if keep(r)]
    return sum(metrics_lib.exact_match(r["prediction"], r["answer"]) for r in rows) / len(rows)

  per_seed = [acc("b_atomic", s, lambda r: r["k"] >= 4) for s in seeds]
  entry = report["tables"]["b_atomic"]["by_k"]["4+"]
  assert entry["per_seed"] == pytest.approx(per_seed)
  assert entry["mean"] == pytest.approx(np.mean(per_seed))
  assert entry["half_width"] == pytest.approx(12.7062 * np.std(per_seed, ddof=1) / math.sqrt(2))
  diff = [
    acc("a_compact", s, lambda r: r["k"] == 1) - acc("c_natural", s, lambda r: r["k"] == 1)
    for s in seeds
  ]
  got = report["comparisons"]["a_compact-c_natural"]["by_k"]["1"]["difference"]
  assert got == pytest.approx(np.mean(diff))
  ks = report["relative"]["buckets"]
  if ks:
    means = {
      a: {k: np.mean([acc(a, s, lambda r, k=k: r["k"] == int(k)) for s in seeds]) for k in ks}
      for a in ("a_compact", "d_large")
    }
    rel = 100 * np.mean([means["a_compact"][k] / means["d_large"][k] for k in ks])
    assert report["relative"]["arms"]["a_compact"]["rel"] == pytest.approx(rel)
  # The majority baseline (never 0 everywhere): re-scored from its answers per seed.
  majority = []
  for s in seeds:
    path = workdir / f"seed{s}" / "c_natural" / "eval" / "predictions.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows = [r for r in rows if r["k"] >= 4]
    majority.append(
      sum(metrics_lib.exact_match(r["majority_prediction"], r["answer"]) for r in rows) / len(rows)
    )
  assert 0 < np.mean(majority) == pytest.approx(report["baselines"]["c_natural"]["majority"]["4+"])
