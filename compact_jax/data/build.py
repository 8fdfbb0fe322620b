"""The ``build`` stage: record files -> TFDS (array_record) + a tokenizer.

Reads the record files named by ``config.build.records`` (default: the
generate stage's ``WORKDIR/generate/{split}.jsonl``) and images under
``config.build.image_roots`` (default: ``WORKDIR/generate``). Writes
``WORKDIR/build/``:
- ``tfds/<dataset_name>/...`` the TFDS dataset, one split per record set;
- ``tokenizer.model`` a SentencePiece model trained on the templated text of
  ``config.build.tokenizer_splits`` (or a copy of ``config.build.tokenizer_file``);
- ``build_report.json`` the per-split counts, written last (it marks the
  stage as finished).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import ml_collections

from compact_jax.data import records as records_lib
from compact_jax.data import template as template_lib
from compact_jax.data import tfds_io
from compact_jax.data.tokenizer import Tokenizer, train_tokenizer

REPORT_FILE = "build_report.json"
TOKENIZER_FILE = "tokenizer.model"


def build_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(os.fspath(workdir), "build")


def tfds_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(build_dir(workdir), "tfds")


def _resolve(path: str, workdir: str) -> str:
  return path if os.path.isabs(path) else os.path.join(workdir, path)


def record_files(config: ml_collections.ConfigDict, workdir: str) -> dict[str, list[str]]:
  """split -> record files, defaulting to the generate stage's outputs."""
  out = {}
  for split, files in config.build.records.items():
    files = list(files) or [os.path.join("generate", f"{split}.jsonl")]
    out[split] = [_resolve(f, workdir) for f in files]
  return out


def image_roots(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  roots = list(config.build.image_roots) or ["generate"]
  return [_resolve(r, workdir) for r in roots]


def run_build(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Packages the records with TFDS and prepares the tokenizer."""
  workdir = os.fspath(workdir)
  out = build_dir(workdir)
  report_path = os.path.join(out, REPORT_FILE)
  if os.path.exists(report_path) and not config.overwrite:
    logging.info("build: finished already (%s); pass --overwrite to redo", report_path)
    with open(report_path) as f:
      return json.load(f)
  os.makedirs(out, exist_ok=True)
  if os.path.exists(report_path):
    os.remove(report_path)

  files = record_files(config, workdir)
  report = tfds_io.build_dataset(
    files,
    image_roots(config, workdir),
    tfds_dir(workdir),
    name=config.build.dataset_name,
    skip_bad_records=config.build.skip_bad_records,
    overwrite=config.overwrite,
  )

  tok_path = os.path.join(out, TOKENIZER_FILE)
  template = template_lib.TEMPLATES[config.data.template]
  if config.build.tokenizer_file:
    shutil.copyfile(config.build.tokenizer_file, tok_path + ".tmp")
    os.replace(tok_path + ".tmp", tok_path)
    tokenizer = Tokenizer.load(tok_path)
  else:
    splits = [s for s in config.build.tokenizer_splits if s in files]
    if not splits:
      raise ValueError(
        f"Training a tokenizer needs one of config.build.tokenizer_splits="
        f"{tuple(config.build.tokenizer_splits)} in config.build.records ({list(files)})"
      )
    texts = []
    for split in splits:
      for path in files[split]:
        for rec in records_lib.read_records(path):
          texts.append(template_lib.rendered_text(rec["conversations"], template))
    tokenizer = train_tokenizer(
      texts,
      tok_path,
      vocab_size=config.build.tokenizer_vocab_size,
      model_type=config.build.tokenizer_model_type,
      control_symbols=template.control_symbols,
    )
  logging.info("tokenizer: %s (%d pieces)", tok_path, tokenizer.vocab_size)

  summary = {
    "dataset": config.build.dataset_name,
    "tfds_dir": tfds_dir(workdir),
    "record_files": files,
    "tokenizer": tok_path,
    "vocab_size": tokenizer.vocab_size,
    "report": dataclasses.asdict(report) if dataclasses.is_dataclass(report) else report,
  }
  with open(report_path + ".tmp", "w") as f:
    json.dump(summary, f, indent=2, default=str)
  os.replace(report_path + ".tmp", report_path)
  return summary


def load_tokenizer(workdir: str | os.PathLike) -> Tokenizer:
  return Tokenizer.load(os.path.join(build_dir(workdir), TOKENIZER_FILE))


def load_split(config: ml_collections.ConfigDict, workdir: str | os.PathLike, split: str):
  """Random-access decoded records of a built split."""
  return tfds_io.load_split(tfds_dir(workdir), split, name=config.build.dataset_name)
