"""Chat templates, and token-level loss / attention masks built from spans.

A conversation is encoded segment by segment: BOS, the system text, then for
each round a *prompt* segment (user question plus the assistant's opening) and
an *answer* segment (the answer plus the turn terminator). Masks are set per
segment as its tokens are appended, so they are exact by construction; nothing
is ever re-tokenized to find where an answer starts (the LLaVA-1.5 scripts do,
and silently mask whole samples when the lengths disagree, see
shared/reference/data_formats_benchmarks_metrics.md §2.3).

Masks follow big_vision's PaliGemma contract:
- ``mask_ar``: 0 for the full-attention prefix (BOS, system, the first prompt),
  1 for everything after it (causal).
- ``mask_loss``: 1 on tokens the model is trained to produce (answers and their
  terminator), 0 elsewhere. Targets are next tokens: the logit at position t is
  scored against ``tokens[t + 1]`` with weight ``mask_loss[t + 1]``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

from compact_jax.data.tokenizer import Tokenizer

IMAGE_PLACEHOLDER = "<image>"
_PLACEHOLDER_RE = re.compile(r"<image>\n?")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How one family of models formats a conversation.

  Attributes:
    name: key in TEMPLATES.
    system: text after BOS, before the first round.
    prompt: format of a round's prompt segment, with ``{question}``.
    answer: format of a round's answer segment, with ``{answer}``.
    round_separator: text opening every round after the first (untrained).
    end_with_eos: append the tokenizer's EOS id to every answer (LLaMA's ``</s>``).
    stop: the string whose token ends generation ("" = the EOS id).
    control_symbols: strings a tokenizer we train must keep as single tokens.
  """

  name: str
  system: str
  prompt: str
  answer: str
  round_separator: str = ""
  end_with_eos: bool = False
  stop: str = ""
  control_symbols: tuple[str, ...] = ()


TEMPLATES: Mapping[str, ChatTemplate] = {
  # Gemma / PaliGemma-2 instruction format.
  "gemma": ChatTemplate(
    name="gemma",
    system="",
    prompt="<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n",
    answer="{answer}<end_of_turn>",
    round_separator="\n",
    stop="<end_of_turn>",
    control_symbols=("<start_of_turn>", "<end_of_turn>"),
  ),
  # LLaVA-1.5's `--version v1` (conv_vicuna_v1): SeparatorStyle.TWO, sep " ", sep2 "</s>".
  "vicuna_v1": ChatTemplate(
    name="vicuna_v1",
    system=(
      "A chat between a curious user and an artificial intelligence assistant. "
      "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    prompt=" USER: {question} ASSISTANT:",
    answer=" {answer}",
    end_with_eos=True,
  ),
  # LLaVA's `plain` template for connector alignment on captions: the image
  # is the whole prompt and the caption is the answer.
  "plain": ChatTemplate(
    name="plain",
    system="",
    prompt="{question}",
    answer="{answer}\n",
    end_with_eos=True,
  ),
}


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One tokenized conversation: int32[T] arrays of equal length."""

  tokens: np.ndarray
  mask_ar: np.ndarray
  mask_loss: np.ndarray

  def __len__(self) -> int:
    return len(self.tokens)


def strip_placeholder(text: str) -> str:
  """Removes ``<image>`` (and the newline after it); the model prepends the image."""
  return _PLACEHOLDER_RE.sub("", text)


def stop_id(tokenizer: Tokenizer, template: ChatTemplate) -> int:
  """The token id that ends an answer under ``template``."""
  if not template.stop:
    return tokenizer.eos_id
  sid = tokenizer.single_id(template.stop)
  if sid is None:
    raise ValueError(
      f"Template {template.name!r} stops on {template.stop!r}, which is not one token of "
      f"{tokenizer.path}; train the tokenizer with the template's control symbols"
    )
  return sid


def _segments(
  conversations: Sequence[Mapping[str, str]], template: ChatTemplate, *, where: str
) -> list[tuple[str, str]]:
  """Splits a conversation into ("prompt"|"answer", text) segments."""
  segs: list[tuple[str, str]] = []
  expect = "human"
  for i, turn in enumerate(conversations):
    role = turn.get("from")
    if role != expect:
      raise ValueError(f"{where}: turn {i} is from {role!r}, expected {expect!r} (turns alternate)")
    value = turn.get("value")
    if not isinstance(value, str):
      raise ValueError(f"{where}: turn {i} has no string 'value'")
    if role == "human":
      sep = template.round_separator if segs else ""
      segs.append(
        ("prompt", sep + template.prompt.format(question=strip_placeholder(value).strip()))
      )
      expect = "gpt"
    else:
      segs.append(("answer", template.answer.format(answer=value.strip())))
      expect = "human"
  return segs


def encode_conversation(
  conversations: Sequence[Mapping[str, str]],
  tokenizer: Tokenizer,
  template: ChatTemplate,
  *,
  where: str = "record",
) -> Encoded:
  """Tokenizes a LLaVA conversation with exact prefix / loss masks.

  Args:
    conversations: ``[{"from": "human"|"gpt", "value": str}, ...]`` alternating,
      starting with human. A trailing human turn (no answer) is allowed and
      is encoded as prompt only, which is how prompts for decoding are built.
    tokenizer: the tokenizer.
    template: the chat template.
    where: names the record in errors.

  Returns:
    Encoded with int32[T] ``tokens``, ``mask_ar``, ``mask_loss``.
  """
  toks: list[int] = []
  ar: list[int] = []
  loss: list[int] = []

  def add(ids: Sequence[int], *, ar_value: int, loss_value: int) -> None:
    toks.extend(ids)
    ar.extend([ar_value] * len(ids))
    loss.extend([loss_value] * len(ids))

  add([tokenizer.bos_id], ar_value=0, loss_value=0)
  if template.system:
    add(tokenizer.encode(template.system), ar_value=0, loss_value=0)
  answers_seen = False
  for kind, text in _segments(conversations, template, where=where):
    ids = tokenizer.encode(text)
    if kind == "prompt":
      # The first prompt belongs to the prefix; later rounds are causal.
      add(ids, ar_value=int(answers_seen), loss_value=0)
    else:
      if template.end_with_eos:
        ids = [*ids, tokenizer.eos_id]
      add(ids, ar_value=1, loss_value=1)
      answers_seen = True
  return Encoded(
    tokens=np.asarray(toks, np.int32),
    mask_ar=np.asarray(ar, np.int32),
    mask_loss=np.asarray(loss, np.int32),
  )


def encode_prompt(question: str, tokenizer: Tokenizer, template: ChatTemplate) -> np.ndarray:
  """int32[P] prompt tokens for decoding one question (all of it is prefix)."""
  return encode_conversation([{"from": "human", "value": question}], tokenizer, template).tokens


def rendered_text(conversations: Sequence[Mapping[str, str]], template: ChatTemplate) -> str:
  """The conversation as one string, for training a tokenizer on it."""
  body = "".join(text for _, text in _segments(conversations, template, where="record"))
  return template.system + body
