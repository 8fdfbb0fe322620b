"""LLM calls for evaluation (judges, the k-tagger) through the datagen engine.

Every call goes through ``datagen.engine.Engine.call``: replies are cached in
SQLite keyed by (backend, model, prompt text, image hash, backend params), and
the engine's rate limits, retries with backoff and budget caps apply. The
backend is any of the datagen backends except the world oracle (``openai`` for
OpenAI or any OpenAI-compatible server, ``gemini``), configured by a sub-config
with ``backend`` and ``datagen`` sections shaped like configs/datagen.py's.

A call that fails for good (retries exhausted, rejected, budget reached) comes
back as an ``LLMReply`` with ``text=None`` and the reason; callers report it as
missing. A fatal error (bad key, unknown model) raises: no call can succeed.

A request carries the benchmark image or none: lmms-eval's MM-Vet and LLaVA-W judges
are text-only, and ``config.bench.judge_sees_image`` (default False) keeps ours so; a
multimodal judge given the image may grade differently (recorded as
``judge_sees_image`` in every result). The k-tagger always sends the image.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

from compact_jax.datagen import backends as backends_lib
from compact_jax.datagen import engine as engine_lib
from compact_jax.datagen import image_pool
from compact_jax.datagen import stages as datagen_stages


@dataclasses.dataclass(frozen=True)
class LLMCall:
  """One request. ``kind`` picks the backend's output cap: "verification" (short
  replies) or "generation" (long ones). ``attempt`` > 0 re-asks past the cache.
  ``image`` is encoded bytes, or None for a text-only request."""

  key: str
  image: bytes | None
  system: str
  user: str
  kind: str = "verification"
  schema: dict[str, Any] = dataclasses.field(default_factory=dict)
  attempt: int = 0


@dataclasses.dataclass(frozen=True)
class LLMReply:
  text: str | None  # None: the call failed for good
  error: str = ""
  cached: bool = False


class LLMClient:
  """Runs batches of ``LLMCall`` through one backend via the datagen engine.

  Args:
    llm_config: a ConfigDict with ``backend`` and ``datagen`` sections (see
      configs/eval.py ``c.bench.judge``).
    cache_path: the SQLite reply cache ("" or None = no cache).
  """

  def __init__(self, llm_config, cache_path: str | pathlib.Path | None):
    name = llm_config.backend.name
    backends_lib.check_backend_name(name)
    if name == "world":
      raise ValueError("The world oracle cannot judge or tag benchmark questions; set the "
                       "judge/tagger backend.name to 'openai' (or any OpenAI-compatible server) "
                       "or 'gemini'")  # fmt: skip
    self.config = llm_config
    self.settings = engine_lib.EngineSettings.from_config(llm_config)
    self.params = datagen_stages.backend_params(llm_config)
    self.cache_path = pathlib.Path(cache_path) if cache_path and llm_config.datagen.cache else None
    self.backend_name = name
    self.model = llm_config.backend.model
    self.last_totals: engine_lib.RunTotals | None = None

  def describe(self) -> dict[str, Any]:
    return {"backend": self.backend_name, "model": self.model, **self.params}

  def run(self, calls: Sequence[LLMCall]) -> list[LLMReply]:
    """Replies in the order of ``calls``."""
    if not calls:
      return []
    return asyncio.run(self._run(list(calls)))

  async def _run(self, calls: list[LLMCall]) -> list[LLMReply]:
    backend = backends_lib.make_backend(self.config, {})
    cache = engine_lib.ResponseCache(self.cache_path) if self.cache_path else None
    engine = engine_lib.call_engine(backend, self.settings, cache=cache, backend_params=self.params)
    images: dict[bytes, image_pool.PreparedImage] = {}

    async def one(call: LLMCall) -> LLMReply:
      image = None
      if call.image is not None:
        if call.image not in images:
          try:
            images[call.image] = image_pool.prepare_image_bytes(
              call.image, max_side=self.settings.max_image_side,
              max_pixels=self.settings.max_image_pixels,
            )  # fmt: skip
          except image_pool.ImageError as e:
            return LLMReply(None, f"{call.key}: image: {e}")
        image = images[call.image]
      request = backends_lib.Request(
        call.kind, call.key, image, call.system, call.user, call.schema, (), call.attempt
      )
      try:
        resp, cached = await engine_lib.call_once(engine, request)
      except engine_lib.ImageFailed as e:
        return LLMReply(None, str(e))
      except engine_lib.BudgetExhausted as e:
        return LLMReply(None, f"budget: {e}")
      return LLMReply(resp.text, "", cached=cached)

    try:
      return list(await asyncio.gather(*(one(c) for c in calls)))
    except backends_lib.FatalError as e:
      raise backends_lib.FatalError(engine.redact(str(e))) from None
    finally:
      self.last_totals = engine.totals
      await backend.aclose()
      if cache is not None:
        cache.close()
