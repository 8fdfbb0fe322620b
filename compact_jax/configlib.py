"""Helpers for config files: parsing the ``:arg`` string after a config path."""

from __future__ import annotations

import ast

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"smoke,res=96,name=x"`` into a ConfigDict over ``defaults``.

  A bare word sets a boolean default to True. Values are Python literals when
  they parse as one, else strings. Unknown keys are an error, so a typo in the
  ``:arg`` part fails as loudly as one in ``--config.key``.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, raw = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise KeyError(f"Unknown config argument {key!r}; known: {sorted(defaults)}")
    if not sep:
      if not isinstance(defaults[key], bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...)")
      out[key] = True
      continue
    try:
      value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
      value = raw.strip()
    out[key] = type(defaults[key])(value) if defaults[key] is not None else value
  return out
