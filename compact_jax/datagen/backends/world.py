"""The tiny world as a backend: an oracle that knows every image's scene graph.

Generation composes a question that needs exactly the requested capabilities
(`compact_jax.world.compose.compose_question`, which runs the world's exactness
checks); verification re-resolves the question's program on the scene and reports
the program's true capability set and whether the proposed answer is the world's.
The recipe's filters, verification rule and assembly run unchanged on top, so the
offline path exercises the same engine as the real APIs.

The image pool (`build_world_pool`) is a directory of rendered scenes plus
``world_scenes.jsonl`` (one ``{"image", "scene"}`` per image, paths relative to
the pool), which the backend reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image

from compact_jax import capabilities as caps_lib
from compact_jax.datagen import backends as b
from compact_jax.world import compose as compose_lib
from compact_jax.world import questions as q_lib
from compact_jax.world import render as render_lib
from compact_jax.world import scene as scene_lib
from compact_jax.world.rand import Rand

SCENES_FILE = "world_scenes.jsonl"
MODEL = "tiny-world-oracle"


def build_world_pool(
  out: pathlib.Path,
  num_images: int,
  *,
  seed: int,
  image_size: int,
  grid_size: int,
  min_objects: int,
  max_objects: int,
) -> pathlib.Path:
  """Renders ``num_images`` scenes into ``out/images/`` and their graphs into
  ``out/world_scenes.jsonl``; a finished pool of the same size is reused."""
  scenes_path = out / SCENES_FILE
  if scenes_path.exists():
    lines = scenes_path.read_text(encoding="utf-8").splitlines()
    if len(lines) == num_images:
      return out
  (out / "images").mkdir(parents=True, exist_ok=True)
  rows = []
  for i in range(num_images):
    rng = Rand.spawn(np.random.default_rng([seed, 7, i]))
    scene = scene_lib.sample_scene(
      rng, grid_size=grid_size, min_objects=min_objects, max_objects=max_objects
    )
    rel = f"images/w_{i:06d}.png"
    Image.fromarray(render_lib.render_scene(scene, image_size), "RGB").save(out / rel)
    rows.append(json.dumps({"image": rel, "scene": scene.to_json()}, separators=(",", ":")))
  tmp = scenes_path.with_suffix(".tmp")
  tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
  os.replace(tmp, scenes_path)
  return out


def load_scenes(pool: pathlib.Path, image_root: pathlib.Path) -> dict[str, scene_lib.Scene]:
  """image path relative to ``image_root`` -> scene, from ``pool/world_scenes.jsonl``."""
  path = pool / SCENES_FILE
  if not path.exists():
    raise ValueError(
      f"The world backend needs {SCENES_FILE} next to its images ({path} is missing); leave "
      "config.images empty to render a pool, or point it at one"
    )
  prefix = pool.relative_to(image_root).as_posix()
  out = {}
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
    d = json.loads(line)
    rel = d["image"] if prefix == "." else f"{prefix}/{d['image']}"
    out[rel] = scene_lib.Scene.from_json(d["scene"], where=f"{path}:{n + 1}")
  return out


class WorldBackend:
  name = "world"
  model = MODEL
  cacheable = False  # answers are computed, free and deterministic
  secrets: tuple[str, ...] = ()

  def __init__(self, scenes: dict[str, scene_lib.Scene], *, seed: int, max_attempts: int):
    self._scenes = scenes
    self._seed = seed
    self._max_attempts = max_attempts
    # (image, question text) -> program, from generation to verification of one question.
    self._programs: dict[tuple[str, str], q_lib.Program] = {}
    # Requested capabilities -> the "no question" reply; most generation calls get one.
    self._no_question: dict[tuple[str, ...], b.Response] = {}

  @classmethod
  def from_config(cls, config, context: dict[str, Any]) -> WorldBackend:
    scenes = load_scenes(context["images_dir"], context["image_root"])
    return cls(scenes, seed=int(config.seed), max_attempts=int(config.backend.world_max_attempts))

  def _scene(self, request: b.Request) -> scene_lib.Scene:
    if request.image is None:
      raise b.PermanentError("the world oracle answers questions about its own images only")
    scene = self._scenes.get(request.image_rel)
    if scene is None:
      raise b.PermanentError(f"no scene graph for {request.image_rel!r} in {SCENES_FILE}")
    return scene

  async def call(self, request: b.Request) -> b.Response:
    scene = self._scene(request)
    if request.kind == "generation":
      q = None
      # `compose_question` returns None at once for an infeasible set, before any draw:
      # checking first skips seeding its generator (about half the requested sets are).
      if compose_lib.feasible(scene, caps_lib.canonical(request.capabilities)):
        key = json.dumps([self._seed, request.image.sha256, request.capabilities, request.attempt])
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        q = compose_lib.compose_question(
          scene, request.capabilities, Rand(seed), max_attempts=self._max_attempts
        )
      if q is None:
        return self._no_question_reply(request.capabilities)
      self._programs[(request.image_rel, q.text)] = q.program
      reply = {"question": q.text, "answer": q.answer, "capabilities": list(q.capabilities)}
    else:
      program = self._programs.pop((request.image_rel, request.question), None)
      if program is None:
        reply = {"capabilities": [], "answer_correct": False, "reason": "not a world question"}
      else:
        answer, why = q_lib.resolve(program, scene)
        reply = {
          "capabilities": sorted(program.capabilities),
          "answer_correct": answer == request.answer,
          "reason": f"the scene's answer is {answer!r}" if answer is not None else why,
        }
    return _response(reply)

  def _no_question_reply(self, capabilities: tuple[str, ...]) -> b.Response:
    resp = self._no_question.get(capabilities)
    if resp is None:
      reply = {"question": "", "answer": "", "capabilities": list(capabilities)}
      resp = self._no_question[capabilities] = _response(reply)
    return resp

  async def aclose(self) -> None:
    return None


def _response(reply: dict[str, Any]) -> b.Response:
  text = json.dumps(reply)
  return b.Response(text, hashlib.sha256(text.encode()).hexdigest()[:24], 0, 0)
