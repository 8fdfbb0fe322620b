"""Crash safety: kill -9 the launcher mid-run, rerun, compare with a run never interrupted."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from PIL import Image

from compact_jax.datagen import engine, stages
from tests.datagen import helpers
from tests.datagen.fake_server import FakeVLMServer

REPO = pathlib.Path(__file__).resolve().parents[2]


def crop_pool(root: pathlib.Path, n: int) -> pathlib.Path:
  """``n`` small, distinct crops of a real photograph."""
  d = root / "crops"
  d.mkdir(parents=True)
  photo = Image.open(helpers.skimage_data_dir() / "astronaut.png").convert("RGB")
  for i in range(n):
    x, y = 37 * i % 400, 53 * i % 400
    photo.crop((x, y, x + 64, y + 64)).save(d / f"crop_{i:02d}.png")
  return d


def launcher(backend: str, url: str, images: pathlib.Path, workdir: pathlib.Path) -> list[str]:
  return [
    sys.executable, "-m", "compact_jax.main",
    f"--config=configs/datagen.py:backend={backend},smoke",
    f"--config.backend.base_url={url}",
    f"--config.images={images}",
    f"--config.backend.api_key_env={helpers.KEY_ENV}",
    "--config.datagen.max_concurrency=2",
    "--config.stages=('datagen','merge')",
    f"--workdir={workdir}",
  ]  # fmt: skip


def outcome_lines(workdir: pathlib.Path) -> int:
  path = stages.shard_dir(workdir, 0, 1) / "outcomes.jsonl"
  return path.read_bytes().count(b"\n") if path.exists() else 0


def read_records(path: pathlib.Path) -> dict[str, dict]:
  recs = [json.loads(line) for line in path.read_text().splitlines()]
  by_id = {r["id"]: r for r in recs}
  assert len(by_id) == len(recs), "duplicate record ids"
  return by_id


def test_kill_9_at_several_points_loses_and_duplicates_nothing(tmp_path, monkeypatch):
  monkeypatch.setenv(helpers.KEY_ENV, helpers.SECRET)
  images = crop_pool(tmp_path, 8)
  env = {**os.environ, helpers.KEY_ENV: helpers.SECRET, "JAX_PLATFORMS": "cpu"}
  with FakeVLMServer(latency_s=0.05) as srv:
    url = srv.url + "/v1"
    # The reference: one uninterrupted run, in process.
    c = helpers.make_config("openai", images=str(images), base_url=url)
    c.datagen.max_image_side = 1024
    c.datagen.max_concurrency = 2
    ref_report = stages.run_datagen(c, tmp_path / "ref")
    ref = read_records(stages.shard_dir(tmp_path / "ref", 0, 1) / "records.jsonl")
    assert ref_report["complete"] and len(ref) >= 5

    work = tmp_path / "crashy"
    kills = 0
    for threshold in (2, 4, 6):
      proc = subprocess.Popen(launcher("openai", url, images, work), cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
      deadline = time.monotonic() + 60
      while proc.poll() is None and outcome_lines(work) < threshold and time.monotonic() < deadline:
        time.sleep(0.01)
      if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        kills += 1
      proc.wait()
    assert kills >= 2, "the run finished before it could be killed; slow the server down"
    done = subprocess.run(launcher("openai", url, images, work), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
  got = read_records(stages.shard_dir(work, 0, 1) / "records.jsonl")
  assert got == ref  # nothing lost, nothing duplicated, same bytes per record
  merged = read_records(work / "datagen" / "records.jsonl")
  assert merged == ref
  outcomes = [
    json.loads(x)
    for x in (stages.shard_dir(work, 0, 1) / "outcomes.jsonl").read_text().splitlines()
  ]
  assert sorted(o["image"] for o in outcomes) == sorted(f"{p.name}" for p in images.iterdir())
  assert helpers.SECRET not in done.stdout + done.stderr


def test_gemini_through_the_launcher(tmp_path):
  images = crop_pool(tmp_path, 3)
  env = {**os.environ, helpers.KEY_ENV: helpers.SECRET, "JAX_PLATFORMS": "cpu"}
  with FakeVLMServer() as srv:
    done = subprocess.run(launcher("gemini", srv.url, images, tmp_path / "w"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert srv.requests and all(r["protocol"] == "gemini" for r in srv.requests)
  recs = read_records(tmp_path / "w" / "datagen" / "records.jsonl")
  assert {r["generator"]["model"] for r in recs.values()} == {"gemini-2.5-flash"}
  assert helpers.SECRET not in done.stdout + done.stderr


def test_torn_lines_and_orphan_records_are_repaired_on_resume(tmp_path):
  files = engine.ShardFiles(tmp_path)
  rec = {"id": "r1", "image": "a.png", "k": 1, "conversations": [
    {"from": "human", "value": "<image>\nQ?", "capability": ["color"]}, {"from": "gpt", "value": "red"}]}  # fmt: skip
  files.records_path.write_text(json.dumps(rec) + "\n" + '{"id": "r2", "ima')  # crash mid-write
  files.outcomes_path.write_text(
    json.dumps({"image": "b.png", "status": "failed", "reason": "x"}) + "\n"
  )
  outcomes = files.resume()
  assert set(outcomes) == {"a.png", "b.png"}
  assert outcomes["a.png"]["status"] == "accepted" and outcomes["a.png"]["id"] == "r1"
  assert files.records_path.read_text() == json.dumps(rec) + "\n"  # the torn tail is cut off
  assert len(files.outcomes_path.read_text().splitlines()) == 2  # the lost outcome is rebuilt
  assert files.resume() == outcomes  # idempotent
