"""Shared tiny fixtures for tests: a trained toy tokenizer and toy records."""

from __future__ import annotations

import functools
import os
import tempfile

from compact_jax.data import template as template_lib
from compact_jax.data.tokenizer import Tokenizer, train_tokenizer

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")


def toy_conversations(n: int = 40) -> list[list[dict]]:
  out = []
  for i in range(n):
    c, s = COLOURS[i % 4], SHAPES[i % 3]
    out.append(
      [
        {"from": "human", "value": f"<image>\nWhat colour is the {s}?"},
        {"from": "gpt", "value": c},
        {"from": "human", "value": f"How many {c} objects are there?"},
        {"from": "gpt", "value": str(i % 5)},
      ]
    )
  return out


@functools.cache
def toy_tokenizer(template_name: str = "gemma") -> Tokenizer:
  template = template_lib.TEMPLATES[template_name]
  texts = [template_lib.rendered_text(c, template) for c in toy_conversations()]
  path = os.path.join(tempfile.mkdtemp(prefix="toytok"), "tok.model")
  return train_tokenizer(texts, path, vocab_size=128, control_symbols=template.control_symbols)
