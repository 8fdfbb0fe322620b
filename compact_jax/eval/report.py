"""Eval results as a markdown table and a bar chart of accuracy by k."""

from __future__ import annotations

from typing import Any

SYSTEMS = (("model", None), ("majority", "majority"), ("text-only", "text_only"))


def _table_of(results: dict[str, Any], baseline: str | None) -> dict[str, Any]:
  return results if baseline is None else results["baselines"][baseline]


def _row(results, section: str, key: str) -> list[str]:
  cells = []
  n = None
  for _, base in SYSTEMS:
    entry = _table_of(results, base).get(section, {}).get(key)
    cells.append("-" if entry is None else f"{entry['accuracy']:.3f}")
    n = n or (entry or {}).get("n")
  return [key, str(n or 0), *cells]


def markdown_report(results: dict[str, Any]) -> str:
  """Tables by k, by capability (all k and k=1 only) and seen vs held-out."""
  head = "| {} | n | model | majority | text-only |\n|---|---:|---:|---:|---:|"
  parts = [
    f"Eval on split '{results['split']}' at step {results['checkpoint_step']} "
    f"({results['num_questions']} questions)",
  ]
  for section, title in (
    ("overall", "all"),
    ("by_k", "k"),
    ("by_capability_k1", "capability (k=1)"),
    ("by_capability", "capability (any k)"),
    ("heldout", "combination"),
  ):
    keys = list(results.get(section, {}))
    if not keys:
      continue
    lines = [head.format(title)]
    lines += ["| " + " | ".join(_row(results, section, k)) + " |" for k in keys]
    parts.append("\n".join(lines))
  return "\n\n".join(parts)


def plot_by_k(results: dict[str, Any], path: str) -> None:
  """Grouped bars: accuracy by k for the model and both baselines."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  ks = list(results["by_k"])
  x = np.arange(len(ks))
  width = 0.27
  fig, ax = plt.subplots(figsize=(6.5, 3.8))
  for i, (label, base) in enumerate(SYSTEMS):
    table = _table_of(results, base)["by_k"]
    ax.bar(x + (i - 1) * width, [table[k]["accuracy"] for k in ks], width, label=label)
  ax.set_xticks(x, [f"k={k}\n(n={results['by_k'][k]['n']})" for k in ks])
  ax.set_ylabel("exact-match accuracy")
  ax.set_ylim(0, 1)
  ax.set_title(f"Accuracy by number of capabilities k (step {results['checkpoint_step']})")
  ax.legend()
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
