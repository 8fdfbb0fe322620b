"""COMPACT's ten atomic visual capabilities, the one home of their names.

Every stage (the world, the generator, the builder, the evaluator) refers to
capabilities by these exact strings; records store them as sorted lists.
The definitions are ours, written for prompts and documentation (COMPACT,
arXiv 2504.21850, Table 1 lists the same ten names).
"""

from __future__ import annotations

from collections.abc import Iterable

CAPABILITIES: tuple[str, ...] = (
  "color",
  "shape",
  "object_recognition",
  "action_recognition",
  "text_recognition",
  "spatial_recognition",
  "counting",
  "spatial_relationship",
  "object_interaction",
  "scene_understanding",
)

DEFINITIONS: dict[str, str] = {
  "color": "Name or compare the colour of an object or region.",
  "shape": "Tell the geometric form or outline of an object (round, square, triangular, ...).",
  "object_recognition": "Say what kind of thing an object is (a car, a tree, a cup, ...).",
  "action_recognition": "Say what an object or person is doing, or which way it is moving.",
  "text_recognition": "Read characters, words or numbers written in the image.",
  "spatial_recognition": "Locate something in the frame: which part of the image it is in.",
  "counting": "Count how many objects of some kind there are.",
  "spatial_relationship": "Relate two objects in space: left of, right of, above, below.",
  "object_interaction": "Tell how two objects interact or are connected to each other.",
  "scene_understanding": "Say what kind of place or setting the whole image shows.",
}


def canonical(capabilities: Iterable[str], *, where: str = "") -> tuple[str, ...]:
  """Returns the capabilities sorted and deduplicated, failing on unknown names.

  Args:
    capabilities: capability names.
    where: what holds them (a record id, a file), named in the error.
  """
  caps = tuple(sorted(set(capabilities)))
  unknown = [c for c in caps if c not in DEFINITIONS]
  if unknown:
    at = f" in {where}" if where else ""
    raise ValueError(f"Unknown capability name(s) {unknown}{at}; known: {list(CAPABILITIES)}")
  return caps
