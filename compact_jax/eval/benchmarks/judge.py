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

The datagen backends send exactly one image per request, so judges see the
benchmark image too. lmms-eval's MM-Vet and LLaVA-W judges are text-only; a
multimodal judge given the image may grade differently (recorded as
``judge_sees_image`` in every result).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import pathlib
from collections.abc import Sequence
from typing import Any

from PIL import Image

from compact_jax.datagen import backends as backends_lib
from compact_jax.datagen import engine as engine_lib
from compact_jax.datagen import image_pool
from compact_jax.datagen import stages as datagen_stages


def prepared_image(data: bytes, *, max_side: int, where: str) -> image_pool.PreparedImage:
  """Encoded bytes -> what a backend sends (downscaled past ``max_side``, PNG if the
  format is not one the APIs take as is)."""
  digest = hashlib.sha256(data).hexdigest()
  try:
    im = Image.open(io.BytesIO(data))
    im.load()
  except Exception as e:  # PIL raises many types for corrupt data
    raise ValueError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
  w, h = im.size
  scale = min(1.0, max_side / max(w, h))
  if scale == 1.0 and im.format in image_pool.SEND_AS_IS:
    return image_pool.PreparedImage(data, image_pool.SEND_AS_IS[im.format], digest, w, h, False)
  im = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
  if scale < 1.0:
    im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return image_pool.PreparedImage(
    buf.getvalue(), "image/png", digest, im.width, im.height, scale < 1
  )


@dataclasses.dataclass(frozen=True)
class LLMCall:
  """One request. ``kind`` picks the backend's output cap: "verification" (short
  replies) or "generation" (long ones). ``attempt`` > 0 re-asks past the cache."""

  key: str
  image: bytes
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
    # The engine's recipe and shard files belong to datagen's per-image loop; `call`,
    # the only method used here, reads neither.
    engine = engine_lib.Engine(
      backend, None, self.settings, image_root=pathlib.Path("."), files=None, cache=cache,
      backend_params=self.params,
    )  # fmt: skip
    images: dict[bytes, image_pool.PreparedImage] = {}

    async def one(call: LLMCall) -> LLMReply:
      if call.image not in images:
        images[call.image] = prepared_image(
          call.image, max_side=self.settings.max_image_side, where=call.key
        )
      request = backends_lib.Request(
        call.kind, call.key, images[call.image], call.system, call.user, call.schema, (),
        call.attempt,
      )  # fmt: skip
      st = engine_lib._ImageState(call.key)
      try:
        resp = await engine.call(request, st)
      except engine_lib.ImageFailed as e:
        return LLMReply(None, str(e))
      except engine_lib.BudgetExhausted as e:
        return LLMReply(None, f"budget: {e}")
      return LLMReply(resp.text, "", cached=bool(st.usage["cached"]))

    try:
      return list(await asyncio.gather(*(one(c) for c in calls)))
    except backends_lib.FatalError as e:
      raise backends_lib.FatalError(engine.redact(str(e))) from None
    finally:
      self.last_totals = engine.totals
      await backend.aclose()
      if cache is not None:
        cache.close()
