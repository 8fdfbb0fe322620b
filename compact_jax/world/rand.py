"""A fast random source for the world's inner loops, stable across Python versions.

Composing one question draws thousands of small random numbers; numpy's Generator
costs microseconds per scalar call, Python's `random.Random` a tenth of that. But
Python only promises that ``Random(seed).random()`` keeps its sequence across
versions (``choice``, ``shuffle`` and ``randrange`` have changed before), so every
draw here is derived from ``random()`` alone. A `Rand` is seeded from the per-image
numpy generator, so generation stays a function of (seed, split, index).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


class Rand:
  """Uniform draws built on `random.Random.random` only."""

  # One uniform draw in [0, 1): the generator's own bound method, not a wrapper, since the
  # question search calls it hundreds of thousands of times (and inlines `choice` with it).
  random: Callable[[], float]

  def __init__(self, seed: int):
    self.random = self._random = random.Random(seed).random

  @classmethod
  def spawn(cls, rng: np.random.Generator | Rand) -> Rand:
    """A Rand seeded from ``rng`` (which advances), or ``rng`` itself if a Rand."""
    if isinstance(rng, Rand):
      return rng
    return cls(int(rng.integers(2**63)))

  def integers(self, low: int, high: int | None = None) -> int:
    """One integer in [low, high), or in [0, low) when high is None."""
    if high is None:
      low, high = 0, low
    if high <= low:
      raise ValueError(f"empty range [{low}, {high})")
    return low + int(self._random() * (high - low))

  def choice(self, seq: Sequence[T]) -> T:
    n = len(seq)  # = seq[self.integers(n)], one call shorter
    if n == 0:
      raise ValueError("empty range [0, 0)")
    return seq[int(self._random() * n)]

  def shuffle(self, x: list) -> None:
    for i in range(len(x) - 1, 0, -1):
      j = int(self._random() * (i + 1))
      x[i], x[j] = x[j], x[i]

  def sample(self, seq: Sequence[T], k: int) -> list[T]:
    """k distinct elements of seq, in random order."""
    pool = list(seq)
    if k > len(pool):
      raise ValueError(f"cannot draw {k} distinct items from {len(pool)}")
    for i in range(k):
      j = i + int(self._random() * (len(pool) - i))
      pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]

  def weighted_sample(self, items: Sequence[T], weights: Sequence[float], k: int) -> list[T]:
    """k distinct items, each draw proportional to the weight of those left."""
    items, weights = list(items), [float(w) for w in weights]
    if k > len(items):
      raise ValueError(f"cannot draw {k} distinct items from {len(items)}")
    out = []
    for _ in range(k):
      x = self._random() * sum(weights)
      i = 0
      while i < len(items) - 1 and x >= weights[i]:
        x -= weights[i]
        i += 1
      out.append(items.pop(i))
      weights.pop(i)
    return out

  def bernoulli(self, p: float) -> bool:
    return self._random() < p
