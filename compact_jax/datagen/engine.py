"""The async engine: runs the recipe over an image list against one backend.

- Concurrency: ``max_concurrency`` images in flight, each with at most one request
  outstanding (an image's questions are sequential: the duplicate filter and the
  capability sampling depend on the questions kept before).
- Rate limits: token buckets on requests and tokens per minute; a 429 with
  Retry-After also pauses every request until then.
- Retries: exponential backoff with jitter on transient errors, honouring
  Retry-After, capped per request and per image; then the image is recorded as
  failed with the reason.
- Budget: caps on requests, tokens and estimated cost for this invocation; at a cap
  no new request starts, unfinished images are not written, and a rerun resumes.
- Durability: every finished image (accepted, dropped or failed) is one appended,
  flushed and fsynced line; resume skips them (`ShardFiles`). Replies are cached by
  a hash of (backend, model, prompt version, image hash, request) in SQLite, so
  reruns (after a crash, or with changed filters under ``--overwrite``) do not pay
  twice.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import random
import sqlite3
import sys
import time
from collections.abc import Sequence
from typing import Any

from compact_jax.datagen import backends as b
from compact_jax.datagen import image_pool
from compact_jax.datagen import prompts as prompts_lib
from compact_jax.datagen import recipe as recipe_lib


class BudgetExhausted(Exception):
  """A budget cap was reached; the run stops and can be resumed."""


class ImageFailed(Exception):
  """An image failed permanently; the message is its recorded reason."""


@dataclasses.dataclass(frozen=True)
class EngineSettings:
  """The ``config.datagen`` keys of the engine, validated (0 disables a limit or cap)."""

  max_concurrency: int
  requests_per_minute: float
  tokens_per_minute: float
  max_retries_per_request: int
  max_retries_per_image: int
  backoff_initial_s: float
  backoff_max_s: float
  max_retry_after_s: float
  request_timeout_s: float
  max_requests: int
  max_tokens: int
  max_cost_usd: float
  price_input_per_million: float | None  # None: the model is not in the price table
  price_output_per_million: float | None
  image_token_estimate: int
  max_image_side: int
  max_image_pixels: int
  progress: bool
  fsync: bool
  retry_failed: bool

  @classmethod
  def from_config(cls, config) -> EngineSettings:
    d = config.datagen
    prices = {row[0]: (float(row[1]), float(row[2])) for row in d.prices}
    p_in, p_out = prices.get(config.backend.model, (None, None))
    if config.backend.name == "world":
      p_in, p_out = 0.0, 0.0
    s = cls(
      max_concurrency=int(d.max_concurrency),
      requests_per_minute=float(d.requests_per_minute),
      tokens_per_minute=float(d.tokens_per_minute),
      max_retries_per_request=int(d.max_retries_per_request),
      max_retries_per_image=int(d.max_retries_per_image),
      backoff_initial_s=float(d.backoff_initial_s),
      backoff_max_s=float(d.backoff_max_s),
      max_retry_after_s=float(d.max_retry_after_s),
      request_timeout_s=float(config.backend.request_timeout_s),
      max_requests=int(d.max_requests),
      max_tokens=int(d.max_tokens),
      max_cost_usd=float(d.max_cost_usd),
      price_input_per_million=p_in,
      price_output_per_million=p_out,
      image_token_estimate=int(d.image_token_estimate),
      max_image_side=int(d.max_image_side),
      max_image_pixels=int(d.max_image_pixels),
      progress=bool(d.progress),
      fsync=bool(d.fsync),
      retry_failed=bool(d.retry_failed),
    )
    if s.max_concurrency < 1:
      raise ValueError("config.datagen.max_concurrency must be >= 1")
    if s.max_cost_usd > 0 and p_in is None:
      raise ValueError(
        f"config.datagen.max_cost_usd is set but model {config.backend.model!r} has no row in "
        "config.datagen.prices (model, USD per 1M input tokens, USD per 1M output tokens)"
      )
    return s

  def cost(self, input_tokens: int, output_tokens: int) -> float:
    if self.price_input_per_million is None:
      return 0.0
    return (
      input_tokens * self.price_input_per_million + output_tokens * self.price_output_per_million
    ) / 1e6


class TokenBucket:
  """Allows ``per_minute`` units a minute with bursts of one second's worth (at least one
  unit). ``per_minute <= 0`` means unlimited."""

  def __init__(self, per_minute: float):
    self.rate = per_minute / 60.0
    self.capacity = max(1.0, self.rate)
    self.tokens = self.capacity
    self.stamp = time.monotonic()
    self.paused_until = 0.0
    self._lock = asyncio.Lock()
    self._refunded = asyncio.Event()

  def _refill(self) -> None:
    now = time.monotonic()
    self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
    self.stamp = now

  async def acquire(self, n: float = 1.0) -> float:
    """Waits until ``n`` units are free and takes them; returns the units taken (``n``
    capped at one burst), which is what a later `adjust` corrects."""
    async with self._lock:  # FIFO: waiters are served in arrival order
      while (wait := self.paused_until - time.monotonic()) > 0:
        await asyncio.sleep(wait)
      if self.rate <= 0:
        return n
      n = min(n, self.capacity)  # a request larger than a burst waits for a full bucket
      self._refill()
      while self.tokens < n:
        # Wake early on a refund: estimates are pessimistic (an image's tokens are guessed),
        # and sleeping out the whole refill would hold the rate far below the cap.
        self._refunded.clear()
        with contextlib.suppress(TimeoutError):
          async with asyncio.timeout((n - self.tokens) / self.rate):
            await self._refunded.wait()
        self._refill()
      self.tokens -= n
      return n

  def adjust(self, delta: float) -> None:
    """Charges ``delta`` more units (negative refunds), once the true size is known."""
    if self.rate > 0:
      self._refill()
      self.tokens = min(self.capacity, self.tokens - delta)
      if delta < 0:
        self._refunded.set()

  def pause(self, seconds: float) -> None:
    self.paused_until = max(self.paused_until, time.monotonic() + seconds)


class ResponseCache:
  """Replies by request hash, in SQLite (WAL: a killed process loses nothing committed)."""

  def __init__(self, path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    self.path = path
    self._db = sqlite3.connect(path, timeout=60, isolation_level=None)
    self._db.execute("PRAGMA journal_mode=WAL")
    self._db.execute("PRAGMA synchronous=NORMAL")
    self._db.execute(
      "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, text TEXT, "
      "response_id TEXT, input_tokens INTEGER, output_tokens INTEGER)"
    )

  def get(self, key: str) -> b.Response | None:
    row = self._db.execute(
      "SELECT text, response_id, input_tokens, output_tokens FROM responses WHERE key = ?", (key,)
    ).fetchone()
    return b.Response(*row) if row else None

  def put(self, key: str, r: b.Response) -> None:
    self._db.execute(
      "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
      (key, r.text, r.response_id, r.input_tokens, r.output_tokens),
    )

  def __len__(self) -> int:
    return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

  def close(self) -> None:
    self._db.close()


def cache_key(backend: str, model: str, request: b.Request, params: dict[str, Any]) -> str:
  blob = json.dumps(
    [
      backend,
      model,
      prompts_lib.PROMPT_VERSION,
      # A text-only request (an evaluation judge) has no image to hash.
      request.image.sha256 if request.image is not None else None,
      request.cache_payload(),
      params,
    ],
    sort_keys=True,
  )
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --- the shard's files ----------------------------------------------------------------


def complete_jsonl_lines(path: pathlib.Path) -> list[dict[str, Any]]:
  """Parsed lines of an append-only JSONL file; a torn last line (a crash mid-write) is cut
  off the file. A bad line elsewhere is an error naming the file and line."""
  if not path.exists():
    return []
  data = path.read_bytes()
  lines = data.split(b"\n")
  keep_bytes = len(data) - len(lines[-1])  # the piece after the last newline is torn
  out = []
  for n, line in enumerate(lines[:-1]):
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as e:
      if n == len(lines) - 2:
        keep_bytes -= len(line) + 1
        break
      raise ValueError(f"{path}: line {n + 1} is not valid JSON ({e.msg})") from None
  if keep_bytes != len(data):
    with open(path, "r+b") as f:
      f.truncate(keep_bytes)
  return out


class ShardFiles:
  """``records.jsonl`` (accepted images, the build stage's input) and ``outcomes.jsonl``
  (one line per finished image: status, reason, counts, usage) of one shard."""

  def __init__(self, directory: pathlib.Path, *, fsync: bool = True):
    self.dir = directory
    self.records_path = directory / "records.jsonl"
    self.outcomes_path = directory / "outcomes.jsonl"
    self._fsync = fsync
    self._records = None
    self._outcomes = None

  def resume(self) -> dict[str, dict[str, Any]]:
    """image -> its latest outcome. A record whose outcome line was lost to a crash gets
    one rebuilt from the record, so it is neither redone nor duplicated."""
    self.dir.mkdir(parents=True, exist_ok=True)
    records = complete_jsonl_lines(self.records_path)
    outcomes: dict[str, dict[str, Any]] = {}
    for o in complete_jsonl_lines(self.outcomes_path):
      outcomes[o["image"]] = o
    seen_ids: set[str] = set()
    for rec in records:
      if rec["id"] in seen_ids:
        raise ValueError(f"{self.records_path}: record id {rec['id']!r} appears twice")
      seen_ids.add(rec["id"])
      if outcomes.get(rec["image"], {}).get("status") != "accepted":
        o = outcome_from_record(rec)
        outcomes[rec["image"]] = o
        self._append(self.outcomes_path, o)
    return outcomes

  def _append(self, path: pathlib.Path, obj: dict[str, Any]) -> None:
    line = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    with open(path, "ab") as f:
      f.write(line)
      f.flush()
      if self._fsync:
        os.fsync(f.fileno())

  def open(self) -> None:
    # Held open for the whole run (closed by `close`): one open per image would cost more.
    self._records = open(self.records_path, "ab")  # noqa: SIM115
    self._outcomes = open(self.outcomes_path, "ab")  # noqa: SIM115

  def write(self, outcome: dict[str, Any], record: dict[str, Any] | None) -> None:
    """Appends the record (if any), then the outcome; each flushed and fsynced."""
    for f, obj in ((self._records, record), (self._outcomes, outcome)):
      if obj is None:
        continue
      f.write((json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
      f.flush()
      if self._fsync:
        os.fsync(f.fileno())

  def close(self) -> None:
    for f in (self._records, self._outcomes):
      if f is not None:
        f.close()
    self._records = self._outcomes = None


def outcome_from_record(rec: dict[str, Any]) -> dict[str, Any]:
  humans = [t for t in rec["conversations"] if t["from"] == "human"]
  return {
    "image": rec["image"],
    "id": rec["id"],
    "status": "accepted",
    "reason": "",
    "k": rec.get("k"),
    "capabilities": [t.get("capability", []) for t in humans],
    "rejections": {},
    "stages": {},
    "retries": {},
    "usage": {},
    "rebuilt": True,
  }


# --- the engine -------------------------------------------------------------------------


@dataclasses.dataclass
class _ImageState:
  """Counters of one image, written into its outcome line."""

  image: str
  rejections: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  stages: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  retries: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  usage: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class RunTotals:
  """This invocation's counters (the live progress bar and the budget read them)."""

  images: int = 0
  accepted_qa: int = 0
  requests: int = 0
  cached: int = 0
  input_tokens: int = 0
  output_tokens: int = 0
  cost_usd: float = 0.0
  rejections: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class Engine:
  """Runs the recipe for a list of images and appends their outcomes to ``files``."""

  def __init__(
    self,
    backend: b.Backend,
    recipe: recipe_lib.RecipeSettings,
    settings: EngineSettings,
    *,
    image_root: pathlib.Path,
    files: ShardFiles,
    cache: ResponseCache | None,
    backend_params: dict[str, Any],
  ):
    self.backend = backend
    self.recipe = recipe
    self.s = settings
    self.root = image_root
    self.files = files
    self.cache = cache if backend.cacheable else None
    self.params = backend_params
    self.totals = RunTotals()
    self.stop_reason = ""
    self._rpm = TokenBucket(settings.requests_per_minute)
    self._tpm = TokenBucket(settings.tokens_per_minute)
    self._slots = asyncio.Semaphore(settings.max_concurrency)
    self._bar = None
    self._t0 = time.monotonic()
    self._last_bar = 0.0

  def redact(self, text: str) -> str:
    for secret in self.backend.secrets:
      if secret:
        text = text.replace(secret, "[REDACTED]")
    return text

  # --- one request ---

  def _check_budget(self) -> None:
    t, s = self.totals, self.s
    if s.max_requests and t.requests >= s.max_requests:
      raise BudgetExhausted(f"max_requests={s.max_requests} reached")
    if s.max_tokens and t.input_tokens + t.output_tokens >= s.max_tokens:
      raise BudgetExhausted(f"max_tokens={s.max_tokens} reached")
    if s.max_cost_usd and t.cost_usd >= s.max_cost_usd:
      raise BudgetExhausted(f"max_cost_usd={s.max_cost_usd} reached")

  def _backoff(self, n: int) -> float:
    base = min(self.s.backoff_max_s, self.s.backoff_initial_s * 2**n)
    return base / 2 + random.uniform(0, base / 2)  # "equal jitter"

  async def call(self, request: b.Request, st: _ImageState) -> b.Response:
    key = ""
    if self.cache is not None:  # the key hashes the whole prompt: only worth it with a cache
      key = cache_key(self.backend.name, self.backend.model, request, self.params)
      if (hit := self.cache.get(key)) is not None:
        st.usage["cached"] += 1
        self.totals.cached += 1
        return hit
    estimate = (len(request.system) + len(request.user)) // 4 + self.s.image_token_estimate + 100
    for attempt in range(self.s.max_retries_per_request + 1):
      if self.stop_reason:
        raise BudgetExhausted(self.stop_reason)
      await self._rpm.acquire(1)
      reserved = await self._tpm.acquire(estimate)
      async with self._slots:
        self._check_budget()
        self.totals.requests += 1
        st.usage["requests"] += 1
        try:
          # The SDKs time out on their own; this guards a backend that hangs anyway.
          # (`asyncio.timeout`, unlike `wait_for`, does not wrap every call in a new task.)
          async with asyncio.timeout(self.s.request_timeout_s * 2 + 5):
            resp = await self.backend.call(request)
        except TimeoutError:
          err = b.TransientError("timeout", "request timed out")
        except b.TransientError as e:
          err = e
        except b.PermanentError as e:
          raise ImageFailed(f"{request.kind} request rejected: {self.redact(str(e))}") from None
        else:
          err = None
      if err is None:
        used = resp.input_tokens + resp.output_tokens
        self._tpm.adjust(used - reserved)
        cost = self.s.cost(resp.input_tokens, resp.output_tokens)
        self.totals.input_tokens += resp.input_tokens
        self.totals.output_tokens += resp.output_tokens
        self.totals.cost_usd += cost
        st.usage["input_tokens"] += resp.input_tokens
        st.usage["output_tokens"] += resp.output_tokens
        st.usage["cost_usd_micro"] += round(cost * 1e6)
        if self.cache is not None:
          self.cache.put(key, resp)
        return resp
      self._tpm.adjust(-reserved)
      st.retries[err.reason] += 1
      total_retries = sum(st.retries.values())
      if attempt == self.s.max_retries_per_request or total_retries > self.s.max_retries_per_image:
        raise ImageFailed(
          f"gave up on a {request.kind} request after {attempt + 1} tries "
          f"({total_retries} retries for this image): {err.reason}: {self.redact(str(err))}"
        )
      if err.retry_after is not None:
        delay = min(err.retry_after, self.s.max_retry_after_s)
        if err.reason == "rate_limited":
          self._rpm.pause(delay)  # the limit is the account's, not this request's
      else:
        delay = self._backoff(attempt)
      logging.debug("retrying %s for %s in %.2fs: %s", request.kind, st.image, delay, err.reason)
      await asyncio.sleep(delay)
    raise AssertionError("unreachable")

  # --- one image ---

  async def process_image(self, image_rel: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(outcome, record or None) of one image; raises BudgetExhausted or FatalError."""
    st = _ImageState(image_rel)
    r = self.recipe
    plan = recipe_lib.plan_image(r, image_rel)
    outcome: dict[str, Any] = {
      "image": image_rel,
      "id": "",
      "status": "",
      "reason": "",
      "k": plan.k,
    }
    record = None
    accepted: list[recipe_lib.AcceptedQA] = []
    try:
      image = await asyncio.to_thread(
        image_pool.prepare_image,
        self.root / image_rel,
        max_side=self.s.max_image_side,
        max_pixels=self.s.max_image_pixels,
      )
      sets = 0
      while len(accepted) < plan.target and sets < r.max_capability_sets:
        caps = plan.next_capabilities(r.capability_weights)
        if caps is None:
          break
        sets += 1
        for attempt in range(r.attempts_per_question):
          qa = await self._one_question(image, image_rel, caps, attempt, accepted, st)
          if qa is not None:
            accepted.append(qa)
            break
    except image_pool.ImageError as e:
      outcome.update(status="failed", reason=self.redact(str(e)))
    except ImageFailed as e:
      outcome.update(status="failed", reason=str(e))
    else:
      if len(accepted) >= r.min_questions:
        record = recipe_lib.assemble_record(
          r,
          image_rel,
          plan.k,
          accepted,
          backend=self.backend.name,
          model=self.backend.model,
          prompt_version=prompts_lib.PROMPT_VERSION,
        )
        outcome.update(status="accepted", id=record["id"])
      else:
        outcome.update(
          status="dropped",
          reason=f"too_few_verified: {len(accepted)} < min_questions={r.min_questions}",
        )
    outcome.update(
      capabilities=[list(qa.capabilities) for qa in accepted] if record else [],
      rejections=dict(st.rejections),
      stages=dict(st.stages),
      retries=dict(st.retries),
      usage=dict(st.usage),
    )
    return outcome, record

  async def _one_question(
    self,
    image: image_pool.PreparedImage,
    image_rel: str,
    caps: tuple[str, ...],
    attempt: int,
    accepted: Sequence[recipe_lib.AcceptedQA],
    st: _ImageState,
  ) -> recipe_lib.AcceptedQA | None:
    r = self.recipe

    def reject(reason: str) -> None:
      st.rejections[reason] += 1
      self.totals.rejections[reason] += 1

    system, user = prompts_lib.generation_prompt(caps)
    req = b.Request(
      "generation", image_rel, image, system, user, prompts_lib.GENERATION_SCHEMA, caps, attempt
    )
    st.stages["generated"] += 1
    gen = await self.call(req, st)
    try:
      qa = recipe_lib.parse_generation(gen.text)
    except recipe_lib.MalformedResponse as e:
      return reject(e.reason)
    st.stages["parsed"] += 1
    if reason := recipe_lib.screen(qa, caps, [a.question for a in accepted], r):
      return reject(reason)
    st.stages["screened"] += 1
    system, user = prompts_lib.verification_prompt(qa.question, qa.answer)
    vreq = b.Request(
      "verification", image_rel, image, system, user, prompts_lib.VERIFICATION_SCHEMA, caps,
      attempt, question=qa.question, answer=qa.answer,
    )  # fmt: skip
    ver = await self.call(vreq, st)
    try:
      verdict = recipe_lib.parse_verification(ver.text)
    except recipe_lib.MalformedResponse as e:
      return reject(f"verification_{e.reason}")
    st.stages["verification_parsed"] += 1
    if reason := recipe_lib.judge(verdict, caps, r):
      return reject(reason)
    st.stages["accepted"] += 1
    # In "size" mode the verifier, which saw the image, names the set the label records.
    label = caps if r.capability_match == "exact" else verdict.capabilities
    return recipe_lib.AcceptedQA(
      question=qa.question,
      answer=qa.answer,
      capabilities=tuple(label),
      generation={"response_id": gen.response_id, "hash": _hash(gen.text)},
      verification={"response_id": ver.response_id, "hash": _hash(ver.text)},
      verifier_reason=verdict.reason,
    )

  # --- the run ---

  def _progress(self, force: bool = False) -> None:
    if self._bar is None:
      return
    now = time.monotonic()
    if not force and now - self._last_bar < 0.5:
      return
    self._last_bar = now
    t = self.totals
    top = ",".join(f"{k}={v}" for k, v in t.rejections.most_common(3))
    rps = t.requests / max(now - self._t0, 1e-9)
    self._bar.set_postfix_str(
      f"qa={t.accepted_qa} rej[{top}] {rps:.1f}req/s tok={t.input_tokens + t.output_tokens} "
      f"${t.cost_usd:.4f}",
      refresh=False,
    )

  async def run(self, images: Sequence[str], *, already_done: int = 0, total: int = 0) -> str:
    """Processes ``images``; returns "" when all finished, else why the run stopped."""
    if self.s.progress:
      from tqdm import tqdm

      self._bar = tqdm(
        total=total or len(images), initial=already_done, unit="img", file=sys.stderr,
        mininterval=0.5, dynamic_ncols=True, desc="datagen",
      )  # fmt: skip
    todo = iter(images)
    self.files.open()
    loop = asyncio.get_running_loop()
    writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="datagen-writer")

    async def worker() -> None:
      for image_rel in todo:  # one shared iterator: each image goes to one worker
        if self.stop_reason:
          return
        try:
          outcome, record = await self.process_image(image_rel)
        except BudgetExhausted as e:
          self.stop_reason = self.stop_reason or f"budget: {e}"
          return
        except b.FatalError as e:
          self.stop_reason = self.stop_reason or f"fatal: {e}"  # no other worker starts a request
          raise
        # fsync takes milliseconds: do it off the event loop, in order, on one thread.
        await loop.run_in_executor(writer, self.files.write, outcome, record)
        self.totals.images += 1
        self.totals.statuses[outcome["status"]] += 1
        self.totals.accepted_qa += len(outcome["capabilities"])
        if self._bar is not None:
          self._bar.update(1)
          self._progress()

    tasks = [asyncio.create_task(worker()) for _ in range(self.s.max_concurrency)]
    try:
      done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
      for t in done:
        if t.exception() is not None:
          raise t.exception()
    except b.FatalError as e:
      raise b.FatalError(self.redact(str(e))) from None
    finally:
      for t in tasks:
        t.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)
      writer.shutdown(wait=True)
      self.files.close()
      if self._bar is not None:
        self._progress(force=True)
        self._bar.close()
    return self.stop_reason


# --- single calls outside the per-image loop (evaluation judges, the k-tagger) ----------------


def call_engine(
  backend: b.Backend,
  settings: EngineSettings,
  *,
  cache: ResponseCache | None,
  backend_params: dict[str, Any],
) -> Engine:
  """An engine for one-off requests made with ``call_once``: the cache, rate limits,
  retries and budget apply; datagen's per-image loop (recipe, shard files) is absent, so
  ``run`` and ``process_image`` must not be called on it."""
  return Engine(
    backend, None, settings, image_root=pathlib.Path("."), files=None, cache=cache,
    backend_params=backend_params,
  )  # fmt: skip


async def call_once(engine: Engine, request: b.Request) -> tuple[b.Response, bool]:
  """(reply, served from the cache) for one request through ``engine``.

  Raises:
    ImageFailed: the request failed for good (retries exhausted, or rejected).
    BudgetExhausted: a budget cap was reached.
    backends.FatalError: no request can succeed (bad key, unknown model).
  """
  st = _ImageState(request.image_rel)
  resp = await engine.call(request, st)
  return resp, bool(st.usage["cached"])


def _hash(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
