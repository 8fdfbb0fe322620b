"""The generation and verification prompts, and the JSON shapes they ask for.

Bump `PROMPT_VERSION` whenever a prompt or schema changes: it is part of every
response-cache key and of each record's provenance, so old answers are never
served for new prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from compact_jax import capabilities as caps_lib

PROMPT_VERSION = "compact-jax-v1"

GENERATION_SCHEMA: dict[str, Any] = {
  "type": "object",
  "properties": {
    "question": {"type": "string"},
    "answer": {"type": "string"},
    "capabilities": {"type": "array", "items": {"type": "string"}},
  },
  "required": ["question", "answer", "capabilities"],
  "additionalProperties": False,
}

VERIFICATION_SCHEMA: dict[str, Any] = {
  "type": "object",
  "properties": {
    "capabilities": {"type": "array", "items": {"type": "string"}},
    "answer_correct": {"type": "boolean"},
    "reason": {"type": "string"},
  },
  "required": ["capabilities", "answer_correct", "reason"],
  "additionalProperties": False,
}


def capability_glossary() -> str:
  """One line per capability: ``- name: definition``."""
  return "\n".join(f"- {c}: {caps_lib.DEFINITIONS[c]}" for c in caps_lib.CAPABILITIES)


GENERATION_SYSTEM = """\
You write visual questions for training a vision-language model. Every question must need an \
exact set of atomic visual capabilities, chosen from this list:
{glossary}

Rules for the question you write:
1. Answering it must require every one of the requested capabilities, and no other capability.
2. It has one short, unambiguous answer: a single word or a short phrase.
3. It cannot be answered without looking at the image.
4. It is one question, not two questions joined with "and".
5. The answer does not appear in the question.

Reply with one JSON object and nothing else:
{{"question": "...", "answer": "...", "capabilities": ["...", ...]}}
where "capabilities" lists the capability names the question actually needs."""

GENERATION_USER = """\
Write one question about this image that needs EXACTLY these {k} capabilities: {names}."""

VERIFICATION_SYSTEM = """\
You check visual questions written for training a vision-language model. The atomic visual \
capabilities are:
{glossary}

Look at the image, the question and the proposed answer. Decide which of the capabilities \
above are needed to answer the question (all of them, and only them), and whether the proposed \
answer is correct for this image.

Reply with one JSON object and nothing else:
{{"capabilities": ["...", ...], "answer_correct": true or false, "reason": "one sentence"}}"""

VERIFICATION_USER = """\
Question: {question}
Proposed answer: {answer}"""


def generation_prompt(capabilities: Sequence[str]) -> tuple[str, str]:
  """(system, user) text asking for one question needing exactly ``capabilities``."""
  caps = caps_lib.canonical(capabilities)
  system = GENERATION_SYSTEM.format(glossary=capability_glossary())
  return system, GENERATION_USER.format(k=len(caps), names=", ".join(caps))


def verification_prompt(question: str, answer: str) -> tuple[str, str]:
  """(system, user) text asking which capabilities ``question`` needs and if ``answer`` is right."""
  system = VERIFICATION_SYSTEM.format(glossary=capability_glossary())
  return system, VERIFICATION_USER.format(question=question, answer=answer)
