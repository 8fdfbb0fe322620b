"""One interface for every model the generator can ask: `Backend.call(Request) -> Response`.

Backends translate transport failures into three error kinds that the engine acts on:
`TransientError` (retry with backoff: 429, 5xx, timeouts, dropped connections),
`PermanentError` (this image fails, with the reason), `FatalError` (the run stops:
bad key, unknown model). `make_backend` picks one from ``config.backend.name`` via
the explicit `BACKENDS` table.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, Protocol

from compact_jax.datagen.image_pool import PreparedImage


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation or verification call about one image (or about none: evaluation
  judges grade text only, as lmms-eval's do; the world oracle needs an image)."""

  kind: str  # "generation" | "verification"
  image_rel: str
  image: PreparedImage | None
  system: str
  user: str
  schema: dict[str, Any]
  capabilities: tuple[str, ...]  # the set requested for this question
  attempt: int = 0
  question: str = ""  # verification only
  answer: str = ""

  def cache_payload(self) -> dict[str, Any]:
    """What the reply depends on, besides the image (hashed separately) and the backend."""
    return {
      "kind": self.kind,
      "system": self.system,
      "user": self.user,
      "schema": self.schema,
      "attempt": self.attempt,
    }


@dataclasses.dataclass(frozen=True)
class Response:
  text: str
  response_id: str
  input_tokens: int
  output_tokens: int


class TransientError(Exception):
  """Worth retrying; ``retry_after`` is the server's wait hint in seconds, if any."""

  def __init__(self, reason: str, message: str, retry_after: float | None = None):
    self.reason = reason
    self.retry_after = retry_after
    super().__init__(message)


class PermanentError(Exception):
  """This request cannot succeed (e.g. the server rejects the image)."""


class FatalError(Exception):
  """No request can succeed (bad key, unknown model): stop the run."""


class Backend(Protocol):
  name: str
  model: str
  cacheable: bool  # whether replies are worth caching (they cost money or time)
  secrets: tuple[str, ...]  # strings to scrub from every message the run writes

  async def call(self, request: Request) -> Response: ...

  async def aclose(self) -> None: ...


def api_key(config) -> str:
  """The API key from the environment variable the config names (never from the config)."""
  env = config.backend.api_key_env
  if not env:
    raise ValueError(f"config.backend.api_key_env is empty: name the environment variable "
                     f"holding the {config.backend.name} API key")  # fmt: skip
  key = os.environ.get(env, "")
  if not key:
    raise ValueError(
      f"Backend {config.backend.name!r} needs an API key in the environment variable {env} "
      f"(config.backend.api_key_env), which is unset or empty"
    )
  return key


def parse_retry_after(headers: Any) -> float | None:
  """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds; HTTP dates are ignored)."""
  if headers is None:
    return None
  for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
    value = headers.get(name)
    if value is None:
      continue
    try:
      return max(0.0, float(value) * scale)
    except (TypeError, ValueError):
      continue
  return None


CONNECTIONS_PER_CLIENT = 8


def client_count(concurrency: int) -> int:
  """SDK clients for ``concurrency`` requests in flight, at most 8 connections each."""
  return max(1, -(-concurrency // CONNECTIONS_PER_CLIENT))


def transient_for_status(status: int) -> bool:
  return status in (408, 409, 425, 429) or status >= 500


def _world(config, context):
  from compact_jax.datagen.backends.world import WorldBackend

  return WorldBackend.from_config(config, context)


def _openai(config, context):
  from compact_jax.datagen.backends.openai_backend import OpenAIBackend

  return OpenAIBackend.from_config(config)


def _gemini(config, context):
  from compact_jax.datagen.backends.gemini import GeminiBackend

  return GeminiBackend.from_config(config)


# name -> factory(config, context); context carries what a backend may need from the run
# (the world backend's scene graphs live next to its image pool).
BACKENDS: dict[str, Callable[[Any, dict[str, Any]], Backend]] = {
  "world": _world,
  "openai": _openai,
  "gemini": _gemini,
}


def check_backend_name(name: str) -> None:
  if name not in BACKENDS:
    raise ValueError(
      f"Unknown backend {name!r} (config.backend.name); choose from {list(BACKENDS)}"
    )


def make_backend(config, context: dict[str, Any]) -> Backend:
  check_backend_name(config.backend.name)
  return BACKENDS[config.backend.name](config, context)
