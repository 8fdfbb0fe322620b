"""The ``mix`` stage: compositional records + a seeded subset of a LLaVA-665K-format file.

COMPACT trains on 32K compositional samples plus a random 5% of LLaVA-665K (about
65K in all). This writes one shuffled JSONL file that the build stage takes as is
(``config.build.records.train``), plus ``composition.json`` with counts by source
and by k.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from compact_jax.data import records as records_lib
from compact_jax.datagen import stages


def _resolve(path: str, workdir: str) -> pathlib.Path:
  p = pathlib.Path(path).expanduser()
  return p if p.is_absolute() else pathlib.Path(workdir) / p


def llava_subset_size(total: int, *, fraction: float, count: int) -> int:
  """How many LLaVA records to take: ``count`` if >= 0, else round(fraction * total)."""
  if count >= 0:
    if count > total:
      raise ValueError(f"config.mix.llava_count={count} exceeds the file's {total} records")
    return count
  if not 0 <= fraction <= 1:
    raise ValueError(f"config.mix.llava_fraction must be in [0, 1], got {fraction}")
  return round(fraction * total)


def mix_records(
  compositional: Sequence[dict[str, Any]],
  llava: Sequence[dict[str, Any]],
  *,
  seed: int,
  compositional_count: int,
  llava_fraction: float,
  llava_count: int,
  llava_source: str,
) -> list[dict[str, Any]]:
  """The shuffled mixture. Subsets are drawn without replacement from one seeded generator,
  so the same inputs and seed give the same file."""
  rng = np.random.default_rng(seed)
  comp = list(compositional)
  if 0 <= compositional_count < len(comp):
    comp = [comp[i] for i in sorted(rng.choice(len(comp), compositional_count, replace=False))]
  n = llava_subset_size(len(llava), fraction=llava_fraction, count=llava_count)
  picked = [dict(llava[i]) for i in sorted(rng.choice(len(llava), n, replace=False))] if n else []
  for rec in picked:
    rec.setdefault("source", llava_source)  # unknown keys are kept; source says where it came from
  out = comp + picked
  order = rng.permutation(len(out))
  return [out[i] for i in order]


def composition(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  by_source = collections.Counter(str(r.get("source", "unknown")) for r in records)
  by_k = collections.Counter(str(r["k"]) if "k" in r else "none" for r in records)
  return {
    "records": len(records),
    "by_source": dict(sorted(by_source.items())),
    "by_k": dict(sorted(by_k.items())),
  }


def _read_checked(path: pathlib.Path) -> list[dict[str, Any]]:
  out = []
  for located in records_lib.iter_records(path):
    records_lib.validate_record(located.record, where=located.where)
    out.append(located.record)
  return out


def run_mix(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Writes ``config.mix.output``; returns the composition (also printed)."""
  workdir = os.fspath(workdir)
  m = config.mix
  comp_files = [_resolve(p, workdir) for p in m.compositional] or [
    stages.datagen_dir(workdir) / stages.MERGED_RECORDS
  ]
  compositional = []
  for path in comp_files:
    if not path.exists():
      raise ValueError(f"mix: compositional record file {path} does not exist (run merge first)")
    compositional += _read_checked(path)
  llava = []
  if m.llava_file:
    path = _resolve(m.llava_file, workdir)
    if not path.exists():
      raise ValueError(f"mix: config.mix.llava_file {path} does not exist")
    llava = [loc.record for loc in records_lib.iter_records(path)]
  mixed = mix_records(
    compositional,
    llava,
    seed=int(m.seed),
    compositional_count=int(m.compositional_count),
    llava_fraction=float(m.llava_fraction),
    llava_count=int(m.llava_count),
    llava_source=str(m.llava_source),
  )
  ids: dict[str, int] = {}
  for i, rec in enumerate(mixed):
    records_lib.validate_record(rec, where=f"mix record #{i}")
    rid = records_lib.record_id(rec)
    if rid in ids:
      raise ValueError(f"mix: record id {rid!r} occurs twice in the mixture (ids must be unique)")
    ids[rid] = i
  out = _resolve(m.output, workdir)
  records_lib.write_jsonl(mixed, out)
  comp = composition(mixed)
  comp["output"] = str(out)
  (out.parent / "composition.json").write_text(json.dumps(comp, indent=1))
  print(f"mix: {comp['records']} records -> {out}", flush=True)
  print(f"  by source: {comp['by_source']}", flush=True)
  print(f"  by k:      {comp['by_k']}", flush=True)
  return comp
