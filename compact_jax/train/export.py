"""The ``export`` stage: a trained workdir -> one big_vision-layout npz, adapters merged.

  python -m compact_jax.main --config=configs/<name>.py --workdir=W --config.stages='("export",)'

reads the latest ``train`` checkpoint of ``W`` (``--config.export.phase`` for another phase),
folds every LoRA adapter into its base weight (``models.lora.merge_lora``) and writes

  W/export/model.npz   ``params/img/...``, ``params/connector/...``, ``params/llm/...``
                       (PaliGemma's layout, what ``model_init`` and the converters read)
  W/export/model.json  the model config, image size, template, vocab size, the
                       checkpoint step and the merged weights' paths
  W/export/tokenizer.model  a copy of the SentencePiece model the run trained with, so
                       the directory is all a user needs (the run's own path may be gone)

A merged model needs no adapter code: ``--config.model_init.path=W/export/model.npz``
with ``model.lora.targets=()`` starts from it, and for a LLaVA-shaped model (mlp2x_gelu
connector, LLaMA-family decoder) ``python -m compact_jax.checkpoints.cli npz-to-llava``
turns it into a Hugging Face ``LlavaForConditionalGeneration`` directory.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from compact_jax.checkpoints import big_vision
from compact_jax.models import lora as lora_lib
from compact_jax.models import vlm as vlm_lib
from compact_jax.train import loop as loop_lib
from compact_jax.train import mesh as mesh_lib

EXPORT_DIR = "export"
NPZ_FILE = "model.npz"
INFO_FILE = "model.json"
TOKENIZER_FILE = "tokenizer.model"
# Our top-level param prefixes -> npz key prefixes (every param must fall under one).
PARTS = {
  "img/": "params/img/",
  "connector/": "params/connector/",
  "llm/": "params/llm/",
  "image_newline": "params/image_newline",  # dynamic resolution's row separator
}


def export_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(os.fspath(workdir), EXPORT_DIR)


def merged_params(graphdef: Any, params: Any) -> tuple[dict[str, np.ndarray], list[str]]:
  """(our '/'-path -> host array with every adapter merged, the merged weights' paths)."""
  model = nnx.merge(graphdef, params)
  merged = lora_lib.merge_lora(model)
  flat = vlm_lib.flat_params(nnx.state(model, nnx.Param))
  # Gathers shards from every host (a no-op copy to numpy on one host).
  return {
    k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in flat.items()
  }, merged


def run_export(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Writes ``W/export/model.npz`` and ``model.json``; returns the info dict."""
  phase = config.export.phase
  out = export_dir(workdir)
  info_path = os.path.join(out, INFO_FILE)
  step = loop_lib.latest_checkpoint_step(config, workdir, phase)
  if step is None:
    raise FileNotFoundError(
      f"export: no {phase!r} checkpoint under {loop_lib.checkpoint_dir(workdir, phase)}; "
      f"run the {phase} stage first (or set --config.export.phase)"
    )
  if os.path.exists(info_path) and not config.overwrite:
    with open(info_path) as f:
      saved = json.load(f)
    if saved.get("step") == step and saved.get("phase") == phase:
      logging.info("export: done already for %s step %d (%s)", phase, step, info_path)
      return saved
  mesh = mesh_lib.make_mesh(config.mesh)
  graphdef, params, meta = loop_lib.load_params(config, workdir, mesh, phase=phase)
  flat, merged = merged_params(graphdef, params)
  info = {
    "phase": phase,
    "step": step,
    "npz": os.path.join(out, NPZ_FILE),
    "merged_lora": merged,
    "num_params": int(sum(v.size for v in flat.values())),
    "model": meta.get("model", config.model.to_dict()),
    "image_size": int(meta.get("image_size", config.data.image_size)),
    "template": meta.get("template", config.data.template),
    "vocab_size": int(meta["vocab_size"]),
    "tokenizer": meta.get("tokenizer", ""),
  }
  source_tokenizer = info["tokenizer"]
  if not source_tokenizer or not os.path.isfile(source_tokenizer):
    raise FileNotFoundError(
      f"export: the {phase} checkpoint's tokenizer {source_tokenizer!r} is missing; an export "
      "without it could not be decoded (rebuild it or restore the file)"
    )
  info["tokenizer_file"] = os.path.join(out, TOKENIZER_FILE)
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    # Written under temporary names and renamed: a killed export leaves no half file
    # that a later `model_init` would read, and model.json (the "done" mark) goes last.
    tmp = os.path.join(out, "model.tmp.npz")
    big_vision.export_npz(flat, tmp, PARTS)
    os.replace(tmp, info["npz"])
    shutil.copyfile(source_tokenizer, info["tokenizer_file"] + ".tmp")
    os.replace(info["tokenizer_file"] + ".tmp", info["tokenizer_file"])
    with open(info_path + ".tmp", "w") as f:
      json.dump(info, f, indent=1, default=str)
    os.replace(info_path + ".tmp", info_path)
  logging.info(
    "export: %s step %d -> %s (%d params, %d adapters merged)",
    phase, step, info["npz"], info["num_params"], len(merged),
  )  # fmt: skip
  print(f"exported {phase} step {step} -> {info['npz']} ({len(merged)} LoRA weights merged)")
  return info
