"""Gemini through the current ``google-genai`` SDK (not the deprecated ``google-generativeai``).

JSON output is requested with ``response_mime_type="application/json"`` and a JSON
schema (``response_json_schema``). ``config.backend.base_url`` overrides the endpoint
(``HttpOptions.base_url``), for proxies and for the loopback test server. Thinking
tokens, billed as output, are counted as output tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import Any

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from compact_jax.datagen import backends as b

_RETRY_DELAY = re.compile(r'"retryDelay":\s*"([0-9.]+)s"')


class GeminiBackend:
  name = "gemini"
  cacheable = True

  def __init__(
    self,
    *,
    model: str,
    key: str,
    base_url: str,
    timeout_s: float,
    temperature: float,
    top_p: float,
    max_output_tokens: dict[str, int],
    structured_output: bool,
    thinking_budget: int,
    concurrency: int = 1,
  ):
    self.model = model
    self.secrets = (key,)
    options = types.HttpOptions(base_url=base_url or None, timeout=int(timeout_s * 1000))
    # One client per few connections, as in openai_backend.py.
    self._clients = [
      genai.Client(api_key=key, http_options=options) for _ in range(b.client_count(concurrency))
    ]
    self._turn = 0
    self._temperature = temperature
    self._top_p = top_p
    self._max_output_tokens = max_output_tokens
    self._structured = structured_output
    self._thinking_budget = thinking_budget

  @classmethod
  def from_config(cls, config) -> GeminiBackend:
    bc = config.backend
    return cls(
      model=bc.model,
      key=b.api_key(config),
      base_url=bc.base_url,
      timeout_s=float(bc.request_timeout_s),
      temperature=float(bc.temperature),
      top_p=float(bc.top_p),
      max_output_tokens={
        "generation": int(bc.generation_max_output_tokens),
        "verification": int(bc.verification_max_output_tokens),
      },
      structured_output=bool(bc.structured_output),
      thinking_budget=int(bc.thinking_budget),
      concurrency=int(config.datagen.max_concurrency),
    )

  async def call(self, request: b.Request) -> b.Response:
    cfg = {
      "system_instruction": request.system,
      "temperature": self._temperature,
      "top_p": self._top_p,
      "max_output_tokens": self._max_output_tokens[request.kind],
    }
    if self._structured:
      cfg["response_mime_type"] = "application/json"
      cfg["response_json_schema"] = request.schema
    if self._thinking_budget >= 0:
      cfg["thinking_config"] = types.ThinkingConfig(thinking_budget=self._thinking_budget)
    contents: list[Any] = [request.user]
    if request.image is not None:
      contents.insert(
        0, types.Part.from_bytes(data=request.image.data, mime_type=request.image.mime)
      )
    try:
      self._turn += 1
      client = self._clients[self._turn % len(self._clients)]
      resp = await client.aio.models.generate_content(
        model=self.model, contents=contents, config=types.GenerateContentConfig(**cfg)
      )
    except genai_errors.APIError as e:
      status = int(e.code or 0)
      msg = f"HTTP {status} {e.status or ''}: {_short(e.message or '')}".strip()
      if b.transient_for_status(status):
        retry_after = b.parse_retry_after(getattr(e.response, "headers", None))
        if retry_after is None:
          m = _RETRY_DELAY.search(str(e.details))
          retry_after = float(m.group(1)) if m else None
        reason = "rate_limited" if status == 429 else "server_error"
        raise b.TransientError(reason, msg, retry_after) from None
      if status in (401, 403, 404):
        raise b.FatalError(f"{self.name} backend ({self.model}): {msg}") from None
      raise b.PermanentError(msg) from None
    except Exception as e:
      # The SDK lets its HTTP library's errors through (httpx or httpx2, by version).
      kind = type(e).__name__
      module = type(e).__module__ or ""
      if module.startswith(("httpx", "httpcore", "aiohttp")) or isinstance(e, TimeoutError):
        reason = "timeout" if "Timeout" in kind or isinstance(e, TimeoutError) else "connection"
        raise b.TransientError(reason, f"{reason}: {kind}") from None
      raise
    try:
      text = resp.text or ""
    except ValueError:  # a blocked candidate has no text
      text = ""
    usage = resp.usage_metadata
    out_tokens = (getattr(usage, "candidates_token_count", 0) or 0) + (
      getattr(usage, "thoughts_token_count", 0) or 0
    )
    return b.Response(
      text=text,
      response_id=getattr(resp, "response_id", None)
      or hashlib.sha256(text.encode()).hexdigest()[:24],
      input_tokens=int(getattr(usage, "prompt_token_count", 0) or 0),
      output_tokens=int(out_tokens),
    )

  async def aclose(self) -> None:
    for client in self._clients:
      with contextlib.suppress(AttributeError):  # older SDKs have no aclose
        await client.aio.aclose()


def _short(text: str, n: int = 200) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= n else text[:n] + "..."
