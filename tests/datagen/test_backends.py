"""The real ``openai`` and ``google-genai`` clients against the loopback fake server."""

from __future__ import annotations

import json
import logging
import pathlib

import pytest
from PIL import Image

from compact_jax.data import records as records_lib
from compact_jax.datagen import stages
from tests.datagen import helpers
from tests.datagen.fake_server import FakeVLMServer

BACKENDS = ("openai", "gemini")


def base_url(srv: FakeVLMServer, backend: str) -> str:
  return srv.url + "/v1" if backend == "openai" else srv.url


@pytest.fixture
def pool(tmp_path):
  return helpers.photo_pool(tmp_path / "data")


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
  monkeypatch.setenv(helpers.KEY_ENV, helpers.SECRET)


def shard_files(workdir: pathlib.Path) -> pathlib.Path:
  return stages.shard_dir(workdir, 0, 1)


def read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_faults_are_retried_or_rejected_and_records_are_valid(
  backend, pool, tmp_path, caplog, capsys
):
  caplog.set_level(logging.DEBUG)
  with FakeVLMServer(retry_after="1", timeout_sleep_s=5.0) as srv:
    srv.script("generation", "429", "500", "timeout", "truncated", "fenced", "wrong_count")
    srv.script("verification", "wrong_answer", "wrong_count")
    c = helpers.make_config(backend, images=str(pool), image_root=str(pool.parent),
                            base_url=base_url(srv, backend))  # fmt: skip
    # Only the scripted timeout may time out: 1 s (the helpers' default) was within reach
    # of an ordinary reply on a loaded 2-core box, which made the retry count flaky.
    c.backend.request_timeout_s = 2.5
    report = stages.run_datagen(c, tmp_path / "work")
  out = shard_files(tmp_path / "work")
  # Every image finished; the retried faults cost no image.
  assert report["complete"] and report["statuses"] == {"accepted": len(helpers.PHOTOS)}
  assert report["retries"] == {"rate_limited": 1, "server_error": 1, "timeout": 1}
  assert report["rejections"] == {
    "malformed_json": 1,  # truncated
    "generation_capability_mismatch": 1,
    "answer_wrong": 1,
    "verification_capability_mismatch": 1,
  }  # the fenced reply parsed
  # Retry-After was honoured: the retry for the same image came >= 1 s after the 429.
  hit = next(r for r in srv.requests if r["fault"] == "429")
  retry = next(
    r for r in srv.requests if r["time"] > hit["time"] and r["image_sha"] == hit["image_sha"]
  )
  assert retry["time"] - hit["time"] >= 0.95
  # The key went out the way each API expects it.
  h = srv.requests[0]["headers"]
  assert (
    (h.get("authorization") == f"Bearer {helpers.SECRET}")
    if backend == "openai"
    else (h.get("x-goog-api-key") == helpers.SECRET)
  )
  # Images were downscaled to max_image_side before upload.
  assert all(max(r["image_size"]) <= 96 for r in srv.requests)
  recs = read_jsonl(out / "records.jsonl")
  assert sorted(r["image"] for r in recs) == sorted(f"photos/{p}" for p in helpers.PHOTOS)
  for i, rec in enumerate(recs):
    records_lib.validate_record(rec, where=f"records.jsonl:{i + 1}")
    humans = rec["conversations"][0::2]
    assert 2 <= len(humans) <= 3
    assert humans[0]["value"].startswith("<image>\nWhat ")
    assert humans[0]["value"].endswith("\nAnswer the question using a single word or phrase.")
    assert all("<image>" not in h["value"] for h in humans[1:])
    assert all(len(h["capability"]) == rec["k"] for h in humans)
    assert rec["generator"]["backend"] == backend
    gen_ids = [q["generation"]["response_id"] for q in rec["generator"]["questions"]]
    assert all(gen_ids)
  # The secret is in no file written and in no log line or printed output.
  logs = caplog.text + "".join(capsys.readouterr())
  assert helpers.SECRET not in logs
  for path in (tmp_path / "work").rglob("*"):
    if path.is_file():
      assert helpers.SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerun_with_overwrite_is_served_from_the_cache(backend, pool, tmp_path):
  with FakeVLMServer() as srv:
    c = helpers.make_config(backend, images=str(pool), base_url=base_url(srv, backend))
    first = stages.run_datagen(c, tmp_path)
    n = len(srv.requests)
    c.overwrite = True
    c.datagen.duplicate_overlap = 0.9  # a changed filter: same requests, no new payment
    second = stages.run_datagen(c, tmp_path)
    assert len(srv.requests) == n
  assert second["this_run"]["requests"] == 0
  assert second["this_run"]["cached_replies"] == first["requests"]
  assert second["questions"] == first["questions"]


def test_permanent_failures_are_recorded_with_reasons(pool, tmp_path):
  (pool / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  Image.new("RGB", (1000, 1000)).save(pool / "huge.png")
  (pool / "scan.tif").write_bytes((helpers.skimage_data_dir() / "multipage.tif").read_bytes())
  (pool / "notes.txt").write_text("not an image")  # ignored, not an image file
  with FakeVLMServer() as srv:
    srv.script("any", *["500"] * (3 * len(helpers.PHOTOS)))  # 3 tries per photo
    c = helpers.make_config("openai", images=str(pool), base_url=srv.url + "/v1")
    c.datagen.max_image_pixels = 900_000  # the photos (<= 872k pixels) pass, huge.png not
    c.datagen.max_retries_per_request = 2
    report = stages.run_datagen(c, tmp_path)
    outcomes = {o["image"]: o for o in read_jsonl(shard_files(tmp_path) / "outcomes.jsonl")}
    assert set(outcomes) == {*helpers.PHOTOS, "corrupt.jpg", "huge.png", "scan.tif"}
    assert outcomes["corrupt.jpg"]["reason"].startswith("corrupt or unreadable image")
    assert outcomes["huge.png"]["reason"].startswith("too large: 1000x1000")
    assert outcomes["scan.tif"]["reason"] == "unsupported format: suffix '.tif'"
    gave_up = [o for o in outcomes.values() if o["reason"].startswith("gave up")]
    assert gave_up and all("server_error" in o["reason"] for o in gave_up)
    assert all(o["status"] == "failed" for o in outcomes.values() if o["status"] != "accepted")
    assert report["statuses"]["failed"] >= 3 + len(gave_up)
    # A rerun skips failed images; with retry_failed it redoes them (the server is fine now).
    n = len(srv.requests)
    stages.run_datagen(c, tmp_path)
    assert len(srv.requests) == n
    c.datagen.retry_failed = True
    again = stages.run_datagen(c, tmp_path)
    assert again["statuses"]["accepted"] == len(helpers.PHOTOS)


def test_budget_stops_cleanly_and_the_rerun_finishes_without_duplicates(pool, tmp_path):
  with FakeVLMServer() as srv:
    c = helpers.make_config("gemini", images=str(pool), base_url=srv.url)
    c.datagen.max_requests = 7
    first = stages.run_datagen(c, tmp_path)
    assert not first["complete"] and first["stopped"].startswith("budget: max_requests=7")
    assert len(srv.requests) == 7
    c.datagen.max_requests = 0
    second = stages.run_datagen(c, tmp_path)
  assert second["complete"]
  recs = read_jsonl(shard_files(tmp_path) / "records.jsonl")
  assert sorted(r["image"] for r in recs) == sorted(f"{p}" for p in helpers.PHOTOS)
  assert len({r["id"] for r in recs}) == len(recs)


def test_cost_cap_uses_the_price_table(pool, tmp_path):
  with FakeVLMServer() as srv:
    c = helpers.make_config("openai", images=str(pool), base_url=srv.url + "/v1")
    c.backend.model = "gpt-4o"  # 2.50 / 10.00 USD per 1M tokens
    c.datagen.max_cost_usd = 0.002
    c.datagen.max_concurrency = 1
    report = stages.run_datagen(c, tmp_path)
  assert report["stopped"].startswith("budget: max_cost_usd")
  # Independent cost from the server's token counts: input 2.5e-6, output 1e-5 per token.
  assert report["cost_usd"] <= 0.002 + 0.0005
  usage_in, usage_out = report["input_tokens"], report["output_tokens"]
  assert report["cost_usd"] == pytest.approx((usage_in * 2.5 + usage_out * 10.0) / 1e6, abs=1e-6)


def test_bad_setup_fails_before_any_request(pool, tmp_path, monkeypatch):
  with FakeVLMServer() as srv:
    c = helpers.make_config("openai", images=str(pool), base_url=srv.url + "/v1")
    monkeypatch.delenv(helpers.KEY_ENV)
    with pytest.raises(ValueError, match=f"environment variable {helpers.KEY_ENV}"):
      stages.run_datagen(c, tmp_path)
    monkeypatch.setenv(helpers.KEY_ENV, helpers.SECRET)
    empty = tmp_path / "empty"
    empty.mkdir()
    c.images = str(empty)
    with pytest.raises(ValueError, match="holds no image files"):
      stages.run_datagen(c, tmp_path)
    c.images = str(pool)
    c.backend.name = "claude"
    with pytest.raises(ValueError, match="Unknown backend 'claude'"):
      stages.run_datagen(c, tmp_path)
    c.backend.name = "openai"
    srv.script("any", "401")
    with pytest.raises(Exception, match="401") as e:
      stages.run_datagen(c, tmp_path / "w401")
    assert helpers.SECRET not in str(e.value)
    assert len(srv.requests) <= 2 * c.datagen.max_concurrency  # only those already under way


def test_dry_run_prints_prompts_without_requests(pool, tmp_path, capsys, monkeypatch):
  monkeypatch.delenv(helpers.KEY_ENV)  # a dry run needs no key
  with FakeVLMServer() as srv:
    c = helpers.make_config("gemini", images=str(pool), base_url=srv.url)
    c.dry_run = True
    out = stages.run_datagen(c, tmp_path)
    assert out["dry_run"] and not srv.requests
  text = capsys.readouterr().out
  assert "EXACTLY these" in text and "Proposed answer: {answer}" in text
  assert not (tmp_path / "datagen").exists()


def test_openai_reply_parsing_tolerates_missing_fields():
  from compact_jax.datagen import backends as b
  from compact_jax.datagen.backends import openai_backend

  full = {
    "id": "chatcmpl-1",
    "choices": [{"message": {"role": "assistant", "content": '{"a": 1}'}}],
    "usage": {"prompt_tokens": 120, "completion_tokens": 7},
  }
  r = openai_backend._parse_reply(full)
  assert (r.text, r.response_id, r.input_tokens, r.output_tokens) == (
    '{"a": 1}',
    "chatcmpl-1",
    120,
    7,
  )
  # No usage, no id, null content (a refusal): an empty, unbilled reply with a content-hash id
  # that the engine then rejects as malformed; never a crash.
  bare = openai_backend._parse_reply({"choices": [{"message": {"content": None}}]})
  assert (bare.text, bare.input_tokens, bare.output_tokens) == ("", 0, 0)
  assert len(bare.response_id) == 24
  assert openai_backend._parse_reply({"choices": [], "usage": {"prompt_tokens": "x"}}).text == ""
  with pytest.raises(b.PermanentError, match="not a JSON object"):
    openai_backend._parse_reply(["not", "a", "dict"])
