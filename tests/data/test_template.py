"""Loss / prefix masks against hand-built examples."""

import numpy as np
import pytest

from compact_jax.data import template as template_lib
from tests import helpers


class CharTokenizer:
  """One token per character (ord), so expected ids can be written by hand."""

  bos_id, eos_id, pad_id = 1, 2, 0
  path = "chars"

  def encode(self, text):
    return [ord(c) for c in text]

  def single_id(self, piece):
    return ord(piece) if len(piece) == 1 else None


TOY = template_lib.ChatTemplate(
  name="toy",
  system="",
  prompt="U:{question}>",
  answer="{answer};",
  round_separator="|",
  end_with_eos=True,
)


def test_masks_match_hand_built_example():
  conv = [
    {"from": "human", "value": "<image>\nQ?"},
    {"from": "gpt", "value": "A"},
    {"from": "human", "value": "R"},
    {"from": "gpt", "value": "BC"},
  ]
  enc = template_lib.encode_conversation(conv, CharTokenizer(), TOY)
  o = [ord(c) for c in "U:Q?>"]
  expected_tokens = [
    1,
    *o,
    ord("A"),
    ord(";"),
    2,
    *[ord(c) for c in "|U:R>"],
    ord("B"),
    ord("C"),
    ord(";"),
    2,
  ]
  # BOS + first prompt = prefix (ar 0); everything after it is causal.
  expected_ar = [0] * 6 + [1] * 3 + [1] * 5 + [1] * 4
  expected_loss = [0] * 6 + [1] * 3 + [0] * 5 + [1] * 4
  np.testing.assert_array_equal(enc.tokens, expected_tokens)
  np.testing.assert_array_equal(enc.mask_ar, expected_ar)
  np.testing.assert_array_equal(enc.mask_loss, expected_loss)


def test_prompt_only_is_all_prefix():
  enc = template_lib.encode_conversation(
    [{"from": "human", "value": "<image>\nQ"}], CharTokenizer(), TOY
  )
  assert enc.mask_ar.sum() == 0 and enc.mask_loss.sum() == 0
  np.testing.assert_array_equal(enc.tokens, [1, *[ord(c) for c in "U:Q>"]])


def test_turns_must_alternate():
  with pytest.raises(ValueError, match="record 'r7': turn 1 is from 'human'"):
    template_lib.encode_conversation(
      [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
      CharTokenizer(),
      TOY,
      where="record 'r7'",
    )


def test_real_tokenizer_loss_tokens_decode_to_answers():
  tok = helpers.toy_tokenizer("gemma")
  template = template_lib.TEMPLATES["gemma"]
  conv = helpers.toy_conversations(3)[2]
  enc = template_lib.encode_conversation(conv, tok, template)
  # Split the trained tokens into contiguous runs; each must be answer + stop.
  runs, cur = [], []
  for t, m in zip(enc.tokens, enc.mask_loss):
    if m:
      cur.append(int(t))
    elif cur:
      runs.append(cur)
      cur = []
  if cur:
    runs.append(cur)
  stop = template_lib.stop_id(tok, template)
  assert [r[-1] for r in runs] == [stop, stop]
  assert [tok.decode(r[:-1]) for r in runs] == [conv[1]["value"], conv[3]["value"]]
  # The prompt prefix decodes to the templated question without the placeholder.
  prefix = enc.tokens[(enc.mask_ar == 0)][1:]
  assert "<image>" not in tok.decode(prefix)
  assert "What colour is the triangle?" in tok.decode(prefix)


def test_strip_placeholder():
  assert template_lib.strip_placeholder("<image>\nWhat?") == "What?"
  assert template_lib.strip_placeholder("What?<image>") == "What?"
