"""A loopback HTTP server speaking OpenAI chat completions and Gemini generateContent.

By default it answers like a cooperative model: a generation request gets a question
that embeds the requested capability set as ``(a+b)`` plus hash-derived filler words
(so questions about one image do not look alike), and a verification request reads
the set back from the question and approves the answer. Replies depend only on the
request, so two runs get the same bytes.

Faults are scripted per request kind (``"generation"``, ``"verification"``,
``"any"``) and consumed in order: ``429`` (with Retry-After), ``500``, ``timeout``
(the reply comes after ``timeout_sleep_s``), ``truncated`` JSON, ``fenced`` JSON
after prose, ``wrong_count`` (one capability too many), ``wrong_answer`` (the
verifier rejects the answer), ``401``.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import http.server
import io
import json
import re
import threading
import time
from typing import Any

from PIL import Image

_CAPS_ASKED = re.compile(r"EXACTLY these \d+ capabilities: ([a-z_, ]+)\.")
_CAPS_IN_Q = re.compile(r"\(([a-z_+]+)\)")
_QUESTION = re.compile(r"Question: (.*)\nProposed answer: (.*)", re.DOTALL)
_SYLLABLES = ("ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "bo", "di", "fa", "gu")


def _filler(seed: str, n: int = 6) -> list[str]:
  h = hashlib.sha256(seed.encode()).digest()
  return [_SYLLABLES[h[2 * i] % 14] + _SYLLABLES[h[2 * i + 1] % 14] + str(i) for i in range(n)]


class FakeVLMServer:
  """``with FakeVLMServer() as srv: ...`` runs it on 127.0.0.1 in a daemon thread."""

  def __init__(self, *, latency_s: float = 0.0, retry_after: str = "1",
               timeout_sleep_s: float = 3.0):  # fmt: skip
    self.latency_s = latency_s
    self.retry_after = retry_after
    self.timeout_sleep_s = timeout_sleep_s
    self.faults: dict[str, collections.deque] = collections.defaultdict(collections.deque)
    self.requests: list[dict[str, Any]] = []  # path, headers, kind, time, status, image size
    self._lock = threading.Lock()
    srv = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"
      # Headers and body go out in two writes; with Nagle on, a keep-alive client waits
      # for the delayed ACK (40 ms) on every reply.
      disable_nagle_algorithm = True

      def log_message(self, *args):  # keep test output clean
        pass

      def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:
          hdrs = {k.lower(): v for k, v in self.headers.items()}
          status, headers, payload = srv._handle(self.path, hdrs, json.loads(body))
        except Exception as e:  # a bug in the fake must not look like a timeout
          status, headers, payload = 599, {}, {"error": {"message": repr(e)}}
        data = json.dumps(payload).encode()
        try:
          self.send_response(status)
          for k, v in headers.items():
            self.send_header(k, v)
          self.send_header("content-type", "application/json")
          self.send_header("content-length", str(len(data)))
          self.end_headers()
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client gave up (a scripted timeout)

    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._httpd.daemon_threads = True
    self.port = self._httpd.server_address[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

  def __enter__(self) -> FakeVLMServer:
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()

  def script(self, kind: str, *faults: str) -> None:
    with self._lock:
      self.faults[kind].extend(faults)

  # --- protocol ---

  def _handle(self, path: str, headers: dict[str, str], body: dict[str, Any]):
    if path.endswith("/chat/completions"):
      protocol = "openai"
      system = body["messages"][0]["content"]
      parts = body["messages"][1]["content"]
      user = next(p["text"] for p in parts if p["type"] == "text")
      url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
      image = base64.b64decode(url.split(",", 1)[1])
      model = body["model"]
    elif ":generateContent" in path:
      protocol = "gemini"
      system = body["systemInstruction"]["parts"][0]["text"]
      parts = body["contents"][0]["parts"]
      user = next(p["text"] for p in parts if "text" in p)
      data = next(p["inlineData"]["data"] for p in parts if "inlineData" in p)
      image = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
      model = path.split("/models/")[1].split(":")[0]
    else:
      return 404, {}, {"error": {"message": f"no route {path}"}}
    kind = "verification" if user.startswith("Question:") else "generation"
    with self._lock:
      fault = ""
      for key in (kind, "any"):
        if self.faults[key]:
          fault = self.faults[key].popleft()
          break
      size = Image.open(io.BytesIO(image)).size
      self.requests.append({"path": path, "headers": headers, "kind": kind, "fault": fault,
                            "time": time.monotonic(), "image_size": size,
                            "image_sha": hashlib.sha256(image).hexdigest(),
                            "protocol": protocol})  # fmt: skip
    if self.latency_s:
      time.sleep(self.latency_s)
    if fault in ("429", "500", "401"):
      code = int(fault)
      status = {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 401: "UNAUTHENTICATED"}[code]
      hdrs = {"retry-after": self.retry_after} if code == 429 else {}
      return code, hdrs, {"error": {"code": code, "message": f"scripted {code}", "status": status,
                                    "type": "scripted"}}  # fmt: skip
    if fault == "timeout":
      time.sleep(self.timeout_sleep_s)
    text = self._reply(kind, system, user, image, fault)
    rid = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]
    in_tok, out_tok = 100 + len(user) // 4, len(text) // 4
    if protocol == "openai":
      return 200, {}, {
        "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": in_tok, "completion_tokens": out_tok,
                  "total_tokens": in_tok + out_tok},
      }  # fmt: skip
    return 200, {}, {
      "candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                      "finishReason": "STOP", "index": 0}],
      "usageMetadata": {"promptTokenCount": in_tok, "candidatesTokenCount": out_tok,
                        "totalTokenCount": in_tok + out_tok},
      "modelVersion": model, "responseId": f"gem-{rid}",
    }  # fmt: skip

  def _reply(self, kind: str, system: str, user: str, image: bytes, fault: str) -> str:
    if kind == "generation":
      m = _CAPS_ASKED.search(user)
      caps = [c.strip() for c in m.group(1).split(",")] if m else []
      seed = hashlib.sha256(image).hexdigest() + user
      question = f"What {' '.join(_filler(seed))} ({'+'.join(caps)})?"
      claimed = list(caps)
      if fault == "wrong_count":
        claimed.append(next(c for c in ("counting", "color", "shape") if c not in caps))
      obj = {"question": question, "answer": "teal", "capabilities": claimed}
    else:
      m = _QUESTION.search(user)
      q = m.group(1) if m else ""
      mc = _CAPS_IN_Q.search(q)
      caps = mc.group(1).split("+") if mc else []
      if fault == "wrong_count":
        caps = (
          caps[:-1] if len(caps) > 1 else [*caps, "counting" if "counting" not in caps else "color"]
        )
      obj = {"capabilities": caps, "answer_correct": fault != "wrong_answer",
             "reason": "scripted wrong answer" if fault == "wrong_answer" else "looks right"}  # fmt: skip
    text = json.dumps(obj)
    if fault == "truncated":
      return text[: len(text) // 2]
    if fault == "fenced":
      return f"Sure! Here is the JSON you asked for:\n```json\n{text}\n```\nAnything else?"
    return text


def main() -> None:
  """``python -m tests.datagen.fake_server --latency 0.2``: serves until killed, printing its
  URL first (the benchmark runs it in its own process, off the client's GIL)."""
  import argparse

  ap = argparse.ArgumentParser()
  ap.add_argument("--latency", type=float, default=0.0)
  args = ap.parse_args()
  with FakeVLMServer(latency_s=args.latency) as srv:
    print(srv.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
  main()
