"""The ``datagen`` and ``merge`` stages (``mix`` is in mix.py).

``datagen`` writes ``WORKDIR/datagen/shard-IIIII-of-NNNNN/``:
- ``records.jsonl``: one LLaVA/COMPACT record per accepted image (append-only);
- ``outcomes.jsonl``: one line per finished image (accepted, dropped or failed, with
  the reason, rejection counts, retries, tokens);
- ``settings.json``: what the records depend on (a resumed run must match it);
- ``report.json``: counts, written at the end of every invocation.
The response cache is ``WORKDIR/datagen/cache.sqlite`` (kept by ``--overwrite``).

``merge`` checks that every shard finished and writes ``WORKDIR/datagen/records.jsonl``
(sorted by id) and ``WORKDIR/datagen/report.json``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import shutil
from typing import Any

import ml_collections

from compact_jax.data import records as records_lib
from compact_jax.datagen import backends as backends_lib
from compact_jax.datagen import engine as engine_lib
from compact_jax.datagen import image_pool
from compact_jax.datagen import prompts as prompts_lib
from compact_jax.datagen import recipe as recipe_lib
from compact_jax.datagen import report as report_lib

MERGED_RECORDS = "records.jsonl"


def datagen_dir(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir) / "datagen"


def shard_dir(workdir: str | os.PathLike, index: int, num: int) -> pathlib.Path:
  return datagen_dir(workdir) / f"shard-{index:05d}-of-{num:05d}"


def _pool(config, workdir: str) -> tuple[pathlib.Path, pathlib.Path]:
  """(images dir, image root); for the world backend with no images, a rendered pool."""
  if not config.images:
    if config.backend.name != "world":
      raise ValueError(
        f"config.images is empty: backend {config.backend.name!r} needs a directory of images"
      )
    from compact_jax.datagen.backends.world import build_world_pool

    w = config.world
    pool = build_world_pool(
      datagen_dir(workdir) / "world_pool",
      int(config.datagen.world_pool_images),
      seed=int(config.seed),
      image_size=int(w.image_size),
      grid_size=int(w.grid_size),
      min_objects=int(w.min_objects),
      max_objects=int(w.max_objects),
    )
    root = pathlib.Path(config.image_root).resolve() if config.image_root else pool.resolve()
    return pool.resolve(), root
  return image_pool.resolve_roots(config.images, config.image_root)


def _settings_json(config, recipe, images_dir, image_root) -> dict[str, Any]:
  """What the records depend on; engine knobs (concurrency, budget) may change on resume."""
  return {
    "recipe": json.loads(json.dumps(recipe.__dict__)),
    "backend": config.backend.name,
    "model": config.backend.model,
    "prompt_version": prompts_lib.PROMPT_VERSION,
    "images": str(images_dir),
    "image_root": str(image_root),
    "shard_index": int(config.shard_index),
    "num_shards": int(config.num_shards),
  }


def backend_params(config) -> dict[str, Any]:
  """The backend settings a reply depends on (part of the cache key)."""
  bc = config.backend
  return {
    "temperature": float(bc.temperature),
    "top_p": float(bc.top_p),
    "generation_max_output_tokens": int(bc.generation_max_output_tokens),
    "verification_max_output_tokens": int(bc.verification_max_output_tokens),
    "structured_output": bool(bc.structured_output),
  }


def dry_run_text(config, recipe: recipe_lib.RecipeSettings, image_rel: str) -> str:
  plan = recipe_lib.plan_image(recipe, image_rel)
  caps = plan.next_capabilities(recipe.capability_weights)
  g_sys, g_user = prompts_lib.generation_prompt(caps)
  v_sys, v_user = prompts_lib.verification_prompt("{question}", "{answer}")
  return "\n".join([
    f"=== dry run: backend {config.backend.name} model {config.backend.model} "
    f"prompt {prompts_lib.PROMPT_VERSION}",
    f"=== first image {image_rel}: k={plan.k}, {plan.target} questions, first set {list(caps)}",
    "--- generation system prompt ---", g_sys,
    "--- generation user prompt (+ the image) ---", g_user,
    "--- verification system prompt ---", v_sys,
    "--- verification user prompt (+ the image) ---", v_user,
  ])  # fmt: skip


def run_datagen(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Generates (or resumes) this shard's records; returns its report."""
  workdir = os.fspath(workdir)
  backends_lib.check_backend_name(config.backend.name)
  recipe = recipe_lib.RecipeSettings.from_config(config)
  settings = engine_lib.EngineSettings.from_config(config)
  num, index = int(config.num_shards), int(config.shard_index)
  if num < 1 or not 0 <= index < num:
    raise ValueError(f"need 0 <= config.shard_index < config.num_shards, got {index}, {num}")
  images_dir, root = _pool(config, workdir)
  images = [
    p for p in image_pool.list_images(images_dir, root) if image_pool.shard_of(p, num) == index
  ]
  if config.dry_run:
    text = dry_run_text(config, recipe, images[0]) if images else "(this shard has no images)"
    print(text, flush=True)
    return {"dry_run": True, "images": len(images)}

  context = {"images_dir": images_dir, "image_root": root}
  backend = backends_lib.make_backend(config, context)  # fails here on a missing API key
  out = shard_dir(workdir, index, num)
  if config.overwrite and out.exists():
    shutil.rmtree(out)
  out.mkdir(parents=True, exist_ok=True)
  want = _settings_json(config, recipe, images_dir, root)
  settings_path = out / "settings.json"
  if settings_path.exists():
    have = json.loads(settings_path.read_text())
    if have != want:
      changed = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
      raise ValueError(
        f"{out} holds a run made with other settings (keys {changed}); rerun with --overwrite "
        "to start over (cached replies are kept)"
      )
  else:
    settings_path.write_text(json.dumps(want, indent=1))

  files = engine_lib.ShardFiles(out, fsync=settings.fsync)
  outcomes = files.resume()

  def skip(image: str) -> bool:
    o = outcomes.get(image)
    return o is not None and not (settings.retry_failed and o["status"] == "failed")

  todo = [p for p in images if not skip(p)]
  if outcomes:
    logging.info("datagen: resuming, %d of %d images already finished", len(images) - len(todo),
                 len(images))  # fmt: skip
  cache = None
  if backend.cacheable and config.datagen.cache:
    cache = engine_lib.ResponseCache(datagen_dir(workdir) / "cache.sqlite")
  engine = engine_lib.Engine(
    backend, recipe, settings, image_root=root, files=files, cache=cache,
    backend_params=backend_params(config),
  )  # fmt: skip

  async def go() -> str:
    try:
      return await engine.run(todo, already_done=len(images) - len(todo), total=len(images))
    finally:
      await backend.aclose()

  try:
    stopped = asyncio.run(go())
  finally:
    if cache is not None:
      cache.close()
  final = {}
  for o in engine_lib.complete_jsonl_lines(files.outcomes_path):
    final[o["image"]] = o
  summary = report_lib.summarize(final.values())
  complete = all(p in final for p in images) and not stopped
  report = {
    "complete": complete,
    "stopped": stopped,
    "shard_index": index,
    "num_shards": num,
    "shard_images": len(images),
    "this_run": {
      "images": engine.totals.images,
      "requests": engine.totals.requests,
      "cached_replies": engine.totals.cached,
      "tokens": engine.totals.input_tokens + engine.totals.output_tokens,
      "cost_usd": round(engine.totals.cost_usd, 6),
    },
    **summary,
  }
  tmp = out / "report.json.tmp"
  tmp.write_text(json.dumps(report, indent=1))
  os.replace(tmp, out / "report.json")
  print(report_lib.format_table(summary), flush=True)
  if stopped:
    print(f"datagen stopped early ({stopped}); rerun the same command to resume", flush=True)
  return report


def run_merge(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Combines every shard's records into ``datagen/records.jsonl``; returns the merged report.

  Raises:
    ValueError: a shard is missing or unfinished (unless ``config.datagen.merge_allow_partial``),
      two shards disagree on a record id, or a record is invalid.
  """
  num = int(config.num_shards)
  reports, records = [], {}
  for i in range(num):
    d = shard_dir(workdir, i, num)
    rp = d / "report.json"
    if not rp.exists():
      raise ValueError(f"merge: shard {i} of {num} has no report ({rp}); run datagen for it first")
    rep = json.loads(rp.read_text())
    if not rep["complete"] and not config.datagen.merge_allow_partial:
      raise ValueError(
        f"merge: shard {i} of {num} is unfinished ({rep['stopped'] or 'not all images done'}); "
        "resume it, or set config.datagen.merge_allow_partial"
      )
    reports.append(rep)
    path = d / "records.jsonl"
    for n, rec in enumerate(engine_lib.complete_jsonl_lines(path)):
      records_lib.validate_record(rec, where=f"{path}:{n + 1}")
      prev = records.get(rec["id"])
      if prev is not None and prev != rec:
        raise ValueError(f"merge: record id {rec['id']!r} differs between shards ({path})")
      records[rec["id"]] = rec
  out = datagen_dir(workdir)
  records_lib.write_jsonl([records[k] for k in sorted(records)], out / MERGED_RECORDS)
  merged = report_lib.merge(reports)
  merged["complete"] = all(r["complete"] for r in reports)
  merged["records"] = len(records)
  tmp = out / "report.json.tmp"
  tmp.write_text(json.dumps(merged, indent=1))
  os.replace(tmp, out / "report.json")
  print(f"merge: {num} shard(s), {len(records)} records -> {out / MERGED_RECORDS}", flush=True)
  print(report_lib.format_table(merged), flush=True)
  return merged
