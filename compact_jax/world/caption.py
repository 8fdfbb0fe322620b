"""Dense captions of tiny-world scenes: the world's stand-in for LLaVA's caption data.

LLaVA-1.5 aligns its connector on 558K image captions before instruction tuning,
and its SigLIP/CLIP tower was pretrained on captions before that. A tiny-world model
starts from random weights, so a caption phase (``config.pretrain``, split
``captions``) plays both roles: every caption token depends on the picture, which
teaches the vision tower to see colour, form, letters, motion and layout far
faster than 2-3 short answers per image do.

A caption lists the ground, then every object in reading order (row-major) after
its cell, written as two digits "<row><column>" counted from 1 at the top left,
then the ropes by cell::

  grass, snow patch. 12 orange square moving up. 33 yellow house letter e.
  rope 33 42.

Terse on purpose: a 9-object scene stays near 100 tokens.

Captions are written for train images only; they state facts about the picture,
never a question's answer that the picture does not show, and test images are
disjoint from train images, so nothing about the test split leaks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from compact_jax.world import scene as scene_lib

PROMPT = "Describe the picture."
CAPTION_SOURCE = "tiny_world_caption"


def _cell(o: scene_lib.WorldObject, grid_size: int) -> str:
  # Two digits are unambiguous up to a 9 x 9 grid; larger grids separate them.
  sep = "" if grid_size <= 9 else ","
  return f"{o.row + 1}{sep}{o.col + 1}"


def describe(scene: scene_lib.Scene) -> str:
  """The dense caption of ``scene`` (deterministic: one scene, one caption)."""
  ground = scene.ground if scene.patch is None else f"{scene.ground}, {scene.patch_ground} patch"
  parts = [ground + "."]
  g = scene.grid_size
  for o in scene.objects:
    words = [_cell(o, g), o.color, o.kind]
    if o.letter is not None:
      words += ["letter", o.letter]
    if o.motion is not None:
      words += ["moving", o.motion]
    parts.append(" ".join(words) + ".")
  for a, b in scene.links:
    parts.append(f"rope {_cell(scene.objects[a], g)} {_cell(scene.objects[b], g)}.")
  return " ".join(parts)


def caption_record(example_id: str, image: str, scene: scene_lib.Scene) -> dict[str, Any]:
  """A LLaVA-format record asking for the caption of ``image``."""
  return {
    "id": f"{example_id}_caption",
    "image": image,
    "source": CAPTION_SOURCE,
    "conversations": [
      {"from": "human", "value": f"<image>\n{PROMPT}"},
      {"from": "gpt", "value": describe(scene)},
    ],
  }


def caption_records(
  records: Iterable[Mapping[str, Any]], scenes: Mapping[str, scene_lib.Scene]
) -> Iterator[dict[str, Any]]:
  """One caption record per QA record, for the same image (ids get ``_caption``)."""
  for rec in records:
    rid = rec["id"]
    if rid not in scenes:
      raise ValueError(f"record {rid!r} has no scene graph in the scenes file")
    yield caption_record(rid, rec["image"], scenes[rid])


def write_captions(generate_dir: str | os.PathLike, split: str = "train") -> Path:
  """Writes ``GENERATE_DIR/captions.jsonl`` for ``split``'s images; returns its path.

  Reads ``{split}.jsonl`` and ``scenes/{split}.jsonl`` (the generate stage's
  outputs); writes through a temporary file, so a kill leaves no partial file.
  """
  out = Path(generate_dir)
  scenes = {}
  scenes_path = out / "scenes" / f"{split}.jsonl"
  with open(scenes_path) as f:
    for n, line in enumerate(f, 1):
      d = json.loads(line)
      scenes[d["id"]] = scene_lib.Scene.from_json(d["scene"], where=f"{scenes_path}:{n}")
  path = out / "captions.jsonl"
  tmp = path.with_suffix(".jsonl.tmp")
  with open(out / f"{split}.jsonl") as src, open(tmp, "w") as dst:
    for cap in caption_records((json.loads(line) for line in src), scenes):
      dst.write(json.dumps(cap, separators=(",", ":")) + "\n")
  os.replace(tmp, path)
  return path
