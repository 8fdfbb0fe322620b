"""Robust yes/no parsing for MME and POPE.

The answer is the first *whole word* "yes" or "no" (case-insensitive, any
punctuation around it), or a bare "y"/"n". Deliberate differences from the
references (shared/reference/data_formats_benchmarks_metrics.md §3.1, §4 item 12):
- lmms-eval's MME ``parse_pred_ans`` (from Otter) looks for the substring "no" in
  the first 4 characters, so "notice", "nothing", "none" read as "no" (VLMEvalKit
  #73). Here they are "other" (scored wrong).
- lmms-eval's POPE compares ``pred.lower().strip() == "yes"`` exactly, so "Yes."
  or "Yes, there is." score wrong. Here they are "yes".
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z]+")


def parse_yes_no(text: str) -> str:
  """ "yes", "no", or "other"."""
  words = _WORD.findall(text.lower())
  if len(words) == 1 and words[0] in ("y", "n"):
    return "yes" if words[0] == "y" else "no"
  for w in words:
    if w in ("yes", "no"):
      return w
  return "other"


def reference_yes_no(answer: str, *, where: str) -> str:
  a = answer.strip().lower().rstrip(".")
  if a not in ("yes", "no"):
    raise ValueError(f"{where}: the reference answer must be yes or no, got {answer!r}")
  return a
