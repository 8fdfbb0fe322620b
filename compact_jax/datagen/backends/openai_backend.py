"""Any OpenAI-compatible chat-completions server: OpenAI, vLLM, SGLang, Ollama, LM Studio.

The image goes in as a base64 data URL. With ``config.backend.structured_output`` the
reply is constrained by ``response_format={"type": "json_schema", ...}`` (vLLM and
SGLang support it through guided decoding); the parser copes with prose and code
fences either way. The SDK's own retries are off: the engine retries, so that it can
count, honour Retry-After and stop on the budget.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import openai

from compact_jax.datagen import backends as b


class OpenAIBackend:
  name = "openai"
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
    max_tokens_param: str,
    image_detail: str,
    concurrency: int = 1,
  ):
    self.model = model
    self.secrets = (key,)
    # Several clients, each with its own connection pool: the HTTP library scans every
    # connection of a pool per request, which costs O(concurrency) CPU per request.
    self._clients = [
      openai.AsyncOpenAI(api_key=key, base_url=base_url or None, timeout=timeout_s, max_retries=0)
      for _ in range(b.client_count(concurrency))
    ]
    self._turn = 0
    self._temperature = temperature
    self._top_p = top_p
    self._max_output_tokens = max_output_tokens
    self._structured = structured_output
    if max_tokens_param not in ("max_tokens", "max_completion_tokens"):
      raise ValueError(
        "config.backend.max_tokens_param must be 'max_tokens' or 'max_completion_tokens', "
        f"got {max_tokens_param!r}"
      )
    self._max_tokens_param = max_tokens_param
    self._detail = image_detail

  @classmethod
  def from_config(cls, config) -> OpenAIBackend:
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
      max_tokens_param=bc.max_tokens_param,
      image_detail=bc.image_detail,
      concurrency=int(config.datagen.max_concurrency),
    )

  async def call(self, request: b.Request) -> b.Response:
    content: list[dict[str, Any]] = [{"type": "text", "text": request.user}]
    if request.image is not None:
      url = f"data:{request.image.mime};base64,{base64.b64encode(request.image.data).decode()}"
      content.append({"type": "image_url", "image_url": {"url": url, "detail": self._detail}})
    kwargs = {
      "model": self.model,
      "messages": [
        {"role": "system", "content": request.system},
        {"role": "user", "content": content},
      ],
      "temperature": self._temperature,
      "top_p": self._top_p,
      self._max_tokens_param: self._max_output_tokens[request.kind],
    }
    if self._structured:
      kwargs["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": request.kind, "schema": request.schema, "strict": True},
      }
    try:
      # The SDK's generic `post` (its README's route for endpoints it does not wrap) sends the
      # body as is: `chat.completions.create` walks every parameter through its typed
      # transforms, about 7 ms of CPU per request, which caps one process near 100 requests/s.
      # `cast_to=object` returns the decoded JSON: building the pydantic `ChatCompletion`
      # cost another ~1 ms per request, for four fields read below.
      self._turn += 1
      client = self._clients[self._turn % len(self._clients)]
      resp = await client.post("/chat/completions", cast_to=object, body=kwargs)
    except openai.APITimeoutError as e:
      raise b.TransientError("timeout", f"request timed out: {type(e).__name__}") from None
    except openai.APIConnectionError as e:
      raise b.TransientError("connection", f"connection error: {type(e).__name__}") from None
    except openai.APIStatusError as e:
      status = e.status_code
      msg = f"HTTP {status}: {_short(e.message)}"
      if b.transient_for_status(status):
        reason = "rate_limited" if status == 429 else "server_error"
        raise b.TransientError(reason, msg, b.parse_retry_after(e.response.headers)) from None
      if status in (401, 403, 404):
        raise b.FatalError(f"{self.name} backend ({self.model}): {msg}") from None
      raise b.PermanentError(msg) from None
    return _parse_reply(resp)

  async def aclose(self) -> None:
    for client in self._clients:
      await client.close()


def _short(text: str, n: int = 200) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= n else text[:n] + "..."


def _parse_reply(resp: Any) -> b.Response:
  """A chat-completions JSON body -> Response. A reply without choices or content is an
  empty text (the engine counts it as a malformed reply); a body that is not a JSON object
  at all is a permanent error for this request."""
  if not isinstance(resp, dict):
    raise b.PermanentError(f"reply is not a JSON object: {_short(repr(resp))}")
  choices = resp.get("choices") or []
  message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
  text = message.get("content") if isinstance(message, dict) else None
  text = text if isinstance(text, str) else ""
  usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else {}
  rid = resp.get("id")
  return b.Response(
    text=text,
    response_id=rid
    if isinstance(rid, str) and rid
    else hashlib.sha256(text.encode()).hexdigest()[:24],
    input_tokens=_count(usage.get("prompt_tokens")),
    output_tokens=_count(usage.get("completion_tokens")),
  )


def _count(value: Any) -> int:
  # A server that omits usage (or sends junk) bills nothing rather than crashing the run.
  return int(value) if isinstance(value, (int, float)) and value >= 0 else 0
