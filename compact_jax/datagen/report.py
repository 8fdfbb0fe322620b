"""The generator's report: counts per k, capability, rejection reason, stage; tokens and cost.

Built from the outcome lines (one per finished image), so a resumed run reports
everything done so far, and shard reports merge by adding.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from compact_jax import capabilities as caps_lib

# (stage counter, the counter it is a fraction of): the per-stage acceptance rates.
STAGES = (
  ("parsed", "generated"),
  ("screened", "parsed"),
  ("verification_parsed", "screened"),
  ("accepted", "verification_parsed"),
)


def summarize(outcomes: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """Counts over the latest outcome of every image."""
  statuses: collections.Counter = collections.Counter()
  failures: collections.Counter = collections.Counter()
  rejections: collections.Counter = collections.Counter()
  retries: collections.Counter = collections.Counter()
  stages: collections.Counter = collections.Counter()
  usage: collections.Counter = collections.Counter()
  per_k: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  per_cap: collections.Counter = collections.Counter()
  for o in outcomes:
    statuses[o["status"]] += 1
    if o["status"] == "failed":
      failures[o["reason"].split(":")[0]] += 1
    if o["status"] == "dropped":
      failures["dropped: " + o["reason"].split(":")[0]] += 1
    rejections.update(o.get("rejections", {}))
    retries.update(o.get("retries", {}))
    stages.update(o.get("stages", {}))
    usage.update(o.get("usage", {}))
    if o["status"] == "accepted":
      k = str(o.get("k"))
      per_k[k]["images"] += 1
      per_k[k]["questions"] += len(o.get("capabilities", []))
      for caps in o.get("capabilities", []):
        per_cap.update(caps)
  rates = {
    f"{num}/{den}": round(stages[num] / stages[den], 4) if stages[den] else None
    for num, den in STAGES
  }
  images = sum(statuses.values())
  return {
    "images": images,
    "statuses": dict(sorted(statuses.items())),
    "image_acceptance_rate": round(statuses["accepted"] / images, 4) if images else None,
    "questions": sum(v["questions"] for v in per_k.values()),
    "per_k": {k: dict(v) for k, v in sorted(per_k.items())},
    "per_capability": {c: per_cap[c] for c in caps_lib.CAPABILITIES},
    "rejections": dict(rejections.most_common()),
    "failures": dict(failures.most_common()),
    "retries": dict(retries.most_common()),
    "stages": {num: stages[num] for num, _ in STAGES} | {"generated": stages["generated"]},
    "stage_acceptance": rates,
    "requests": usage["requests"],
    "cached_replies": usage["cached"],
    "input_tokens": usage["input_tokens"],
    "output_tokens": usage["output_tokens"],
    "cost_usd": round(usage["cost_usd_micro"] / 1e6, 6),
  }


def merge(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Sums shard summaries (what `summarize` over all their outcomes would give)."""
  out: dict[str, Any] = {}
  for key in ("images", "questions", "requests", "cached_replies", "input_tokens", "output_tokens"):
    out[key] = sum(r[key] for r in reports)
  out["cost_usd"] = round(sum(r["cost_usd"] for r in reports), 6)
  for key in ("statuses", "per_capability", "rejections", "failures", "retries", "stages"):
    total: collections.Counter = collections.Counter()
    for r in reports:
      total.update(r[key])
    out[key] = dict(total)
  out["per_capability"] = {c: out["per_capability"].get(c, 0) for c in caps_lib.CAPABILITIES}
  per_k: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for r in reports:
    for k, v in r["per_k"].items():
      per_k[k].update(v)
  out["per_k"] = {k: dict(v) for k, v in sorted(per_k.items())}
  st = out["stages"]
  out["stage_acceptance"] = {
    f"{num}/{den}": round(st.get(num, 0) / st[den], 4) if st.get(den) else None
    for num, den in STAGES
  }
  acc = out["statuses"].get("accepted", 0)
  out["image_acceptance_rate"] = round(acc / out["images"], 4) if out["images"] else None
  return out


def format_table(s: Mapping[str, Any]) -> str:
  """A printable summary."""
  lines = [
    f"images {s['images']} {s['statuses']}  accepted QA {s['questions']}",
    f"{'k':>4} {'images':>8} {'questions':>10}",
  ]
  for k, v in s["per_k"].items():
    lines.append(f"{k:>4} {v.get('images', 0):>8} {v.get('questions', 0):>10}")
  lines.append("capability             questions")
  lines += [f"{c:<22} {n:>9}" for c, n in s["per_capability"].items()]
  if s["rejections"]:
    lines.append("rejection reason                     count")
    lines += [f"{r:<36} {n:>5}" for r, n in s["rejections"].items()]
  if s["failures"]:
    lines.append("failed / dropped images              count")
    lines += [f"{r[:36]:<36} {n:>5}" for r, n in s["failures"].items()]
  if s["retries"]:
    lines.append(f"retries: {s['retries']}")
  lines.append(
    "stage acceptance: " + "  ".join(f"{k}={v}" for k, v in s["stage_acceptance"].items())
  )
  lines.append(
    f"requests {s['requests']} (+{s['cached_replies']} cached)  tokens in {s['input_tokens']} "
    f"out {s['output_tokens']}  est. cost ${s['cost_usd']:.4f}"
  )
  return "\n".join(lines)
